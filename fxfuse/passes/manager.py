"""Running an ordered pipeline of passes, verifying and validating after each.

A pass is a callable ``pass_(gm) -> PassResult`` that edits ``gm.graph`` in
place. The manager times it, runs the IR verifier, and (when asked) runs the
graph on the example inputs and compares with the reference outputs. A pass
that breaks either check raises an error that names it and the passes before
it, or, with ``on_failure="skip"``, is rolled back and recorded as skipped.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.fx as fx

from fxfuse.ir.numerics import compare
from fxfuse.ir.verify import VerificationError, verify


@dataclass
class Rejection:
    """A block a rule matched structurally but refused (or nearly matched), and why."""

    rule: str
    node: str
    reason: str
    module: str = ""

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        return f"{self.rule} at {self.node}{where}: {self.reason}"


@dataclass
class PassResult:
    """What one pass did: rewrites per rule, rejections, sizes, time, outcome."""

    name: str
    changed: bool = False
    rewrites: Counter = field(default_factory=Counter)
    rejections: list[Rejection] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    skipped: bool = False
    error: str | None = None
    max_error: float | None = None


Pass = Callable[[fx.GraphModule], PassResult]


class PassFailure(RuntimeError):
    """A pass broke the graph or its numerics; the message names the pass."""

    def __init__(self, message: str, result: PassResult) -> None:
        super().__init__(message)
        self.result = result


class NumericsError(PassFailure):
    """A pass changed the graph's outputs beyond the dtype's tolerance."""


@dataclass
class _Snapshot:
    graph: fx.Graph
    # Every module's own parameter, buffer and submodule tables (shallow copies):
    # passes add merged weights and delete dead ones, possibly in submodules.
    tables: list[tuple[torch.nn.Module, dict, dict, dict]]


def _snapshot(gm: fx.GraphModule) -> _Snapshot:
    tables = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in gm.modules()]
    return _Snapshot(copy.deepcopy(gm.graph), tables)


def _restore(gm: fx.GraphModule, snap: _Snapshot) -> None:
    for module, parameters, buffers, modules in snap.tables:
        module._parameters, module._buffers, module._modules = dict(parameters), dict(buffers), dict(modules)
    gm.graph = snap.graph
    gm.recompile()


def _count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


class PassManager:
    """Runs passes in order over a graph module.

    ``example`` is ``(args, kwargs)`` to call the graph module with and
    ``reference`` its expected outputs; both are needed when ``validate``.
    """

    def __init__(
        self,
        passes: list[tuple[str, Pass]],
        *,
        verify_each: bool = True,
        validate: bool = True,
        on_failure: Literal["raise", "skip"] = "raise",
    ) -> None:
        if on_failure not in ("raise", "skip"):
            raise ValueError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}")
        self.passes = passes
        self.verify_each = verify_each
        self.validate = validate
        self.on_failure = on_failure

    def run(
        self,
        gm: fx.GraphModule,
        example: tuple[tuple, dict] | None = None,
        reference: Any = None,
    ) -> list[PassResult]:
        """Run every pass on ``gm`` in place; return one ``PassResult`` per pass."""
        if self.validate and example is None:
            raise ValueError("validate=True needs the example inputs and reference outputs")
        results: list[PassResult] = []
        for name, pass_ in self.passes:
            snap = _snapshot(gm)
            before = _count_nodes(gm)
            start = time.perf_counter()
            result = pass_(gm)
            gm.recompile()
            result.name = name
            result.seconds = time.perf_counter() - start
            result.nodes_before, result.nodes_after = before, _count_nodes(gm)
            results.append(result)
            failure = self._check(gm, result, example, reference)
            if failure is None:
                continue
            kind, message = failure
            ran = ", ".join(r.name for r in results[:-1]) or "none"
            full = f"pass {name!r} {message} (passes run before it: {ran})"
            result.error = message
            if self.on_failure == "raise":
                raise kind(full, result)
            _restore(gm, snap)
            result.skipped = True
            result.changed = False
            result.nodes_after = before
        return results

    def _check(self, gm, result, example, reference) -> tuple[type[PassFailure], str] | None:
        if self.verify_each:
            try:
                verify(gm)
            except VerificationError as e:
                return PassFailure, f"broke the graph: {e}"
        if self.validate and result.changed:
            args, kwargs = example
            try:
                with torch.no_grad():
                    outputs = gm(*args, **kwargs)
            except Exception as e:
                return PassFailure, f"left a graph that fails to run: {type(e).__name__}: {e}"
            outcome = compare(reference, outputs)
            result.max_error = outcome.max_error
            if not outcome.ok:
                return NumericsError, f"changed the model's outputs: {outcome.detail}"
        return None
