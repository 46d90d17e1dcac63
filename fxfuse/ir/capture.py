"""Capture: an ``nn.Module`` → an ATen-level ``torch.fx.GraphModule``.

The front door is ``torch.export`` (non-strict). The graph module it yields
(``ExportedProgram.module()``) takes the model's own args/kwargs and returns
its own output structure (a ``transformers`` ModelOutput stays one); its
parameters are ``get_attr`` nodes and every node carries ``meta["val"]``.
Batch and sequence dims are dynamic by default (``default_dynamic_shapes``),
also where the example has size 1 there. A graph that a
``torch.compile`` backend receives can be brought to this same form (ATen
ops, fake values on every node) for the same passes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from fxfuse.errors import FxfuseError, InputError
from fxfuse.ir.inputs import grow_unit_dims, input_name, role


class CaptureError(FxfuseError, RuntimeError):
    """The model could not be captured; the message says where and what to try."""


@dataclass
class Captured:
    """A captured model: the graph module and the inputs it was captured with."""

    graph_module: fx.GraphModule
    args: tuple
    kwargs: dict
    fixed_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reference: Any = None  # the model's outputs on the example


def _is_hf_decoder(model: nn.Module) -> bool:
    return hasattr(model, "config") and "use_cache" in inspect.signature(model.forward).parameters


def _auto_dims(value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    # Masks and ids index positions in every dim (a (batch, 1, query, key) mask); features only in the first two.
    # A size-1 dim is left static: export would specialize it anyway (and warn).
    dims = value.dim() if role(value) != "float" else min(value.dim(), 2)
    return {d: Dim.AUTO for d in range(dims) if value.shape[d] != 1}


def default_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The dims of each tensor input that may vary, as ``Dim.AUTO``: dynamic unless the model fixes them.

    Dims 0 and 1 (batch, sequence) of feature tensors, every dim of masks and
    ids (``fxfuse.ir.inputs.role``), so the query and key dims of a (batch,
    1, query, key) mask vary with the sequence too. ``Dim.AUTO`` lets export
    keep a dim static where the model forces it (a fixed image size, say)
    instead of failing.
    """
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(_auto_dims, value) for name, value in bound.arguments.items()}


def _failing_module(exc: BaseException, model: nn.Module) -> str:
    """'path (Class) at file:line' of the innermost model submodule in the traceback."""
    names = {id(m): n for n, m in model.named_modules()}
    found = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            path = names[id(owner)] or "<root>"
            found = f"{path} ({type(owner).__name__}) at {frame.f_code.co_filename}:{lineno}"
    return found


def _hints(message: str) -> list[str]:
    text = message.lower()
    hints = []
    if "data-dependent" in text or "data dependent" in text:
        hints.append(
            "the model branches on tensor *values* (e.g. `if x.sum() > 0`); rewrite that branch "
            "with torch.where or torch.cond, or move it out of forward()"
        )
    if "constraint" in text or "specializ" in text or "dynamic" in text:
        hints.append(
            "a dim that fxfuse made dynamic is fixed by the model; pass dynamic_shapes= with that "
            "dim set to None (static), or an example whose sizes are not 0 or 1"
        )
    if "dtensor" in text:
        hints.append("the model is sharded with DTensor (tensor parallelism), which torch.export does not take here; "
                     "compile it with torch.compile(model, backend=\"fxfuse\") instead (docs/distributed.md)")
    hints.append("try other example inputs (batch and sequence sizes of at least 2)")
    hints.append("check that the model runs eagerly on these inputs: model(*example_args, **example_kwargs)")
    return hints


def _explain(exc: BaseException, model: nn.Module) -> str:
    first_lines = "\n    ".join(str(exc).strip().splitlines()[:6]) or type(exc).__name__
    where = _failing_module(exc, model)
    lines = [f"fxfuse could not capture {type(model).__name__} with torch.export."]
    if where:
        lines.append(f"  failed in: {where}")
    lines.append(f"  error ({type(exc).__name__}):\n    {first_lines}")
    lines.append("  what you can do:")
    lines += [f"    - {h}" for h in _hints(str(exc))]
    return "\n".join(lines)


