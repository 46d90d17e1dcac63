"""Finding the residual add in front of a norm, shared by the norm fusions."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.ir.meta import same_shape, tensor

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
