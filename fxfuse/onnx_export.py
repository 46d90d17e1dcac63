"""export_onnx(): capture → fuse (``optimize()``) → ONNX with fused ops → validated file.

The optimized graph module is exported with ``torch.onnx.export(dynamo=True)``;
each fxfuse op is translated by ``fxfuse.codegen.onnx`` (ONNX Runtime's
contrib ops for ``target="ort"``, standard opset-23 ops for ``"onnx"``). The
file is written to a temporary name next to ``path``, checked with
``onnx.checker``, run in ONNX Runtime on the example inputs and on the
probes derived from them (``fxfuse.ir.inputs``: padded masks, another batch
size and sequence length), compared with the PyTorch module, and only then
moved to ``path``. Any failure raises ``OnnxExportError`` and
leaves nothing at ``path``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from fxfuse.api import OptimizedModule, check_example, optimize
from fxfuse.errors import FxfuseError, InputError
from fxfuse.ir.capture import default_dynamic_shapes, quiet_loggers
from fxfuse.ir.inputs import derive_probes, grown_sizes, standalone
from fxfuse.ir.numerics import compare
from fxfuse.passes import DEFAULT_PIPELINE

# onnx, onnxscript and onnxruntime are imported when an export runs: `import fxfuse` stays light.
TARGETS = ("ort", "onnx")

# Models past this size keep their weights in a side file (``<name>.data``): protobuf's 2 GiB limit.
_EXTERNAL_DATA_BYTES = 1 << 30


class OnnxExportError(FxfuseError, RuntimeError):
    """The model could not be exported or its ONNX file did not validate; nothing was written at the path."""


@dataclass
class OnnxExport:
    """A validated ONNX file and what is in it.

    ``fused`` counts the ONNX nodes that stand for fused blocks, by kind
    (attention, norm, rope, activation); ``expected`` the fxfuse ops the
    optimized graph had, by the same kinds (a rope rotates q and k: two
    nodes); ``ops`` every ONNX op type. ``max_error`` is the worst relative
    error of ONNX Runtime's outputs against PyTorch's over the validation
    inputs, each listed in ``checks``.
    """

    path: Path
    target: str
    opset: int
    fused: dict[str, int]
    expected: dict[str, int]
    ops: dict[str, int]
    max_error: float | None
    checks: list[tuple[str, float]] = field(default_factory=list)
    provider: str | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: Any = None  # the optimize() Report

    @property
    def fully_fused(self) -> bool:
        """Every fxfuse block became one fused ONNX op."""
        return all(self.fused.get(k, 0) == n for k, n in self.expected.items())

    def session(self, providers: list[str] | None = None, threads: int | None = None):
        """An ``onnxruntime.InferenceSession`` on the file (CUDA first when available)."""
        return _session(str(self.path), providers, threads)

    def __str__(self) -> str:
        rows = [("fused block", "fxfuse ops", "ONNX ops", "ONNX op types")]
        types = _types_by_kind(self.ops, self.target)
        for kind in self.fused:
            rows.append((kind, str(self.expected.get(kind, 0)), str(self.fused[kind]), types.get(kind, "-")))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"ONNX export ({self.target}, opset {self.opset}) → {self.path}  ({self.seconds:.1f} s)"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        if not self.fully_fused:
            short = [k for k, n in self.expected.items() if self.fused.get(k, 0) != n]
            lines.append(f"  not one fused op each: {', '.join(short)} (the tightest standard form is used)")
        lines.append(f"  inputs: {', '.join(self.inputs)}; outputs: {', '.join(self.outputs)}")
        if self.checks:
            checks = "; ".join(f"{name}: {err:.1e}" for name, err in self.checks)
            lines.append(f"  validated with ONNX Runtime ({self.provider}), max relative error vs PyTorch: {checks}")
        else:
            lines.append("  not validated (validate=False)")
        return "\n".join(lines)


def _types_by_kind(ops: dict[str, int], target: str) -> dict[str, str]:
    from fxfuse.codegen.onnx import FUSED_OPS
    out = {}
    for kind, members in FUSED_OPS[target].items():
        names = {(f"{d}::{n}" if d else n) for d, n in members}
        found = [f"{k}×{v}" for k, v in ops.items() if k in names]
        out[kind] = ", ".join(found) or "-"
    return out


def _expected(report_ops: dict[str, int]) -> dict[str, int]:
    return {
        "attention": report_ops.get("attention", 0) + report_ops.get("latent_attention", 0),
        "norm": sum(report_ops.get(k, 0) for k in ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")),
        "rope": 2 * report_ops.get("rope", 0),
        "activation": report_ops.get("gelu", 0) + report_ops.get("gated_mlp_act", 0),
    }


def export_onnx(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    path: str | os.PathLike = "model.onnx",
    *,
    target: Literal["ort", "onnx"] = "ort",
    dynamic: bool = True,
    validate: bool = True,
    passes: list[str] | None = None,
) -> OnnxExport:
    """Optimize ``model`` with fxfuse and write it to ``path`` as ONNX with every fused block one ONNX op.

    ``model(*example_args, **example_kwargs)`` must run. ``target="ort"``
    writes ONNX Runtime's fused contrib ops (``com.microsoft``),
    ``target="onnx"`` standard opset-23 ops only. With ``dynamic`` the batch
    and sequence dims (dims 0 and 1 of each input) stay dynamic. With
    ``validate`` the file is checked with ``onnx.checker`` and run in ONNX
    Runtime on the example and on the probes ``optimize()`` validates with
    (padded masks, redrawn inputs, another batch size and sequence length;
    ONNX Runtime's CUDA provider when present, else the CPU's); outputs must match PyTorch's within the dtype-aware tolerance of
    ``fxfuse.ir.numerics``. ``passes`` defaults to ``onnx_pipeline()``.
    ``model`` may also be an ``OptimizedModule`` (it is then not optimized
    again and is itself the reference). Raises ``OnnxExportError`` naming the
    op and the reason (``CaptureError`` if the model cannot be captured); on
    any failure nothing is left at ``path``.
    """
    if target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, got {target!r}")
    import onnx

    from fxfuse.codegen.onnx import OPSET, count_fused_ops, count_onnx_ops

    start = time.perf_counter()
    check_example(example_args, example_kwargs)
    args, kwargs = standalone(tuple(example_args), dict(example_kwargs or {}))
    path = Path(path)
    workdir = _workdir(path)
    try:
        if isinstance(model, OptimizedModule):
            opt = model
        else:
            shapes = None if dynamic else _static_shapes(model, args, kwargs)
            opt = optimize(model, args, kwargs, passes=passes if passes is not None else onnx_pipeline(),
                           validate=validate, dynamic_shapes=shapes)
        kwargs = {**kwargs, **opt.fixed_kwargs}  # in the order the graph was captured with
        with torch.no_grad():
            reference = (model if not isinstance(model, OptimizedModule) else opt)(*args, **kwargs)
        output_names = _output_names(reference)
        staged = workdir / path.name
        program = _export(opt, args, kwargs, target, dynamic, output_names)
        _save(program, staged)
        onnx_model = onnx.load(str(staged), load_external_data=False)
        result = OnnxExport(
            path=path, target=target, opset=OPSET, fused=count_fused_ops(onnx_model, target),
            expected=_expected(opt.report.ops), ops=count_onnx_ops(onnx_model), max_error=None,
            inputs=[i.name for i in onnx_model.graph.input], outputs=[o.name for o in onnx_model.graph.output],
            report=opt.report,
        )
        if validate:
            _validate(staged, onnx_model, model if not isinstance(model, OptimizedModule) else opt,
                      opt.graph_module, args, kwargs, reference, result)
        _publish(workdir, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _workdir(path: Path) -> Path:
    """A fresh folder next to ``path`` to write into; ``OnnxExportError`` when that place is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise OnnxExportError(f"cannot write the ONNX file to {path}: {e.strerror or e}; choose a writable path") from e


