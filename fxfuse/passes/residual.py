"""The residual add in front of a norm: finding it and fusing it with the norm (shared by the norm passes)."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import same_shape, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.rules import Reject
from fxfuse.patterns import Match

aten = torch.ops.aten


def residual_operands(x: object) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) if ``x`` is ``a + b`` of two tensors of x's own shape and dtype, else None.

    Broadcasting adds (a bias, position embeddings of batch 1) are not a
    residual stream: fusing them would change which tensor the sum feeds.
    """
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is aten.add.Tensor):
        return None
    if len(x.args) != 2 or x.kwargs.get("alpha", 1) != 1:
        return None
    a, b = x.args
    out = tensor(x)
    ta, tb = tensor(a), tensor(b)
    if out is None or ta is None or tb is None:
        return None
    if not all(t.dtype == out.dtype and same_shape(t, out) for t in (ta, tb)):
        return None
    return a, b


def emit_norm(b: Builder, m: Match, x: fx.Node, name: str, params: list, eps: float) -> fx.Node | Reject:
    """``fxfuse.<name>(x, *params, eps)``, or ``fxfuse.add_<name>`` when x is a residual sum.

    The fused op goes right after the last of its inputs (a Gemma-style
    ``1 + w`` scale can be computed after the residual add), so the sum it
    hands to the rest of the residual stream must not be read any earlier
    than that, except by the nodes this rewrite removes.
    """
    residual = residual_operands(x)
    if residual is None:
        return b.call(OPS[name], x, *params, eps)
    inputs = [n for n in (*residual, *params) if isinstance(n, fx.Node)]
    order = {n: i for i, n in enumerate(b.graph.nodes)}
    at = max(inputs, key=order.__getitem__).next
    removed = set(m.nodes) | {
        v for v in m.captures.values() if isinstance(v, fx.Node) and v.users and set(v.users) <= set(m.nodes)
    }
    early = [u for u in x.users if order[u] < order[at] and u not in removed]
    if early:
        return Reject(f"{early[0].name} reads the residual sum before the norm's inputs are ready", x)
    with b.before(at):
        fused = b.call(OPS[f"add_{name}"], *residual, *params, eps)
        b.also_replace(x, b.item(fused, 1))
        return b.item(fused, 0)
