"""cse: one node for each pure computation that appears more than once."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxfuse.passes.manager import PassResult


def _is_pure(node: fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    return False


def _key(value: Any) -> Any:
    """A hashable stand-in for an argument (nodes by identity, lists as tuples)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float):
        return ("float", value)
    return value


def cse(gm: fx.GraphModule) -> PassResult:
    """Merge calls of the same deterministic op on the same arguments."""
    result = PassResult(name="cse")
    seen: dict[Any, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if not _is_pure(node):
            continue
        try:
            key = (node.target, _key(node.args), _key(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            result.rewrites["duplicate"] += 1
        else:
            seen[key] = node
    result.changed = sum(result.rewrites.values()) > 0
    return result