def _publish(workdir: Path, path: Path) -> None:
    """Move the staged files to their place, the model file last (its weights file, if any, is there first)."""
    staged = sorted(workdir.iterdir(), key=lambda item: item.name == path.name)
    try:
        for item in staged:
            os.replace(item, path.parent / item.name)
    except OSError as e:
        raise OnnxExportError(f"cannot move the ONNX file to {path}: {e.strerror or e}") from e


def onnx_pipeline() -> list[str]:
    """The default passes plus ``merge-projections``.

    ONNX Runtime's packed ``Attention`` op reads the merged QKV projection and
    computes it straight into its per-head layout: on an all-MiniLM-L6-v2 block
    at 4 × 128, about 14% faster than MatMul + Split + MultiHeadAttention on
    this project's 2-core CPU.
    """
    at = DEFAULT_PIPELINE.index("fuse-attention")
    return [*DEFAULT_PIPELINE[:at], "merge-projections", *DEFAULT_PIPELINE[at:]]


def _static_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every input dim static (``dynamic=False``)."""
    return {name: None for name in default_dynamic_shapes(model, args, kwargs)}


def _output_names(reference: Any) -> list[str] | None:
    """Names from the output structure: ``last_hidden_state``, ``pooler_output``, … (None if they clash)."""
    leaves, _ = pytree.tree_flatten_with_path(reference)
    names = []
    for key_path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in key_path:
            part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
            parts.append(str(part))
        names.append("_".join(parts) or "output")
    return names if len(set(names)) == len(names) else None


def _error_for(exc: BaseException) -> str:
    """The most telling reason in a chain of export errors."""
    from fxfuse.codegen.onnx import OnnxLoweringError

    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, OnnxLoweringError):
            return f"{e} (target cannot express this case)"
    node = next((line.strip() for e in chain for line in str(e).splitlines() if "Error when translating node" in line),
                None)
    for e in chain:
        text = str(e)
        if "No ONNX function found for" in text:
            target = re.search(r"target=([\w.:]+)", node or "")
            op_name = target.group(1) if target else text.split("No ONNX function found for", 1)[1].split("Failure")[0]
            return f"no ONNX translation for the op {op_name.strip(' .')}" + (f"\n  while: {node}" if node else "")
    last = chain[-1]
    first_line = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    return f"{type(last).__name__}: {first_line}" + (f"\n  while: {node}" if node else "")


def _export(opt: OptimizedModule, args: tuple, kwargs: dict, target: str, dynamic: bool,
            output_names: list[str] | None):
    import onnxscript.optimizer

    from fxfuse.codegen.onnx import OPSET, translation_table

    gm = opt.graph_module
    # The captured module flattens its inputs in forward()'s order: give the kwargs in that order.
    order = list(inspect.signature(gm.forward).parameters)
    kwargs = dict(sorted(kwargs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    shapes = default_dynamic_shapes(gm, args, kwargs) if dynamic else None
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), \
                quiet_loggers(logging.ERROR, "torch.onnx", "onnx_ir", "onnxscript"):
            warnings.simplefilter("ignore")
            # The optimized graph module re-exported as is (non-strict): the fxfuse ops stay opaque nodes.
            with torch.no_grad():
                program = torch.export.export(gm, args, kwargs, dynamic_shapes=shapes, strict=False)
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=OPSET, custom_translation_table=translation_table(target),
                output_names=output_names, optimize=False, verbose=False,
            )
            # Constant folding, dead code and common subexpression removal, redundant reshapes and transposes;
            # not onnxscript's opset-23 pattern fusions (the exporter's optimize=True runs them): everything
            # fusable is fused already, and its RotaryEmbedding fusion writes batch-1 caches that ONNX Runtime
            # rejects for a batch > 1 (onnxscript 0.7.2).
            onnxscript.optimizer.optimize_ir(onnx_program.model)
            _trim_unused_outputs(onnx_program.model)
            _static_dims_as_ints(onnx_program.model)
            return onnx_program
    except Exception as e:
        raise OnnxExportError(f"cannot export {opt.report.model} to ONNX ({target}): {_error_for(e)}") from e


def _trim_unused_outputs(model: Any) -> None:
    """Drop the unread trailing outputs of contrib ops: a SkipLayerNormalization whose sum nobody reads then
    does not write it (ONNX Runtime's kernel fills every output the node declares)."""
    graph_outputs = set(model.graph.outputs)
    for node in model.graph:
        if node.domain != "com.microsoft":
            continue
        keep = len(node.outputs)
        while keep > 1 and not node.outputs[keep - 1].uses() and node.outputs[keep - 1] not in graph_outputs:
            keep -= 1
        node.resize_outputs(keep)


def _static_dims_as_ints(model: Any) -> None:
    """A dim export kept static can reach the graph's inputs as a symbol named "3": make it the int 3."""
    import onnx_ir as ir

    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        fixed = [int(d.value) if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str) and d.value.isdigit()
                 else d for d in value.shape]
        if fixed != list(value.shape):
            value.shape = ir.Shape(fixed)


