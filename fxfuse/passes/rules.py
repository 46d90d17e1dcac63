"""Rules (a pattern plus a plain function) and the pass that applies them.

A rule function receives the ``Match`` and a ``Builder`` positioned at the
match root. It returns the node that replaces the root, a ``Reject`` with
the reason, or None when a closer look shows the match is not a candidate
at all (nothing to report). ``RulePass`` walks the graph from the outputs up (so the largest
pattern wins over its sub-patterns), applies the first rule that fires at
each node, erases what became dead, and repeats until nothing changes.
Rejections, and near misses at nodes a rule's ``looks_like`` flags as
candidates, are kept in the ``PassResult`` to answer "why was this not fused?".
A rule that raises is a rejection too, naming the rule, the node and the
exception, and the pass goes on (under ``fxfuse.errors.strict()`` it raises).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from fxfuse.errors import is_strict
from fxfuse.ir.meta import fake_mode_of, fill_attr_vals, same_shape, tensor
from fxfuse.ir.rewrite import Builder, erase_if_dead
from fxfuse.passes.manager import PassResult, Rejection
from fxfuse.patterns import Match, NoMatch, Pattern, match, node_root_key, root_targets


@dataclass
class Reject:
    """A rule's refusal: the reason, naming the node that made it refuse."""

    reason: str
    node: fx.Node | None = None


RuleFn = Callable[[Match, Builder], "fx.Node | Reject | None"]


@dataclass
class Rule:
    """A named pattern with the function that builds its replacement."""

    name: str
    pattern: Pattern
    fn: RuleFn
    looks_like: Callable[[fx.Node], bool] | None = None

    def __post_init__(self) -> None:
        self.roots = root_targets(self.pattern)


def rule(pattern: Pattern, *, looks_like: Callable[[fx.Node], bool] | None = None) -> Callable[[RuleFn], Rule]:
    """Decorator: turn ``fn(match, builder)`` into a ``Rule`` named after the function.

    ``looks_like(node)`` marks nodes where a failed match is worth reporting
    (e.g. a matmul fed by a softmax is attention-like); without it, near misses
    are not reported.
    """

    def wrap(fn: RuleFn) -> Rule:
        return Rule(fn.__name__, pattern, fn, looks_like)

    return wrap


def module_path(node: fx.Node) -> str:
    """The innermost ``nn.Module`` path the node was traced from, if known."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return str(path)


def _check_replacements(pairs: list[tuple[fx.Node, fx.Node]]) -> Reject | None:
    """Each replacement must produce what the node it replaces produced: same shape and dtype."""
    for old_node, new_node in pairs:
        old, new = tensor(old_node), tensor(new_node)
        if old is None or new is None or old.dtype != new.dtype or not same_shape(old, new):
            return Reject(f"replacement for {old_node.name} would produce {new} instead of {old}", old_node)
    return None


class RulePass:
    """A pass that applies ``rules`` until none fires."""

    def __init__(self, rules: list[Rule], max_sweeps: int = 8) -> None:
        self.rules = rules
        self.max_sweeps = max_sweeps

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        mode = fake_mode_of(gm)
        fill_attr_vals(gm, mode)
        result = PassResult(name="")
        for _ in range(self.max_sweeps):
            rejections: list[Rejection] = []
            fired = False
            for node in reversed(list(gm.graph.nodes)):
                if getattr(node, "_erased", False) or node.op != "call_function":
                    continue
                misses, replaced = self._apply_at(gm, mode, node, result)
                fired |= replaced
                if not replaced:
                    rejections.extend(misses)
            result.rejections = rejections
            if not fired:
                break
            result.changed = True
        return result

    def _apply_at(self, gm, mode, node: fx.Node, result: PassResult) -> tuple[list[Rejection], bool]:
        misses: list[Rejection] = []
        key = node_root_key(node)
        for r in self.rules:
            if key not in r.roots:
                continue
            builder = Builder(gm.graph, mode, node)
            try:
                m, out = self._try(r, node, builder)
            except Exception as e:
                if is_strict():
                    raise
                builder.discard()
                misses.append(Rejection(r.name, node.name, f"the rule raised {type(e).__name__}: {e}", module_path(node)))
                continue
            if isinstance(m, NoMatch):
                if r.looks_like is not None and r.looks_like(node):
                    misses.append(Rejection(r.name, node.name, f"no match: {m.reason}", module_path(node)))
                continue
            if out is None:
                builder.discard()
                continue
            if isinstance(out, Reject):
                builder.discard()
                at = out.node or node
                misses.append(Rejection(r.name, at.name, out.reason, module_path(at)))
                continue
            for action in builder.deferred:
                action()
            node.replace_all_uses_with(out)
            for old, new in builder.also:
                old.replace_all_uses_with(new)
            captured = [v for v in m.captures.values() if isinstance(v, fx.Node)]
            erase_if_dead([*m.nodes, *(old for old, _ in builder.also), *captured, *builder.consumed])
            result.rewrites[r.name] += 1
            return [], True
        return misses, False

    @staticmethod
    def _try(r: Rule, node: fx.Node, builder: Builder) -> tuple[Match | NoMatch, fx.Node | Reject | None]:
        """Match ``r`` at ``node`` and, on a match, build the replacement (checked against the node's value)."""
        m = match(r.pattern, node)
        if isinstance(m, NoMatch):
            return m, None
        out = r.fn(m, builder)
        if out is not None and not isinstance(out, Reject):
            out = _check_replacements([(node, out), *builder.also]) or out
        return m, out
