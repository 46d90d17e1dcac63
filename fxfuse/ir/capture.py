"""Capture: an ``nn.Module`` → an ATen-level ``torch.fx.GraphModule``.

The front door is ``torch.export`` (non-strict). The graph module it yields
(``ExportedProgram.module()``) takes the model's own args/kwargs and returns
its own output structure (a ``transformers`` ModelOutput stays one); its
parameters are ``get_attr`` nodes and every node carries ``meta["val"]``.
Batch and sequence dims (dims 0 and 1 of every input tensor) are dynamic by
default. A graph that a ``torch.compile`` backend receives can be brought to
this same form (ATen ops, fake values on every node) for the same passes.
"""

from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim


class CaptureError(RuntimeError):
    """The model could not be captured; the message says where and what to try."""


@dataclass
class Captured:
    """A captured model: the graph module and the inputs it was captured with."""

    graph_module: fx.GraphModule
    args: tuple
    kwargs: dict
    fixed_kwargs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _is_hf_decoder(model: nn.Module) -> bool:
    return hasattr(model, "config") and "use_cache" in inspect.signature(model.forward).parameters


def _auto_dims(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return {d: Dim.AUTO for d in range(min(value.dim(), 2))}
    return None


def default_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Dims 0 and 1 (batch, sequence) of every tensor input dynamic, the rest static.

    ``Dim.AUTO`` lets export keep a dim static where the model forces it (a
    fixed image size, say) instead of failing.
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
            if isinstance(val.shape[dim], int) and val.shape[dim] <= 1:
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
    ``use_cache=False`` unless the caller says otherwise. Raises
    ``CaptureError`` with the failing submodule and what to try.
    """
    kwargs = dict(kwargs or {})
    fixed = {}
    if _is_hf_decoder(model) and "use_cache" not in kwargs:
        fixed["use_cache"] = False
        kwargs["use_cache"] = False
    try:
        shapes = dynamic_shapes if dynamic_shapes is not None else default_dynamic_shapes(model, args, kwargs)
    except TypeError as e:
        raise CaptureError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from e
    try:
        with torch.no_grad():
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise CaptureError(_explain(e, model)) from e
    gm = exported.module()
    notes = _static_dim_notes(gm, model, args, kwargs) if dynamic_shapes is None else []
    return Captured(gm, tuple(args), kwargs, fixed, notes)
