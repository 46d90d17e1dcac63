"""optimize(): capture → pass pipeline → back end → OptimizedModule."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxfuse.codegen import lower, resolve_backend
from fxfuse.ir.capture import CaptureError, capture
from fxfuse.ir.numerics import compare
from fxfuse.passes import PassManager, default_pipeline, resolve
from fxfuse.passes.manager import NumericsError, PassResult
from fxfuse.report import Report, count_dialect_ops


class OptimizedModule(nn.Module):
    """The optimized model: called exactly like the original, same outputs.

    ``graph_module`` is the optimized ``torch.fx.GraphModule`` (fused nodes
    call ``torch.ops.fxfuse.*``); ``report`` says what was done;
    ``fixed_kwargs`` are the non-tensor kwargs the graph was captured with
    (``use_cache=False`` for Hugging Face decoders), filled in when omitted.
    ``program`` is the graph lowered for the back end, which is what runs
    (reading its parameters through ``graph_module``).
    """

    def __init__(self, graph_module: fx.GraphModule, report: Report, fixed_kwargs: dict[str, Any],
                 program: Any = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.fixed_kwargs = fixed_kwargs
        self.program = program
        # An inference graph (export's module refuses train()/eval() calls).
        self.training = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, value in self.fixed_kwargs.items():
            if name in kwargs and kwargs[name] != value:
                raise ValueError(
                    f"this module was optimized with {name}={value!r}; it cannot run with "
                    f"{name}={kwargs[name]!r}. Optimize again with example_kwargs={{{name!r}: {kwargs[name]!r}}}"
                )
            kwargs.setdefault(name, value)
        if self.program is not None:
            return self.program(*args, **kwargs)
        return self.graph_module(*args, **kwargs)

    def generated_sources(self, dump_dir: str | None = None) -> dict[str, str]:
        """The generated kernel sources this module runs, by kernel name (empty for the eager back end).

        With ``dump_dir``, each is also written to ``dump_dir/<name>.py``.
        """
        return {} if self.program is None else self.program.generated_sources(dump_dir)


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
    dynamic unless ``dynamic_shapes`` says otherwise). ``passes`` names the
    pipeline (default: ``fxfuse.passes.default_pipeline(backend)``). With ``validate``,
    each pass is checked against the original model's outputs on the example;
    a pass that breaks them raises ``NumericsError``, or with
    ``on_failure="skip"`` is rolled back and reported; the back end's lowered
    program is validated the same way (skipped, it runs the fused graph's
    reference implementations instead). ``backend="auto"`` picks the best
    back end available for the model's device; on the CPU, the eager back end
    runs linears through oneDNN with their activations fused
    (``fxfuse.codegen.eager``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "the model is in training mode; fxfuse optimizes inference graphs. Call model.eval() first."
        )
    tensors = [next(model.parameters(), None), *pytree.tree_leaves((example_args, example_kwargs))]
    chosen = resolve_backend(backend, tensors)
    pipeline = resolve(passes if passes is not None else default_pipeline(chosen))
    start = time.perf_counter()
    captured = capture(model, tuple(example_args), example_kwargs, dynamic_shapes)
    capture_seconds = time.perf_counter() - start
    gm, args, kwargs = captured.graph_module, captured.args, captured.kwargs
    reference = None
    if validate:
        with torch.no_grad():
            reference = model(*args, **kwargs)
            outcome = compare(reference, gm(*args, **kwargs))
        if not outcome.ok:
            raise CaptureError(f"the captured graph does not reproduce the model: {outcome.detail}")
    manager = PassManager(pipeline, validate=validate, on_failure=on_failure)
    results = manager.run(gm, (args, kwargs), reference)
    report = Report(
        model=type(model).__name__,
        backend=chosen,
        passes=results,
        ops=count_dialect_ops(gm),
        capture_seconds=capture_seconds,
        notes=captured.notes,
    )
    program = lower(gm, chosen)
    report.lowered = program.lowered
    if validate:
        with torch.no_grad():
            outcome = compare(reference, program(*args, **kwargs))
        report.max_error = outcome.max_error
        if not outcome.ok:
            failed = PassResult(f"codegen-{chosen}", skipped=True, error=outcome.detail, max_error=outcome.max_error)
            if on_failure == "raise":
                raise NumericsError(f"the {chosen} back end's output differs from the model's: {outcome.detail}",
                                    failed)
            # The fused graph itself runs the dialect ops' reference implementations.
            report.passes.append(failed)
            report.lowered = {}
            program = None
            with torch.no_grad():
                report.max_error = compare(reference, gm(*args, **kwargs)).max_error
    return OptimizedModule(gm, report, captured.fixed_kwargs, program)
