"""Reading and propagating ``node.meta["val"]``: the fake tensor of every node.

Every node of an fxfuse graph carries a fake tensor (shape, dtype, device,
with symbolic sizes for dynamic dims). New nodes get theirs by running the
op's fake implementation on the fake values of their inputs.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import statically_known_true


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    """The fake mode that produced the graph's fake values (one per captured graph).

    Read off the values themselves: inside a torch.compile backend,
    ``detect_fake_mode`` would return the tracing context's mode, another one.
    """
    for node in gm.graph.nodes:
        for value in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(value, FakeTensor):
                return value.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def attr_of(gm: fx.GraphModule, target: str) -> Any:
    """The module attribute a ``get_attr`` node reads (dotted path)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def val(node: Any) -> Any:
    """The fake value of an fx argument: a node's ``meta["val"]``, or the literal itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return node


def tensor(node: Any) -> torch.Tensor | None:
    """The fake tensor of ``node``, or None if it is not a tensor-valued node."""
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def fill_attr_vals(gm: fx.GraphModule, mode: FakeTensorMode) -> None:
    """Give every ``get_attr`` node of a tensor the fake value of that tensor."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "val" not in node.meta:
            value = attr_of(gm, node.target)
            if isinstance(value, torch.Tensor):
                node.meta["val"] = mode.from_tensor(value, static_shapes=True)


def propagate(node: fx.Node, mode: FakeTensorMode) -> Any:
    """Compute and store ``node.meta["val"]`` by running the op on its inputs' fake values."""
    args = fx.node.map_arg(node.args, val)
    kwargs = fx.node.map_arg(node.kwargs, val)
    if node.target is operator.getitem:
        result = args[0][args[1]]
    else:
        with mode:
            result = node.target(*args, **kwargs)
    node.meta["val"] = result
    return result


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two (possibly symbolic) shapes are provably equal."""
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def size_is(size: Any, expected: Any) -> bool:
    """True when a (possibly symbolic) size provably equals ``expected``."""
    return bool(statically_known_true(size == expected))
