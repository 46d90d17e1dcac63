"""IR invariants, checked after every pass.

An fxfuse graph must: pass ``Graph.lint`` (topological order, valid
targets); call op overloads, not overload packets; carry a fake value on
every tensor-producing node; and have dialect ops whose stored fake value
agrees with what their fake implementation computes from their inputs now
(so a rewrite that wired the wrong tensor into a fused op is caught).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.errors import FxfuseError
from fxfuse.ir.dialect import is_dialect_op
from fxfuse.ir.meta import fake_mode_of, val


class VerificationError(FxfuseError, RuntimeError):
    """The graph breaks an IR invariant; the message names the node."""


def _agree(stored: object, fresh: object) -> bool:
    if isinstance(stored, torch.Tensor) and isinstance(fresh, torch.Tensor):
        return stored.dtype == fresh.dtype and stored.dim() == fresh.dim() and all(
            str(a) == str(b) for a, b in zip(stored.shape, fresh.shape)
        )
    if isinstance(stored, (tuple, list)) and isinstance(fresh, (tuple, list)):
        return len(stored) == len(fresh) and all(_agree(a, b) for a, b in zip(stored, fresh))
    return type(stored) is type(fresh)


def verify(gm: fx.GraphModule) -> None:
    """Raise ``VerificationError`` if ``gm`` breaks an fxfuse IR invariant."""
    try:
        gm.graph.lint()
    except Exception as e:  # lint raises bare RuntimeErrors
        raise VerificationError(f"graph lint failed: {e}") from e
    mode = None
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.OpOverloadPacket):
            raise VerificationError(f"node {node.name} calls the overload packet {node.target}; use an overload")
        if "val" not in node.meta:
            raise VerificationError(f"node {node.name} ({node.target}) has no meta['val']")
        if is_dialect_op(node.target):
            mode = mode or fake_mode_of(gm)
            args = fx.node.map_arg(node.args, val)
            kwargs = fx.node.map_arg(node.kwargs, val)
            try:
                with mode:
                    fresh = node.target(*args, **kwargs)
            except Exception as e:
                raise VerificationError(f"node {node.name} ({node.target}) rejects its inputs: {e}") from e
            if not _agree(node.meta["val"], fresh):
                raise VerificationError(
                    f"node {node.name} ({node.target}) records {node.meta['val']} "
                    f"but its inputs give {fresh}"
                )