def _save(program, staged: Path) -> None:
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(staged), external_data=size > _EXTERNAL_DATA_BYTES)


def _providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session(path: str, providers: list[str] | None = None, threads: int | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=providers or _providers())


def _tensor_leaves(outputs: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(outputs) if isinstance(x, torch.Tensor)]


def _validate(staged: Path, onnx_model: Any, module: nn.Module, graph_module: torch.fx.GraphModule, args: tuple,
              kwargs: dict, reference: Any, result: OnnxExport) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(staged))
    except Exception as e:
        raise OnnxExportError(f"the exported ONNX file fails onnx.checker: {e}") from e
    try:
        session = _session(str(staged))
    except Exception as e:
        raise OnnxExportError(f"ONNX Runtime cannot load the exported file: {str(e).strip()}") from e
    result.provider = session.get_providers()[0]
    names = [i.name for i in session.get_inputs()]
    cases = [("example", args, kwargs, reference)]
    for probe in derive_probes(args, kwargs, grown_sizes(graph_module, args, kwargs)):
        try:
            with torch.no_grad():
                cases.append((probe.label, probe.args, probe.kwargs, module(*probe.args, **probe.kwargs)))
        except Exception:
            continue  # optimize() noted that the model does not take this probe
    worst = 0.0
    for label, case_args, case_kwargs, ref in cases:
        feeds = _feeds(module, case_args, case_kwargs, names)
        try:
            outs = session.run(None, feeds)
        except Exception as e:
            raise OnnxExportError(f"ONNX Runtime failed on the {label} input: {str(e).strip()}") from e
        expected = _tensor_leaves(ref)
        got = [torch.from_numpy(np.asarray(o)) for o in outs]
        outcome = compare(expected, got)
        if not outcome.ok:
            raise OnnxExportError(
                f"ONNX Runtime's outputs differ from PyTorch's on the {label} input: {outcome.detail} "
                f"(provider {result.provider}; ONNX ops: {result.ops})"
            )
        result.checks.append((label, outcome.max_error))
        worst = max(worst, outcome.max_error)
    result.max_error = worst


def _flat_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The tensor inputs by their forward() parameter names, as the exporter names the graph inputs."""
    forward = module.graph_module.forward if isinstance(module, OptimizedModule) else module.forward
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    flat = {}
    for name, value in bound.items():
        leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
        if len(leaves) == 1 and isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            for i, leaf in enumerate(leaves):
                flat[f"{name}_{i}"] = leaf
    return flat


def _feeds(module: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> dict[str, np.ndarray]:
    flat = _flat_inputs(module, args, kwargs)
    if set(names) <= set(flat):
        return {n: flat[n].detach().cpu().numpy() for n in names}
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if len(tensors) != len(names):
        raise OnnxExportError(f"cannot map the inputs to the ONNX inputs {names}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
