"""optimize(): capture → pass pipeline → back end → OptimizedModule."""

from __future__ import annotations

import functools
import time
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxfuse.codegen import lower, resolve_backend
from fxfuse.errors import InputError, is_strict
from fxfuse.ir.capture import CaptureError, capture
from fxfuse.ir.inputs import Probe, derive_probes, grown_sizes, input_name, standalone
from fxfuse.ir.numerics import Float64Replay, compare
from fxfuse.passes import PassManager, default_pipeline, resolve
from fxfuse.passes.manager import NumericsError, PassResult, validate_on
from fxfuse.report import Report, count_dialect_ops


class OptimizedModule(nn.Module):
    """The optimized model: called exactly like the original, same outputs.

    ``graph_module`` is the optimized ``torch.fx.GraphModule`` (fused nodes
    call ``torch.ops.fxfuse.*``); ``report`` says what was done;
    ``fixed_kwargs`` are the non-tensor kwargs the graph was captured with
    (``use_cache=False`` for Hugging Face decoders), filled in when omitted.
    ``program`` is the graph lowered for the back end, which is what runs
    (reading its parameters through ``graph_module``). ``static_dims`` maps
    an input (its path in the call's arguments) to the dims the graph only
    accepts at one size; other sizes there raise ``InputError``.
    """

    def __init__(self, graph_module: fx.GraphModule, report: Report, fixed_kwargs: dict[str, Any],
                 program: Any = None, static_dims: dict[str, dict[int, int]] | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.fixed_kwargs = fixed_kwargs
        self.program = program
        self.static_dims = static_dims or {}
        # An inference graph (export's module refuses train()/eval() calls).
        self.training = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, value in self.fixed_kwargs.items():
            if name in kwargs and kwargs[name] != value:
                raise InputError(
                    f"this module was optimized with {name}={value!r}; it cannot run with "
                    f"{name}={kwargs[name]!r}. Optimize again with example_kwargs={{{name!r}: {kwargs[name]!r}}}"
                )
            kwargs.setdefault(name, value)
        if self.static_dims:
            self._check_static_dims(args, kwargs)
        # Under torch.compile the fused graph is traced, not the program: its linears are Inductor's to
        # generate, and the dialect ops stay single nodes (the program calls their implementations directly).
        run = self.program if self.program is not None and not torch.compiler.is_compiling() else self.graph_module
        try:
            return run(*args, **kwargs)
        except AssertionError as e:  # export's input guards
            raise InputError(f"the inputs do not fit the optimized graph: {e}. {_STATIC_ADVICE}") from e

    def _check_static_dims(self, args: tuple, kwargs: dict) -> None:
        for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
            dims = self.static_dims.get(pytree.keystr(path))
            if not dims or not isinstance(leaf, torch.Tensor):
                continue
            for dim, size in dims.items():
                if dim < leaf.dim() and leaf.shape[dim] != size:
                    raise InputError(
                        f"input {input_name(path)} has size {leaf.shape[dim]} in dim {dim}, but the optimized "
                        f"graph only takes size {size} there (the model, or dynamic_shapes=, fixed it when it was "
                        f"captured). {_STATIC_ADVICE}"
                    )

    def generated_sources(self, dump_dir: str | None = None) -> dict[str, str]:
        """The generated kernel sources this module runs, by kernel name (empty for the eager back end).

        With ``dump_dir``, each is also written to ``dump_dir/<name>.py``.
        """
        return {} if self.program is None else self.program.generated_sources(dump_dir)


_STATIC_ADVICE = ("Optimize again with an example of the size you will run, or with dynamic_shapes= "
                  "marking that dim dynamic (torch.export.Dim.DYNAMIC)")


def _static_dims(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, dict[int, int]]:
    """The dims of each input that the captured graph keeps at the example's size, by input path."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    leaves = pytree.tree_flatten_with_path((args, kwargs))[0]
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    out = {}
    for (path, leaf), node in zip(leaves, placeholders):
        value = node.meta.get("val")
        if isinstance(leaf, torch.Tensor) and isinstance(value, torch.Tensor):
            dims = {d: int(s) for d, s in enumerate(value.shape) if is_concrete_int(s)}
            if dims:
                out[pytree.keystr(path)] = dims
    return out


def reference_probes(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict,
                     notes: list[str]) -> list[Probe]:
    """The probes of the example (``fxfuse.ir.inputs``) with the model's outputs on each.

    A probe the model itself cannot run, or the captured graph does not
    accept (a dim the model keeps static), is dropped with a note. Raises
    ``CaptureError`` when the captured graph computes something else than the
    model on a probe.
    """
    kept = []
    for probe in derive_probes(args, kwargs, grown_sizes(gm, args, kwargs)):
        try:
            with torch.no_grad():
                probe.reference = model(*probe.args, **probe.kwargs)
                graph_out = gm(*probe.args, **probe.kwargs)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            notes.append(f"not validated on the {probe.label} input: {type(e).__name__}: {first[:200]}")
            continue
        outcome = compare(probe.reference, graph_out)
        if not outcome.ok:
            raise CaptureError(
                f"the captured graph does not reproduce the model on the {probe.label} input: {outcome.detail}. "
                "torch.export took a path that is only right for the example's values; make the model's "
                "control flow independent of input values (torch.where, torch.cond)"
            )
        kept.append(probe)
    return kept


def optimize(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    passes: list[str] | None = None,
    backend: Literal["auto", "eager", "triton"] = "auto",
    validate: bool = True,
    on_failure: Literal["raise", "skip"] = "raise",
    dynamic_shapes: dict[str, Any] | None = None,
) -> OptimizedModule:
    """Capture ``model``, fuse its blocks into fxfuse ops and return the optimized module.

    ``model(*example_args, **example_kwargs)`` must run; the result runs on
    other batch sizes and sequence lengths too (dims 0 and 1 of each input are
    dynamic unless ``dynamic_shapes`` says otherwise, also where the example
    has size 1 there). ``passes`` names the pipeline (default:
    ``fxfuse.passes.default_pipeline(backend)``). With ``validate``, each pass
    is checked against the original model's outputs on the example and on
    probes derived from it (padded masks, redrawn ids and features, other
    batch and sequence sizes: ``fxfuse.ir.inputs``); a pass that breaks them
    raises ``NumericsError``, or with ``on_failure="skip"`` is rolled back and
    reported; the back end's lowered program is validated the same way
    (skipped, it runs the fused graph's reference implementations instead).
    ``backend="auto"`` picks the best back end available for the model's
    device; on the CPU, the eager back end runs linears through oneDNN with
    their activations fused (``fxfuse.codegen.eager``). Errors are
    ``fxfuse.errors.FxfuseError``s: ``InputError`` for bad arguments,
    ``CaptureError`` for a model torch.export cannot capture, ``NumericsError``
    and ``PassFailure`` for a pass that fails with ``on_failure="raise"``.
    """
    _check_arguments(model, example_args, example_kwargs, on_failure)
    example_args, example_kwargs = standalone(tuple(example_args), dict(example_kwargs or {}))
    tensors = [next(model.parameters(), None), *pytree.tree_leaves((example_args, example_kwargs))]
    chosen = resolve_backend(backend, tensors)
    pipeline = resolve(passes if passes is not None else default_pipeline(chosen))
    start = time.perf_counter()
    captured = capture(model, example_args, example_kwargs, dynamic_shapes)
    capture_seconds = time.perf_counter() - start
    gm, args, kwargs = captured.graph_module, captured.args, captured.kwargs
    notes = list(captured.notes)
    reference, probes, float64 = None, [], None
    if validate:
        reference = captured.reference
        with torch.no_grad():
            outcome = compare(reference, gm(*args, **kwargs))
        if not outcome.ok:
            raise CaptureError(f"the captured graph does not reproduce the model: {outcome.detail}")
        probes = reference_probes(model, gm, args, kwargs, notes)
        replay = Float64Replay(gm)  # the captured graph in float64, before any pass rewrites it
        float64 = functools.partial(replay, *args, **kwargs)
        for probe in probes:
            probe.float64 = functools.partial(replay, *probe.args, **probe.kwargs)
    manager = PassManager(pipeline, validate=validate, on_failure=on_failure)
    results = manager.run(gm, (args, kwargs), reference, probes=probes, float64=float64)
    report = Report(
        model=type(model).__name__,
        backend=chosen,
        passes=results,
        ops=count_dialect_ops(gm),
        capture_seconds=capture_seconds,
        notes=notes,
    )
    program = _lower(gm, chosen, report, on_failure)
    if validate:
        cases = [Probe("example", args, kwargs, reference, float64), *probes]
        checked = PassResult(f"codegen-{chosen}")
        failure = validate_on(program if program is not None else gm, cases, checked)
        report.max_error = checked.max_error
        report.validated_on = checked.validated_on
        if failure is not None:
            checked.skipped, checked.error = True, failure[1]
            if on_failure == "raise":
                raise NumericsError(f"the {chosen} back end's output differs from the model's: {failure[1]}", checked)
            # The fused graph itself runs the dialect ops' reference implementations.
            report.passes.append(checked)
            report.lowered = {}
            program = None
            fused = PassResult("fused graph")
            validate_on(gm, cases, fused)
            report.max_error = fused.max_error
    return OptimizedModule(gm, report, captured.fixed_kwargs, program, _static_dims(gm, args, kwargs))


def _lower(gm: fx.GraphModule, backend: str, report: Report, on_failure: str) -> Any:
    """The back end's program for ``gm``, or None (run the fused graph) when lowering raises and may be skipped."""
    try:
        program = lower(gm, backend)
    except Exception as e:
        if on_failure == "raise" or is_strict():
            raise
        report.passes.append(PassResult(f"codegen-{backend}", skipped=True, error=f"raised {type(e).__name__}: {e}"))
        return None
    report.lowered = program.lowered
    return program


def _check_arguments(model: Any, example_args: Any, example_kwargs: Any, on_failure: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    if model.training:
        raise InputError(
            "the model is in training mode; fxfuse optimizes inference graphs. Call model.eval() first."
        )
    check_example(example_args, example_kwargs)
    if on_failure not in ("raise", "skip"):
        raise InputError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}")


def check_example(example_args: Any, example_kwargs: Any) -> None:
    """``InputError`` unless the example is a tuple of positional arguments and a dict of keyword arguments."""
    if not isinstance(example_args, (tuple, list)):
        raise InputError(
            f"example_args must be a tuple of the model's positional arguments, got {type(example_args).__name__}; "
            "for one tensor write example_args=(x,)"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise InputError(f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}")
