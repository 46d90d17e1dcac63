"""Comparing a graph's outputs with a reference, with dtype-aware tolerances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

# Allowed max |out - ref| relative to max |ref| (an output whose largest
# magnitude is below _SCALE_FLOOR is judged against the floor instead). fp32 fusions reorder reductions (softmax and
# norm sums), which moves results by ~1e-6 relative on transformer-sized
# models; 1e-4 leaves room for that while any wrong rewrite (a lost scale,
# a mask dropped, a wrong eps) errs by far more.
TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
_SCALE_FLOOR = 1e-2


@dataclass
class Comparison:
    """The outcome of comparing outputs: ``ok``, the worst error and where it is."""

    ok: bool
    max_error: float
    detail: str = ""


def _leaves(outputs: Any) -> list[Any]:
    return pytree.tree_leaves(outputs)


def compare(reference: Any, actual: Any) -> Comparison:
    """Compare two output structures leaf by leaf.

    Tensors must agree in shape and dtype, and in value within
    ``TOLERANCE[dtype]`` of the reference's largest finite magnitude; equal
    infinities agree. Where the reference is NaN the model's result is
    undefined and any value is accepted (a fused attention gives zeros on a
    fully masked row where an eager softmax gives NaN); a NaN where the
    reference is a number is an error. Non-tensor leaves must be equal.
    ``max_error`` is the worst relative error seen.
    """
    ref_leaves, act_leaves = _leaves(reference), _leaves(actual)
    if len(ref_leaves) != len(act_leaves):
        return Comparison(False, float("inf"), f"{len(act_leaves)} outputs, expected {len(ref_leaves)}")
    worst = 0.0
    for i, (ref, act) in enumerate(zip(ref_leaves, act_leaves)):
        if not isinstance(ref, torch.Tensor):
            if ref != act:
                return Comparison(False, float("inf"), f"output {i}: {act!r}, expected {ref!r}")
            continue
        if not isinstance(act, torch.Tensor) or act.shape != ref.shape or act.dtype != ref.dtype:
            got = f"{tuple(act.shape)} {act.dtype}" if isinstance(act, torch.Tensor) else repr(act)
            return Comparison(False, float("inf"), f"output {i}: {got}, expected {tuple(ref.shape)} {ref.dtype}")
        if not ref.is_floating_point():
            if not torch.equal(ref, act):
                return Comparison(False, float("inf"), f"output {i}: integer values differ")
            continue
        ref64, act64 = ref.detach().double(), act.detach().double().to(ref.device)
        defined = ~torch.isnan(ref64)
        if (torch.isnan(act64) & defined).any():
            return Comparison(False, float("inf"), f"output {i}: NaN where the model's output is a number")
        unequal = defined & (act64 != ref64)
        if not unequal.any():
            continue
        finite = torch.isfinite(ref64)
        scale = max(ref64[finite].abs().max().item() if finite.any() else 0.0, _SCALE_FLOOR)
        error = (act64[unequal] - ref64[unequal]).abs().max().item() / scale
        worst = max(worst, error)
        tol = TOLERANCE.get(ref.dtype, 1e-4)
        if not error <= tol:
            return Comparison(False, error, f"output {i} {tuple(ref.shape)}: relative error {error:.3g} > {tol:g}")
    return Comparison(True, worst)
