"""Matching a pattern against the fx graph, with the reason a match failed.

``match(pattern, node)`` returns a ``Match`` (the captures) or a
``NoMatch`` that says where the deepest attempt broke off, which is what
"why was this block not fused?" reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx

from fxfuse.patterns.dsl import Alt, Const, Op, Pattern, Var


@dataclass
class Match:
    """A successful match: the captures by name, the root and every matched op node."""

    root: fx.Node
    captures: dict[str, Any]
    nodes: list[fx.Node]

    def __getattr__(self, name: str) -> Any:
        captures = self.__dict__.get("captures", {})
        if name in captures:
            return captures[name]
        raise AttributeError(f"pattern has no capture named {name!r}")

    def get(self, name: str, default: Any = None) -> Any:
        """The capture ``name``, or ``default`` when an optional part did not bind it."""
        return self.captures.get(name, default)


@dataclass
class NoMatch:
    """Why the pattern did not match: the deepest point an attempt reached."""

    reason: str
    node: fx.Node | None = None
    depth: float = -1


@dataclass
class _State:
    captures: dict[str, Any]
    nodes: list[fx.Node] = field(default_factory=list)


def _op_arguments(node: fx.Node) -> tuple[list[Any], dict[str, Any]]:
    """The node's arguments as (positional list in schema order, all by name)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return list(node.args), dict(node.kwargs)
    named: dict[str, Any] = {}
    positional: list[Any] = []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            value = node.args[i]
        elif arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
        else:
            value = None
        named[arg.name] = value
        positional.append(value)
    return positional, named


def _target_matches(op: Op, target: Any) -> bool:
    packet = getattr(target, "overloadpacket", None)
    return any(t is target or t is packet for t in op.targets)


class _Matcher:
    def __init__(self) -> None:
        self.failure = NoMatch("no attempt")

    def fail(self, reason: str, node: fx.Node | None, depth: float) -> None:
        if depth > self.failure.depth:
            self.failure = NoMatch(reason, node, depth)

    def bind(self, name: str | None, value: Any, state: _State, depth: int) -> Iterator[_State]:
        if name is None:
            yield state
            return
        if name in state.captures:
            if state.captures[name] is value or (
                not isinstance(value, fx.Node) and state.captures[name] == value
            ):
                yield state
            else:
                self.fail(f"{name!r} is bound to {state.captures[name]} but here is {value}", None, depth)
            return
        yield _State({**state.captures, name: value}, state.nodes)

    def match(self, pattern: Any, value: Any, state: _State, depth: int) -> Iterator[_State]:
        if isinstance(pattern, Var):
            if pattern.pred is None or pattern.pred(value):
                yield from self.bind(pattern.name, value, state, depth)
            else:
                self.fail(f"{value} fails the check on {pattern.name or 'a wildcard'}", None, depth)
        elif isinstance(pattern, Const):
            if isinstance(value, fx.Node):
                self.fail(f"expected a constant for {pattern.name!r}, found node {value.name}", value, depth)
            elif pattern.pred is not None and not pattern.pred(value):
                self.fail(f"constant {pattern.name!r} = {value!r} fails its check", None, depth)
            else:
                yield from self.bind(pattern.name, value, state, depth)
        elif isinstance(pattern, Alt):
            for option in pattern.options:
                yield from self.match(option, value, state, depth)
        elif isinstance(pattern, Op):
            yield from self.match_op(pattern, value, state, depth)
        elif isinstance(pattern, (list, tuple)):
            if isinstance(value, (list, tuple)) and len(value) == len(pattern):
                yield from self.match_seq(list(pattern), list(value), state, depth)
            else:
                self.fail(f"expected a list like {pattern}, found {value}", None, depth)
        elif isinstance(value, fx.Node) or value != pattern:
            self.fail(f"expected {pattern!r}, found {value}", value if isinstance(value, fx.Node) else None, depth)
        else:
            yield state

    def match_seq(self, patterns: list[Any], values: list[Any], state: _State, depth: int) -> Iterator[_State]:
        if not patterns:
            yield state
            return
        for s in self.match(patterns[0], values[0], state, depth):
            yield from self.match_seq(patterns[1:], values[1:], s, depth)

    def match_op(self, op: Op, value: Any, state: _State, depth: int) -> Iterator[_State]:
        if not isinstance(value, fx.Node) or value.op != "call_function" or not _target_matches(op, value.target):
            found = value.target if isinstance(value, fx.Node) else repr(value)
            where = value.name if isinstance(value, fx.Node) else "argument"
            self.fail(f"expected {op.describe()} at {where}, found {found}", value if isinstance(value, fx.Node) else None, depth)
            return
        if op.one_use and len(value.users) != 1:
            users = ", ".join(u.name for u in value.users)
            # The op itself matched, so this says more than a wrong op at the same depth.
            self.fail(f"{value.name} is also used by other nodes ({users}); fusing would compute it twice", value, depth + 0.5)
            return
        positional, named = _op_arguments(value)
        if len(op.args) > len(positional) or any(k not in named for k in op.kwargs):
            self.fail(f"{value.name} has fewer arguments than the pattern", value, depth)
            return
        orders = [list(op.args)]
        if op.commutative and named.get("alpha", 1) == 1:
            orders.append([op.args[1], op.args[0], *op.args[2:]])
        for args in orders:
            patterns = args + list(op.kwargs.values())
            values = positional[: len(args)] + [named[k] for k in op.kwargs]
            for s in self.match_seq(patterns, values, state, depth + 1):
                s = _State(s.captures, [*s.nodes, value])
                yield from self.bind(op.name, value, s, depth)


def match(pattern: Pattern, node: fx.Node) -> Match | NoMatch:
    """Match ``pattern`` rooted at ``node``; the first consistent match wins."""
    matcher = _Matcher()
    for state in matcher.match(pattern, node, _State({}), 0):
        return Match(node, state.captures, list(dict.fromkeys(state.nodes)))
    return matcher.failure


def root_targets(pattern: Pattern) -> set[Any]:
    """The op packets a pattern's root can be (used to pick candidate nodes fast).

    Raises ValueError for a pattern whose root may be something other than an
    op call (a bare ``Var`` among the root alternatives): a rule needs an op root.
    """
    if isinstance(pattern, Op):
        return {getattr(t, "overloadpacket", t) for t in pattern.targets}
    if isinstance(pattern, Alt):
        return set().union(*(root_targets(p) for p in pattern.options))
    raise ValueError(f"a rule's pattern must be rooted at an op call, not {pattern!r}")


def node_root_key(node: fx.Node) -> Any:
    """The key ``root_targets`` uses for a node: its op packet (or the target itself)."""
    target = node.target
    return getattr(target, "overloadpacket", target) if isinstance(target, torch._ops.OpOverload) else target
