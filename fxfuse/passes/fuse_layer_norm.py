"""fuse-layer-norm: aten.layer_norm → fxfuse.layer_norm, with its residual add → fxfuse.add_layer_norm."""

from __future__ import annotations

import torch.fx as fx

from fxfuse.ir.meta import size_is, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.residual import emit_norm
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var

LAYER_NORM = P.layer_norm(Var("x"), Var("shape"), Var("weight"), Var("bias"), Const("eps"))


@rule(LAYER_NORM, looks_like=lambda node: True)
def layer_norm(m: Match, b: Builder) -> fx.Node | Reject:
    x = tensor(m.x)
    if len(m.shape) != 1 or not size_is(x.shape[-1], m.shape[0]):
        return Reject(f"normalizes over {list(m.shape)}, not the last dim alone")
    return emit_norm(b, m, m.x, "layer_norm", [m.weight, m.bias], float(m.eps))


fuse_layer_norm = RulePass([layer_norm])
"""The fuse-layer-norm pass."""
