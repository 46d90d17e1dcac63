"""Running an ordered pipeline of passes, verifying and validating after each.

A pass is a callable ``pass_(gm) -> PassResult`` that edits ``gm.graph`` in
place. The manager times it, runs the IR verifier, and (when asked) runs the
graph on the example inputs and compares with the reference outputs. A pass
that breaks either check raises an error that names it and the passes before
it, or, with ``on_failure="skip"``, is rolled back and recorded as skipped.
Validation runs on the example and on every probe (``fxfuse.ir.inputs``):
inputs with padded masks and other shapes that a benign example cannot
stand in for. A pass that raises is treated like one that broke the graph
(under ``fxfuse.errors.strict()`` its exception propagates).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.fx as fx

from fxfuse.errors import FxfuseError, InputError, is_strict
from fxfuse.ir.inputs import Probe
from fxfuse.ir.numerics import compare, compare_exact
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
    validated_on: list[str] = field(default_factory=list)


Pass = Callable[[fx.GraphModule], PassResult]


class PassFailure(FxfuseError, RuntimeError):
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


Call = Callable[[Callable, tuple, dict], Any]
"""How validation runs a program on a case's inputs: ``call(program, args, kwargs)``."""


def plain_call(program: Callable, args: tuple, kwargs: dict) -> Any:
    """``program(*args, **kwargs)``: the default way validation runs a program."""
    return program(*args, **kwargs)


class PassManager:
    """Runs passes in order over a graph module.

    ``example`` is ``(args, kwargs)`` to call the graph module with and
    ``reference`` its expected outputs; both are needed when ``validate``.
    ``call`` runs a program on a case for validation (default: a plain call;
    the torch.compile backend copies inputs the graph writes to and fixes the
    random seed, so that dropout draws alike).
    """

    def __init__(
        self,
        passes: list[tuple[str, Pass]],
        *,
        verify_each: bool = True,
        validate: bool = True,
        on_failure: Literal["raise", "skip"] = "raise",
        call: Call = plain_call,
    ) -> None:
        if on_failure not in ("raise", "skip"):
            raise InputError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}")
        self.passes = passes
        self.verify_each = verify_each
        self.validate = validate
        self.on_failure = on_failure
        self.call = call

    def run(
        self,
        gm: fx.GraphModule,
        example: tuple[tuple, dict] | None = None,
        reference: Any = None,
        *,
        probes: Sequence[Probe] = (),
        float64: Callable[[], Any] | None = None,
    ) -> list[PassResult]:
        """Run every pass on ``gm`` in place; return one ``PassResult`` per pass.

        ``example`` is ``(args, kwargs)`` with the model's outputs ``reference``
        (and ``float64`` computing them in float64: :class:`~fxfuse.ir.inputs.Probe`);
        ``probes`` are further inputs with their reference outputs.
        """
        if self.validate and example is None:
            raise InputError("validate=True needs the example inputs and reference outputs")
        cases = [] if example is None else [Probe("example", *example, reference, float64), *probes]
        results: list[PassResult] = []
        for name, pass_ in self.passes:
            snap = _snapshot(gm)
            before = _count_nodes(gm)
            start = time.perf_counter()
            try:
                result = pass_(gm)
                gm.recompile()
                failure = None
            except Exception as e:
                if is_strict():
                    raise
                result, failure = PassResult(name), (PassFailure, f"raised {type(e).__name__}: {e}")
            result.name = name
            result.seconds = time.perf_counter() - start
            result.nodes_before, result.nodes_after = before, _count_nodes(gm)
            results.append(result)
            failure = failure or self._check(gm, result, cases)
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
        # A block one rule refused and a later pass fused (or that became dead) is not a miss.
        alive = {node.name for node in gm.graph.nodes}
        for result in results:
            result.rejections = [r for r in result.rejections if r.node in alive]
        return results

    def _check(self, gm, result, cases: list[Probe]) -> tuple[type[PassFailure], str] | None:
        if self.verify_each:
            try:
                verify(gm)
            except VerificationError as e:
                return PassFailure, f"broke the graph: {e}"
        if self.validate and result.changed:
            return validate_on(gm, cases, result, self.call)
        return None


def validate_on(program: Callable, cases: Sequence[Probe], result: PassResult,
                call: Call = plain_call) -> tuple[type[PassFailure], str] | None:
    """Run ``program`` on every case (through ``call``) and compare with its reference; the first failure, or None.

    Where the outputs differ by more than the tolerance and the case has a
    float64 result, they are judged against it
    (:func:`~fxfuse.ir.numerics.compare_exact`). Records the worst error
    (against the float32 reference) and the labels of the cases in ``result``.
    """
    result.max_error = 0.0
    for case in cases:
        try:
            with torch.no_grad():
                outputs = call(program, case.args, case.kwargs)
        except Exception as e:
            return PassFailure, f"left a graph that fails to run on the {case.label} input: {type(e).__name__}: {e}"
        outcome = compare(case.reference, outputs)
        if not outcome.ok and case.exact() is not None:
            outcome = compare_exact(case.reference, outputs, case.exact())
        result.max_error = max(result.max_error, outcome.max_error)
        if not outcome.ok:
            return NumericsError, f"changed the model's outputs on the {case.label} input: {outcome.detail}"
        result.validated_on.append(f"{case.label} ({outcome.detail})" if outcome.detail else case.label)
    return None
