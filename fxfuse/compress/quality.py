"""Quality of a (compressed) model on held-out batches, and its loss against the original.

A language model (an output with ``logits``, inputs with ``input_ids``) is
measured by perplexity of the next token over the real tokens; its quality
loss is the relative rise, ``ppl / ppl_original - 1``. Any other model is
measured by fidelity: the cosine of its mean-pooled output (``last_hidden_state``
or the first output) to the original's; its quality loss is ``1 - cosine``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxfuse.compress.calibrate import Batch, token_mask


def _logits(output: Any) -> Optional[Tensor]:
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def _hidden(output: Any) -> Tensor:
    for value in (getattr(output, "last_hidden_state", None), output[0] if isinstance(output, (tuple, list)) else None,
                  output):
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot read a hidden state or logits from a {type(output).__name__} output")


def is_language_model(output: Any, batch: Batch) -> bool:
    """True when quality is perplexity: the output has logits and the batch has input_ids."""
    return _logits(output) is not None and isinstance(batch.get("input_ids"), Tensor)


def token_nll(output: Any, batch: Batch) -> Tensor:
    """The negative log-likelihood (float64, differentiable) of each real next token, flattened."""
    logits, ids = _logits(output), batch["input_ids"]
    keep = token_mask(batch, ids.unsqueeze(-1))[:, 1:] & token_mask(batch, ids.unsqueeze(-1))[:, :-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="none")
    return nll[keep.flatten()]


def next_token_nll(output: Any, batch: Batch) -> tuple[float, int]:
    """(summed negative log-likelihood of each real next token, their count)."""
    nll = token_nll(output, batch)
    return float(nll.sum()), nll.numel()


def pooled(output: Any, batch: Batch) -> Tensor:
    """(B, D) mean of the output's hidden states over the real tokens."""
    hidden = _hidden(output).double()
    mask = token_mask(batch, hidden).unsqueeze(-1).double()
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


@dataclass
class Quality:
    """``value``: perplexity (lower is better) or mean cosine to the original (higher is better)."""

    metric: str
    value: float

    def loss_against(self, original: "Quality") -> float:
        """Relative perplexity rise, or 1 - cosine (the original's own cosine is 1)."""
        if self.metric == "perplexity":
            return self.value / original.value - 1.0
        return 1.0 - self.value

    def __str__(self) -> str:
        return f"{self.metric} {self.value:.4g}"


class Judge:
    """Measures models on fixed batches against the original model's outputs there."""

    def __init__(self, original: Callable[..., Any], data: list[Batch]) -> None:
        self.data = data
        self.language_model: Optional[bool] = None  # read off the original's first output
        self.reference: list[Tensor] = []  # the original's pooled outputs, for models without logits
        self.original = self.measure(original)

    def measure(self, model: Callable[..., Any]) -> Quality:
        """Perplexity, or mean cosine of pooled outputs to the original's, over the batches."""
        total, count = 0.0, 0
        with torch.no_grad():
            for i, batch in enumerate(self.data):
                output = model(**batch)
                if self.language_model is None:
                    self.language_model = is_language_model(output, batch)
                if not self.language_model and len(self.reference) == i:  # measuring the original itself
                    self.reference.append(pooled(output, batch))
                if self.language_model:
                    nll, n = next_token_nll(output, batch)
                else:
                    cos = F.cosine_similarity(pooled(output, batch), self.reference[i], dim=-1)
                    nll, n = float(cos.sum()), cos.numel()
                total, count = total + nll, count + n
        if self.language_model:
            return Quality("perplexity", math.exp(total / max(count, 1)))
        return Quality("cosine", total / max(count, 1))