def _static_dim_notes(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Notes for the batch/sequence dims export had to keep static (size 0 or 1 in the example)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    names = {id(leaf): name for name, value in bound.items() for leaf in pytree.tree_leaves(value)}
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    notes = []
    for leaf, node in zip(leaves, placeholders):
        val = node.meta.get("val")
        if not isinstance(leaf, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        for dim in range(min(val.dim(), 2)):
            if is_concrete_int(val.shape[dim]) and val.shape[dim] <= 1:
                notes.append(
                    f"input {names.get(id(leaf), node.name)!r} dim {dim} is static (= {val.shape[dim]}): the "
                    f"optimized module accepts only this size; give an example of size 2 or more to keep it dynamic"
                )
    return notes


def capture(
    model: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    dynamic_shapes: dict[str, Any] | None = None,
) -> Captured:
    """Capture ``model`` called as ``model(*args, **kwargs)`` into an ATen graph module.

    Hugging Face models that take ``use_cache`` are captured with
    ``use_cache=False`` unless the caller says otherwise. With the default
    dynamic shapes, dims of size 1 in the example are captured from the
    example grown to size 2 along them (``torch.export`` would fix them at 1;
    ``fxfuse.ir.inputs.grow_unit_dims`` lists the growths tried), provided
    that graph reproduces the model on the example itself; otherwise they
    stay static, with a note. The model is first run on the example (its
    outputs are ``Captured.reference``): ``InputError`` says why when it does
    not run. Raises ``CaptureError`` with the failing submodule and what to
    try when torch.export cannot capture it.
    """
    kwargs = dict(kwargs or {})
    fixed = {}
    if _is_hf_decoder(model) and "use_cache" not in kwargs:
        fixed["use_cache"] = False
        kwargs["use_cache"] = False
    reference = run_example(model, args, kwargs)
    if dynamic_shapes is None:
        for grown in grow_unit_dims(args, kwargs):
            gm = _export_reproducing(model, grown, (args, kwargs), reference)
            if gm is not None:
                return Captured(gm, tuple(args), kwargs, fixed, [], reference)
    gm = _export(model, args, kwargs, dynamic_shapes)
    notes = _static_dim_notes(gm, model, args, kwargs) if dynamic_shapes is None else []
    return Captured(gm, tuple(args), kwargs, fixed, notes, reference)


def run_example(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The model's outputs on the example; ``InputError`` naming the failure when the model does not run on it."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        lines = [f"{type(model).__name__} does not run on the example inputs ({type(e).__name__}: {first})"]
        if where := _failing_module(e, model):
            lines.append(f"  failed in: {where}")
        lines += [f"  - {hint}" for hint in _input_hints(model, args, kwargs)]
        lines.append("  fxfuse optimizes what the model computes on the example: "
                     "model(*example_args, **example_kwargs) must run")
        raise InputError("\n".join(lines)) from e


def _input_hints(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Inputs on another device, or floats of another dtype, than the model's weights."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return []
    hints = []
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = input_name(path)
        if leaf.device != weight.device:
            hints.append(f"input {name} is on {leaf.device} but the weights are on {weight.device}: "
                         f"move it with .to({str(weight.device)!r})")
        elif leaf.is_floating_point() and leaf.dtype != weight.dtype:
            hints.append(f"input {name} is {leaf.dtype} but the weights are {weight.dtype}: "
                         f"cast one of them (.to({weight.dtype}))")
    return hints


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: dict[str, Any] | None) -> fx.GraphModule:
    try:
        shapes = dynamic_shapes if dynamic_shapes is not None else default_dynamic_shapes(model, args, kwargs)
    except TypeError as e:
        raise InputError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from e
    try:
        with torch.no_grad():
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise CaptureError(_explain(e, model)) from e
    return exported.module()


def _export_reproducing(model: nn.Module, grown: tuple[tuple, dict], example: tuple[tuple, dict],
                        reference: Any) -> fx.GraphModule | None:
    """The graph captured from the grown example, if it runs the original example as the model does."""
    from fxfuse.ir.numerics import compare

    try:
        with quiet_loggers(logging.CRITICAL, "torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes"):
            gm = _export(model, *grown, None)
        with torch.no_grad():
            ok = compare(reference, gm(*example[0], **example[1])).ok
    except Exception:
        return None
    return gm if ok else None


@contextlib.contextmanager
def quiet_loggers(level: int, *names: str) -> Iterator[None]:
    """Raise the named loggers to ``level`` inside the block: messages of torch's that fxfuse handles itself
    (a growth attempt's failure) or that are progress lines; errors still surface as exceptions."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
