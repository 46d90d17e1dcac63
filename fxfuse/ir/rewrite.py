"""Editing the graph: inserting ops with their fake values, erasing dead nodes."""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fxfuse.ir.meta import propagate, size_is, tensor

_KEPT_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


class Builder:
    """Inserts new nodes before ``anchor``, each with its ``meta["val"]`` computed.

    The new nodes inherit the anchor's source location, so a fused op still
    points at the model code it came from.
    """

    def __init__(self, graph: fx.Graph, mode: FakeTensorMode, anchor: fx.Node) -> None:
        self.graph = graph
        self.mode = mode
        self.anchor = anchor
        self.source = anchor
        self.created: list[fx.Node] = []
        self.also: list[tuple[fx.Node, fx.Node]] = []
        self.consumed: list[fx.Node] = []
        self.deferred: list[Callable[[], None]] = []

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` before the anchor and return its node."""
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), dict(kwargs))
        for key in _KEPT_META:
            if key in self.source.meta:
                node.meta[key] = self.source.meta[key]
        self.created.append(node)
        propagate(node, self.mode)
        return node

    def also_replace(self, old: fx.Node, new: fx.Node) -> None:
        """Ask for ``old``'s uses to go to ``new`` too, once the rewrite is accepted.

        For fused ops with several outputs (a fused residual add hands its sum
        to the rest of the residual stream).
        """
        self.also.append((old, new))

    def consume(self, *nodes: fx.Node) -> None:
        """Mark nodes the rewrite makes dead beyond the matched ones (erased with their dead inputs)."""
        self.consumed.extend(nodes)

    def defer(self, action: Callable[[], None]) -> None:
        """Run ``action`` (an edit of nodes outside the match) only once the rewrite is accepted."""
        self.deferred.append(action)

    def discard(self) -> None:
        """Erase every node this builder inserted (for a replacement that was refused)."""
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
        self.created.clear()

    @contextmanager
    def before(self, node: fx.Node) -> Iterator[None]:
        """Insert before ``node`` instead of the anchor inside this block.

        For a fused op that must sit elsewhere than the match root: after all
        its inputs and before the first user of a result it takes over (a
        residual sum handed on to the rest of the stream).
        """
        anchor, self.anchor = self.anchor, node
        try:
            yield
        finally:
            self.anchor = anchor

    def item(self, node: fx.Node, index: int) -> fx.Node:
        """``node[index]`` for an op with several outputs."""
        return self.call(operator.getitem, node, index)


def erase_if_dead(nodes: Iterable[fx.Node]) -> int:
    """Erase the given nodes that nothing uses any more, and inputs that become dead with them; returns how many."""
    erased = 0
    pending = [n for n in dict.fromkeys(nodes) if not getattr(n, "_erased", False)]
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            # A matched random op (SDPA with dropout_p=0 is tagged random) was proven
            # replaceable by the rule, so only true side effects keep a node alive.
            if not node.users and node.op == "call_function" and not node.is_impure(impure_random=False):
                inputs = node.all_input_nodes
                node.graph.erase_node(node)
                pending.remove(node)
                pending += [i for i in inputs if i not in pending]
                erased += 1
                changed = True
    return erased



aten = torch.ops.aten

# Ops that read only the shape, dtype or device of one argument (by position), never its values.
_SHAPE_READS: dict[Any, int] = {
    aten.sym_size.int: 0, aten.expand_as.default: 1, aten.type_as.default: 1,
    aten.new_zeros.default: 0, aten.new_ones.default: 0, aten.new_empty.default: 0, aten.new_full.default: 0,
    aten.zeros_like.default: 0, aten.ones_like.default: 0, aten.empty_like.default: 0, aten.full_like.default: 0,
}
_FACTORIES = {
    aten.new_zeros.default: aten.zeros.default, aten.zeros_like.default: aten.zeros.default,
    aten.new_ones.default: aten.ones.default, aten.ones_like.default: aten.ones.default,
    aten.new_empty.default: aten.empty.memory_format, aten.empty_like.default: aten.empty.memory_format,
    aten.new_full.default: aten.full.default, aten.full_like.default: aten.full.default,
}

_NEW = (aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default)


def reads_only_shape(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` reads only the shape, dtype or device of ``node``, never its values."""
    at = _SHAPE_READS.get(user.target)
    if at is None or len(user.args) <= at or user.args[at] is not node:
        return False
    return sum(1 for n in user.all_input_nodes if n is node) == 1 and node not in [
        *user.args[:at], *user.args[at + 1:], *user.kwargs.values()
    ]


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (shape-only readers such as ``expand_as`` left out)."""
    return [u for u in node.users if not reads_only_shape(u, node)]


def detach_shape_readers(nodes: Iterable[fx.Node], sources: list[fx.Node], b: Builder) -> fx.Node | None:
    """Arrange for the shape-only readers of ``nodes`` to stop reading them, once the rewrite is accepted.

    Each reader is rebuilt from sizes alone (``expand_as(x, s)`` →
    ``expand(x, sizes)``, ``s.new_zeros(n)`` → ``zeros(n)``, ``sym_size(s, d)``
    → the size), its symbolic sizes read from ``sources``: tensors defined
    before every reader, with a provably equal dim. Returns the first node
    with a dim no source provides (nothing is arranged then), else None.
    """
    plans = []
    for node in nodes:
        readers = [u for u in node.users if reads_only_shape(u, node)]
        if not readers:
            continue
        sizes = _size_sources(tensor(node), sources)
        if sizes is None:
            return node
        plans.append((node, readers, sizes))

    def apply() -> None:
        for node, readers, plan in plans:
            for user in readers:
                with b.before(user):
                    sizes = [p if isinstance(p, int) else b.call(aten.sym_size.int, *p) for p in plan]
                    _replace(user, _rebuilt(user, tensor(node), sizes, b))

    if plans:
        b.defer(apply)
    return None


def _size_sources(value: torch.Tensor | None, sources: list[fx.Node]) -> list | None:
    """For each dim of ``value``: its int size, or (source, dim) with a provably equal size; None if one has none."""
    if value is None:
        return None
    plan: list = []
    for size in value.shape:
        if isinstance(size, int):
            plan.append(size)
            continue
        found = next(((src, j) for src in sources if tensor(src) is not None
                      for j, other in enumerate(tensor(src).shape) if size_is(other, size)), None)
        if found is None:
            return None
        plan.append(found)
    return plan


def _rebuilt(user: fx.Node, value: torch.Tensor, sizes: list, b: Builder) -> Any:
    """What ``user`` computes, from ``value``'s sizes, dtype and device instead of the tensor."""
    target = user.target
    if target is aten.sym_size.int:
        return sizes[user.args[1]]
    if target is aten.expand_as.default:
        return b.call(aten.expand.default, user.args[0], sizes)
    if target is aten.type_as.default:
        return b.call(aten.to.dtype, user.args[0], value.dtype)
    shape = user.args[1] if target in _NEW else sizes
    fill = user.args[2:3] if target in (aten.new_full.default, aten.full_like.default) else ()
    kwargs = {"dtype": user.kwargs.get("dtype") or value.dtype, "device": user.kwargs.get("device") or value.device}
    return b.call(_FACTORIES[target], shape, *fill, **kwargs)


def _replace(node: fx.Node, new: Any) -> None:
    """Point every use of ``node`` at ``new`` (a node or a plain int) and erase ``node``."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: new if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: new if a is node else a)
    node.graph.erase_node(node)
