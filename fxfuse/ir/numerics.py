"""Comparing a graph's outputs with a reference, with dtype-aware tolerances."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
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
# Against a float64 result (compare_exact): a rewrite may stray from it by twice the model's own error, plus the
# tolerance; an input on which the model itself strays by more than _JUDGEABLE tolerances judges nothing.
_OWN_ERROR_FACTOR, _JUDGEABLE = 2.0, 100.0


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


def compare_exact(reference: Any, actual: Any, exact: Any) -> Comparison:
    """:func:`compare`, with a float64 result ``exact`` to judge by where ``actual`` strays from ``reference``.

    On an ill-conditioned input (a real model's logits after a redrawn KV
    cache) the model's own float32 result can stray from the exact one by
    more than ``TOLERANCE``, and any reordering of its sums by as much: the
    float32 reference then judges rounding, not the rewrite. A floating
    output that :func:`compare` fails on its values alone passes if it is
    within ``TOLERANCE`` plus twice the reference's own error of ``exact``,
    and the reference's own error is below 100 tolerances (else the input
    cannot tell a rewrite from rounding, and the check fails). ``max_error``
    stays the error against ``reference``; on a pass judged so, ``detail``
    gives the reference's own worst error.
    """
    plain = compare(reference, actual)
    if plain.ok or not math.isfinite(plain.max_error):  # shapes, dtypes, NaNs: no float64 result changes those
        return plain
    worst, own_worst = 0.0, 0.0
    for i, (ref, act, ex) in enumerate(zip(_leaves(reference), _leaves(actual), _leaves(exact))):
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
            continue
        leaf = compare(ref, act)
        worst = max(worst, leaf.max_error)
        if leaf.ok:
            continue
        if not math.isfinite(leaf.max_error) or not isinstance(ex, torch.Tensor) or ex.shape != ref.shape:
            return plain
        ex64 = ex.detach().double().to(ref.device)
        defined = torch.isfinite(ex64) & ~torch.isnan(ref.detach())
        if not defined.any():
            return plain
        ex64 = ex64[defined]
        scale = max(ex64.abs().max().item(), _SCALE_FLOOR)
        own = (ref.detach().double()[defined] - ex64).abs().max().item() / scale
        error = (act.detach().double().to(ref.device)[defined] - ex64).abs().max().item() / scale
        tol, shape = TOLERANCE.get(ref.dtype, 1e-4), tuple(ref.shape)
        if not own <= _JUDGEABLE * tol:
            return Comparison(False, worst, f"{plain.detail}; the model's own {ref.dtype} result is {own:.3g} "
                              f"from float64 on output {i} {shape}, too far to judge a rewrite by")
        if not error <= tol + _OWN_ERROR_FACTOR * own:
            return Comparison(False, worst, f"{plain.detail}; {error:.3g} from float64 on output {i} {shape}, "
                              f"where the model itself is {own:.3g} from it")
        own_worst = max(own_worst, own)
    return Comparison(True, worst, f"judged against float64: the model itself is {own_worst:.2g} from it")


class Float64Replay:
    """A graph's computation replayed in float64: the exact result that :func:`compare_exact` judges by.

    Takes a copy of ``gm``'s graph (later rewrites of ``gm`` do not reach it)
    with every floating dtype argument made float64, and references to the
    tensors it reads by ``get_attr``. A call runs it on float64 copies of
    those tensors and of its floating arguments, with float64 as the default
    dtype (submodules it calls, as an exported graph's guard function, run as
    they are); it raises where an op has no float64 kernel.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.graph = copy.deepcopy(gm.graph)
        self.attrs: dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):  # call_module: an exported graph's guard function
                value = gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                node.target = f"attr{len(self.attrs)}"
                self.attrs[node.target] = value
            node.args = fx.node.map_aggregate(node.args, _float64_dtype)
            node.kwargs = fx.node.map_aggregate(node.kwargs, _float64_dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        root = torch.nn.Module()
        for name, value in self.attrs.items():
            setattr(root, name, value if isinstance(value, torch.nn.Module) else _float64(value))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with torch.no_grad():
                return fx.GraphModule(root, self.graph)(*_float64(args), **_float64(kwargs))
        finally:
            torch.set_default_dtype(previous)


def _float64_dtype(value: Any) -> Any:
    return torch.float64 if isinstance(value, torch.dtype) and value.is_floating_point else value


def _float64(values: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().to(torch.float64, copy=True)
                           if isinstance(x, torch.Tensor) and x.is_floating_point() else x, values)
