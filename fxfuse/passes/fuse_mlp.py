"""fuse-mlp: gated activations and GELU in their common spellings → fxfuse ops.

* ``gated_mlp``: ``act(gate) * up`` with act silu (SwiGLU), erf GELU or tanh
  GELU (GeGLU) → ``fxfuse.gated_mlp_act(gate, up, act)``;
* ``aten_gelu``: ``aten.gelu(x, approximate)`` → ``fxfuse.gelu``;
* ``tanh_gelu_by_hand``: ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``, the
  hand-written GELU of GPT-2-style code, → ``fxfuse.gelu(x, "tanh")``;
* ``erf_gelu_by_hand``: ``0.5·x·(1 + erf(x/√2))`` → ``fxfuse.gelu(x, "none")``.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import same_shape, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var

aten = torch.ops.aten


def _near(value: float, rel: float = 1e-6):
    """A constant equal to ``value`` up to float32 rounding of how models write it."""
    return lambda c: isinstance(c, (int, float)) and not isinstance(c, bool) and math.isclose(c, value, rel_tol=rel)


_x = Var("x")
_activation = (
    P.silu(Var("gate")).bind("act").single_use()
    | P.gelu(Var("gate"), approximate=Const("approximate")).bind("act").single_use()
)
GATED = P.mul(_activation, Var("up"))
ATEN_GELU = P.gelu(_x, approximate=Const("approximate"))
_inner = P.mul(P.add(_x, P.mul(P.pow(_x, 3), Const(pred=_near(0.044715)))), Const(pred=_near(math.sqrt(2 / math.pi))))
TANH_GELU = P.mul(P.mul(_x, Const(pred=_near(0.5))), P.add(P.tanh(_inner), Const(pred=_near(1.0))))
ERF_GELU = P.mul(
    P.mul(_x, Const(pred=_near(0.5))),
    P.add(P.erf(P.mul(_x, Const(pred=_near(1 / math.sqrt(2))))), Const(pred=_near(1.0))),
)


def _looks_gated(node: fx.Node) -> bool:
    return any(isinstance(a, fx.Node) and a.target in (aten.silu.default, aten.gelu.default) for a in node.args)


@rule(GATED, looks_like=_looks_gated)
def gated_mlp(m: Match, b: Builder) -> fx.Node | Reject:
    if m.act.target is aten.silu.default:
        activation = "silu"
    else:
        activation = "gelu_tanh" if m.approximate == "tanh" else "gelu"
    gate, up = tensor(m.gate), tensor(m.up)
    if gate is None or up is None or gate.dtype != up.dtype or not same_shape(gate, up):
        return Reject(f"gate {gate} and up {up} differ in shape or dtype", m.act)
    return b.call(OPS["gated_mlp_act"], m.gate, m.up, activation)


@rule(ATEN_GELU, looks_like=lambda node: True)
def aten_gelu(m: Match, b: Builder) -> fx.Node:
    return b.call(OPS["gelu"], m.x, m.approximate)


@rule(TANH_GELU)
def tanh_gelu_by_hand(m: Match, b: Builder) -> fx.Node:
    return b.call(OPS["gelu"], m.x, "tanh")


@rule(ERF_GELU)
def erf_gelu_by_hand(m: Match, b: Builder) -> fx.Node:
    return b.call(OPS["gelu"], m.x, "none")


fuse_mlp = RulePass([gated_mlp, tanh_gelu_by_hand, erf_gelu_by_hand, aten_gelu])
"""The fuse-mlp pass."""
