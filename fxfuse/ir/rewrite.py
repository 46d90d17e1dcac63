"""Editing the graph: inserting ops with their fake values, erasing dead nodes."""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fxfuse.ir.meta import propagate

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
