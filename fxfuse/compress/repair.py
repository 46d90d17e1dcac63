"""Closed-form repair after removing branches: refit the projection before the gap by least squares.

After a run of removed branches, the stream the next kept branch reads is
``Y + M`` (the stream into the preceding kept branch p plus p's output
``M = z·Wᵀ + b``, z the input of p's output projection) where the original
model had ``S`` (its stream after the last removed branch). p's projection
weight is refitted on the calibration tokens so that ``Y + z·(W + D)ᵀ + b ≈ S``:

    Dᵀ = argmin ‖z·Dᵀ − (S − Y − M)‖² + λ‖D‖²,  λ = ridge · tr(zᵀz) / d_in

with ``ridge`` chosen by leave-one-batch-out error on the calibration
batches, and no refit at all where no λ beats leaving the weights alone
(the fit then only over-fits the calibration tokens). The repaired model has
no extra weights and no extra work. (ReplaceMe, Shopkhoev et al. 2025, fits
a map on p's output, ``M·T``; fitting the weight from its input is a superset
of those maps, and on SmolLM2 it halves the rise of perplexity that is left:
see benchmarks/results/compress.md.) Only pre-norm streams, where the sum
itself flows on, are repaired: after a post-norm block the stream is
normalized and the fit would be on the wrong quantity; :func:`repair_gap`
says so instead.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxfuse.compress.calibrate import Batch, observe, token_mask
from fxfuse.compress.structure import find_branches, linear_weight
from fxfuse.ir.meta import attr_of


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# A refit must cut the left-out error by at least 1%: a strongly shrunk fit to pure noise
# can come out a fraction of a percent ahead by chance.
MIN_GAIN = 0.99


def repair_gap(original: fx.GraphModule, current: fx.GraphModule, previous: str, last_removed: str,
               data: list[Batch], ridge: Optional[float] = None) -> tuple[Optional[fx.GraphModule], str]:
    """Refit branch ``previous``'s projection in ``current`` so its stream matches ``original``'s after
    branch ``last_removed``; returns (the repaired module, or None when the gap is not repaired, and why).

    ``ridge`` (relative λ) defaults to the one of :data:`RIDGES` with the least error on held-out
    calibration batches (leave one batch out); when no λ beats no repair there, nothing is refitted.
    """
    original_branches = find_branches(original.graph)
    kept = {b.name: b for b in find_branches(current.graph)}.get(previous)
    target = {b.name: b for b in original_branches}.get(last_removed)
    if kept is None or target is None:
        return None, f"{previous} or {last_removed} is not a branch of the graph"
    projection = kept.projection
    if projection is None or projection.target is not torch.ops.aten.linear.default \
            or linear_weight(projection) is None:
        return None, f"{previous} does not end in a linear with a stored weight"
    if not all(_is_sum(b.stream) for b in original_branches[1:]):
        return None, f"the stream after {previous} is normalized (post-norm); a fit of the sum would not hold"

    targets: list[Tensor] = []
    observe(original, {"s": target.stream, "f": target.output}, data,
            lambda i, v, b: targets.append(v["s"] + v["f"]), desc=f"repair {previous}: original")
    folds: list[tuple[Tensor, Tensor, float]] = []  # per batch: zᵀz, zᵀR, ‖R‖²

    def accumulate(i: int, values: dict[str, Tensor], batch: Batch) -> None:
        mask = token_mask(batch, values["m"])
        z = values["z"][mask].double()
        residual = targets[i][mask].double() - values["y"][mask].double() - values["m"][mask].double()
        folds.append((z.T @ z, z.T @ residual, float((residual * residual).sum())))

    observe(current, {"y": kept.stream, "m": kept.output, "z": projection.args[0]}, data, accumulate,
            desc=f"repair {previous}")
    gram, cross = sum(f[0] for f in folds), sum(f[1] for f in folds)
    if ridge is None:
        ridge, gain = cross_validated_ridge(folds)
        if ridge is None:
            return None, f"no repair before {last_removed}: no ridge λ beat no repair on held-out batches"
        chosen = f"λ={ridge:g} by leave-one-batch-out, held-out error ×{gain:.3f}"
    else:
        chosen = f"λ={ridge:g}"
    delta = solve_ridge(gram, cross, ridge)
    weight_node = linear_weight(projection)
    weight = attr_of(current, weight_node.target)
    set_tensor(current, weight_node.target, (weight.double() + delta.T).to(weight.dtype))
    return current, f"refit {weight_node.target} ({chosen})"


def solve_ridge(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """Δ = (XᵀX + λI)⁻¹ XᵀR from ``gram`` = XᵀX and ``cross`` = XᵀR, with λ = ``ridge`` · tr(XᵀX) / d."""
    d = gram.shape[0]
    lam = ridge * float(gram.diagonal().sum()) / d
    return torch.linalg.solve(gram + lam * torch.eye(d, dtype=torch.float64), cross)


def cross_validated_ridge(folds: list[tuple[Tensor, Tensor, float]]) -> tuple[Optional[float], float]:
    """(the λ of RIDGES with the least leave-one-batch-out error, that error / no repair's), or (None, 1)
    when there is a single batch or no λ does better than :data:`MIN_GAIN` times Δ = 0's error."""
    if len(folds) < 2:
        return None, 1.0
    gram, cross = sum(f[0] for f in folds), sum(f[1] for f in folds)
    baseline = sum(f[2] for f in folds)
    best, best_error = None, baseline
    for ridge in RIDGES:
        error = 0.0
        for g, c, rr in folds:
            delta = solve_ridge(gram - g, cross - c, ridge)
            # ‖X·Δ − R‖² on the left-out batch, from its own XᵀX, XᵀR and ‖R‖².
            error += float((delta * (g @ delta)).sum() - 2 * (delta * c).sum()) + rr
        if error < best_error:
            best, best_error = ridge, error
    if best is None or best_error > MIN_GAIN * baseline:
        return None, 1.0
    return best, best_error / baseline


def _is_sum(node: fx.Node) -> bool:
    """A branch reads the residual sum itself (pre-norm), not a normalized sum (post-norm)."""
    return node.target is torch.ops.aten.add.Tensor or (node.target is operator.getitem and node.args[1] == 1)


def set_tensor(gm: fx.GraphModule, target: str, value: Tensor) -> None:
    """Store a new tensor under ``target`` in ``gm`` only (the source model keeps its own)."""
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    delattr(module, leaf)
    module.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=False))
