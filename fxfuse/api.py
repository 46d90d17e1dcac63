"""optimize(): capture → pass pipeline → back end → OptimizedModule."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from fxfuse.codegen import resolve_backend
from fxfuse.ir.capture import CaptureError, capture
from fxfuse.ir.numerics import compare
from fxfuse.passes import DEFAULT_PIPELINE, PassManager, resolve
from fxfuse.report import Report, count_dialect_ops


class OptimizedModule(nn.Module):
    """The optimized model: called exactly like the original, same outputs.

    ``graph_module`` is the optimized ``torch.fx.GraphModule`` (fused nodes
    call ``torch.ops.fxfuse.*``); ``report`` says what was done;
    ``fixed_kwargs`` are the non-tensor kwargs the graph was captured with
    (``use_cache=False`` for Hugging Face decoders), filled in when omitted.
    """

    def __init__(self, graph_module: fx.GraphModule, report: Report, fixed_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.fixed_kwargs = fixed_kwargs
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
        return self.graph_module(*args, **kwargs)


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
    pipeline (default: ``fxfuse.passes.DEFAULT_PIPELINE``). With ``validate``,
    each pass is checked against the original model's outputs on the example;
    a pass that breaks them raises ``NumericsError``, or with
    ``on_failure="skip"`` is rolled back and reported. ``backend="auto"``
    picks the best back end available for the model's device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "the model is in training mode; fxfuse optimizes inference graphs. Call model.eval() first."
        )
    chosen = resolve_backend(backend)
    pipeline = resolve(passes if passes is not None else DEFAULT_PIPELINE)
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
    max_error = None
    if validate:
        with torch.no_grad():
            max_error = compare(reference, gm(*args, **kwargs)).max_error
    report = Report(
        model=type(model).__name__,
        backend=chosen,
        passes=results,
        ops=count_dialect_ops(gm),
        capture_seconds=capture_seconds,
        max_error=max_error,
        notes=captured.notes,
    )
    return OptimizedModule(gm, report, captured.fixed_kwargs)
