"""fuse-rms-norm: w · cast(x · rsqrt(mean(x², -1) + eps)) → fxfuse.rms_norm, with its residual add.

The float32 upcast of LLaMA-family norms (``x.to(float32)`` in, ``.to(dtype)``
out) is part of the pattern: it is exactly fxfuse.rms_norm's semantics.
``aten.rms_norm`` (``nn.RMSNorm``, ``F.rms_norm``) is fused too.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.ir.meta import size_is, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.residual import emit_norm
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var, maybe

aten = torch.ops.aten

_xf = Var("xf")
_normed = P.mul(
    _xf, P.rsqrt(P.add(P.mean(P.pow(_xf, 2), Const("dims"), True), Const("eps"))).single_use()
).bind("normed")
WEIGHTED = P.mul(Var("weight"), maybe(P.cast(_normed).bind("cast").single_use(), _normed))
PLAIN = _normed
ATEN_RMS = P.rms_norm(Var("x"), Var("shape"), Var("weight"), Var("eps"))


def _last_dim_only(m: Match) -> Reject | None:
    rank = tensor(m.xf).dim()
    if [d % rank for d in m.dims] != [rank - 1]:
        return Reject(f"mean over dims {list(m.dims)}, not the last dim alone", m.normed)
    return None


def _source_dtype_input(m: Match) -> fx.Node | Reject:
    """The norm's input x, such that the casts around the math are exactly x→float32→x.dtype."""
    cast = m.get("cast")
    if cast is None:
        return m.xf
    xf = m.xf
    if not (isinstance(xf, fx.Node) and xf.target in (aten.to.dtype, aten._to_copy.default)):
        return Reject("the norm casts its result without upcasting its input", cast)
    x = xf.args[0]
    if tensor(x).dtype != tensor(cast).dtype or tensor(xf).dtype != torch.float32:
        return Reject(f"casts {tensor(x).dtype}→{tensor(xf).dtype}→{tensor(cast).dtype} are not an fp32 upcast", cast)
    return x


def _is_centered(x: object) -> bool:
    """``x - mean(x, ...)``: the RMS of a centered tensor is a LayerNorm, which fuse-layer-norm takes."""
    if not (isinstance(x, fx.Node) and x.target is aten.sub.Tensor):
        return False
    mean = x.args[1]
    return isinstance(mean, fx.Node) and mean.target is aten.mean.dim and mean.args[0] is x.args[0]


def _looks_like_rms(node: fx.Node) -> bool:
    return any(
        isinstance(a, fx.Node) and a.target is aten.rsqrt.default
        for n in [node, *node.all_input_nodes]
        for a in n.all_input_nodes
    )


@rule(WEIGHTED, looks_like=_looks_like_rms)
def rms_norm_weighted(m: Match, b: Builder) -> fx.Node | Reject | None:
    if _is_centered(m.xf):
        return None
    if (bad := _last_dim_only(m)) is not None:
        return bad
    w = tensor(m.weight)
    if w is None or w.dim() != 1 or not size_is(w.shape[0], tensor(m.xf).shape[-1]):
        return Reject(f"the scale {m.weight} is not a vector over the normalized dim", m.normed)
    x = _source_dtype_input(m)
    if isinstance(x, Reject):
        return x
    return emit_norm(b, m, x, "rms_norm", [m.weight], float(m.eps))


@rule(PLAIN, looks_like=_looks_like_rms)
def rms_norm_plain(m: Match, b: Builder) -> fx.Node | Reject | None:
    if _is_centered(m.xf):
        return None
    if (bad := _last_dim_only(m)) is not None:
        return bad
    return emit_norm(b, m, m.xf, "rms_norm", [None], float(m.eps))


@rule(ATEN_RMS, looks_like=lambda node: True)
def aten_rms_norm(m: Match, b: Builder) -> fx.Node | Reject:
    x = tensor(m.x)
    if len(m.shape) != 1 or not size_is(x.shape[-1], m.shape[0]):
        return Reject(f"normalizes over {list(m.shape)}, not the last dim alone")
    if m.eps is None:
        return Reject("eps is left to the dtype's default; fxfuse.rms_norm needs it explicit")
    return emit_norm(b, m, m.x, "rms_norm", [m.weight], float(m.eps))


fuse_rms_norm = RulePass([rms_norm_weighted, rms_norm_plain, aten_rms_norm])
"""The fuse-rms-norm pass."""
