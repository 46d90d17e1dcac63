"""The matching DSL: patterns are plain data.

* ``Var("x")`` captures any argument (a node or a literal); a name used twice
  must capture the same thing both times. ``Var()`` is a wildcard.
* ``Const("eps", pred)`` captures a literal (a Python number, bool or list).
* ``P.mul(a, b)`` matches a call of any overload of ``aten.mul`` whose
  arguments match ``a`` and ``b``; positional pattern arguments line up with
  the op's schema, keyword ones by name, so ``mean(x, [-1], True)`` and
  ``mean(x, dim=[-1], keepdim=True)`` are one pattern. ``add`` and ``mul``
  also match with their two operands swapped.
* ``a | b`` tries ``a``, then ``b``; ``maybe(P.to(x), x)`` spells an optional op.
* ``.bind("name")`` captures the matched node; ``.single_use()`` requires it
  to have exactly one user, so that fusing it duplicates no work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

COMMUTATIVE = {torch.ops.aten.add, torch.ops.aten.mul}


class Pattern:
    """Base of all patterns."""

    def __or__(self, other: "Pattern") -> "Alt":
        return Alt((self, other))


@dataclass(frozen=True)
class Var(Pattern):
    """Captures any argument under ``name`` (a wildcard if name is None)."""

    name: str | None = None
    pred: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class Const(Pattern):
    """Captures a literal argument (not a node) that satisfies ``pred``."""

    name: str | None = None
    pred: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class Op(Pattern):
    """A call of one of ``targets`` (op overload packets or overloads)."""

    targets: tuple[Any, ...]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    one_use: bool = False

    def bind(self, name: str) -> "Op":
        """The same pattern, capturing the matched node as ``name``."""
        return replace(self, name=name)

    def single_use(self) -> "Op":
        """The same pattern, matching only a node with exactly one user."""
        return replace(self, one_use=True)

    @property
    def commutative(self) -> bool:
        return len(self.args) >= 2 and all(t in COMMUTATIVE for t in self.targets)

    def describe(self) -> str:
        return "|".join(str(t).removeprefix("aten.") for t in self.targets)


@dataclass(frozen=True)
class Alt(Pattern):
    """The first of ``options`` that matches."""

    options: tuple[Pattern, ...]

    def __or__(self, other: Pattern) -> "Alt":
        return Alt((*self.options, other))


def maybe(op: Pattern, inner: Pattern) -> Alt:
    """``op`` (a pattern wrapping ``inner``) if present, else ``inner`` alone."""
    return Alt((op, inner))


class _OpBuilder:
    """``P.<aten op name>(*args, **kwargs)`` builds an ``Op`` pattern."""

    def __getattr__(self, name: str) -> Callable[..., Op]:
        packet = getattr(torch.ops.aten, name)

        def build(*args: Any, **kwargs: Any) -> Op:
            return Op((packet,), tuple(args), dict(kwargs))

        return build

    def any_of(self, names: list[str], *args: Any, **kwargs: Any) -> Op:
        """A call of any of the named aten ops, with the same argument patterns."""
        return Op(tuple(getattr(torch.ops.aten, n) for n in names), tuple(args), dict(kwargs))

    def cast(self, inner: Any) -> Op:
        """A dtype/device conversion of ``inner`` (``.to(...)`` in any overload, or ``_to_copy``)."""
        return self.any_of(["to", "_to_copy"], inner)


P = _OpBuilder()
