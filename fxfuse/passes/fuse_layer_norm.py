"""fuse-layer-norm: LayerNorm → fxfuse.layer_norm, with its residual add → fxfuse.add_layer_norm.

Two spellings:

* ``aten_layer_norm``: ``aten.layer_norm`` over the last dim;
* ``layer_norm_by_hand``: ``d = x - mean(x, -1); d / sqrt(mean(d², -1) + eps)``
  (or ``d · rsqrt(…)``), then optionally ``· w`` and ``+ b`` with w and b
  vectors over the last dim (the hand-written LayerNorm of older BERT code,
  ConvNeXt, …).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.ir.meta import size_is, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.residual import emit_norm
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var

LAYER_NORM = P.layer_norm(Var("x"), Var("shape"), Var("weight"), Var("bias"), Const("eps"))

_x = Var("x")
_centered = P.sub(_x, P.mean(_x, Const("dims"), True))
_inv_std = P.add(P.mean(P.pow(_centered, 2), Const("var_dims"), True).single_use(), Const("eps"))
_by_sqrt = P.div(_centered, P.sqrt(_inv_std).single_use()).bind("normed")
_by_rsqrt = P.mul(_centered, P.rsqrt(_inv_std).single_use()).bind("normed")
_scaled = P.mul(_by_sqrt.single_use() | _by_rsqrt.single_use(), Var("weight")).bind("scaled")
HAND_LAYER_NORM = P.add(_scaled.single_use(), Var("bias")) | _scaled | _by_sqrt | _by_rsqrt


@rule(LAYER_NORM, looks_like=lambda node: True)
def aten_layer_norm(m: Match, b: Builder) -> fx.Node | Reject:
    x = tensor(m.x)
    if len(m.shape) != 1 or not size_is(x.shape[-1], m.shape[0]):
        return Reject(f"normalizes over {list(m.shape)}, not the last dim alone")
    return emit_norm(b, m, m.x, "layer_norm", [m.weight, m.bias], float(m.eps))


def _is_vector_over_last_dim(node: object, x: torch.Tensor) -> bool:
    t = tensor(node)
    return t is not None and t.dim() == 1 and size_is(t.shape[0], x.shape[-1]) and t.dtype == x.dtype


@rule(HAND_LAYER_NORM)
def layer_norm_by_hand(m: Match, b: Builder) -> fx.Node | Reject | None:
    x = tensor(m.x)
    rank = x.dim()
    if any([d % rank for d in dims] != [rank - 1] for dims in (m.dims, m.var_dims)):
        return Reject("the mean is over dims other than the last alone", m.normed)
    params = [m.get("weight"), m.get("bias")]
    if any(p is not None and not _is_vector_over_last_dim(p, x) for p in params):
        return None  # not an affine LayerNorm here; the smaller match at the scale or the norm still applies
    if not isinstance(m.eps, (int, float)):
        return Reject(f"eps {m.eps} is not a constant", m.normed)
    return emit_norm(b, m, m.x, "layer_norm", params, float(m.eps))


fuse_layer_norm = RulePass([aten_layer_norm, layer_norm_by_hand])
"""The fuse-layer-norm pass."""
