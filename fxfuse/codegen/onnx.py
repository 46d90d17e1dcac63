"""ONNX back end: translation functions from the fxfuse dialect to ONNX.

``torch.onnx.export(dynamo=True)`` sees each fxfuse op as one opaque node and
calls the function that ``translation_table(target)`` gives for it. Each
function is traced (onnxscript's trace-only style): it receives ONNX values
with static shape and dtype information, plus the op's Python attributes,
and emits ONNX nodes. Two targets:

* ``"ort"`` (``onnx_ort.py``): ONNX Runtime's fused contrib ops in the
  ``com.microsoft`` domain (Attention with packed QKV, MultiHeadAttention,
  GroupQueryAttention, SkipLayerNormalization, SkipSimplifiedLayerNormalization,
  RotaryEmbedding, Gelu/BiasGelu/FastGelu/QuickGelu), standard ops where ORT
  has nothing fused; which op each case gets, and why, is in that module.
* ``"onnx"`` (``onnx_std.py``): standard ops only, opset 23 (Attention,
  RMSNormalization, RotaryEmbedding, LayerNormalization, Gelu).

Both targets write the default domain at opset 23 (``OPSET``): the ORT
target uses the standard ``RMSNormalization`` for a plain RMS norm because
ORT registers its ``SimplifiedLayerNormalization`` under the ONNX domain,
which ``onnx.checker`` rejects.

This module holds what both targets share: the table, the fused-op counts,
the error type, small shape helpers, and translations for third-party custom
ops that block the export of zoo models (``transformers::grouped_mm_fallback``).
A translation function may read the producers of its inputs (the ONNX graph
built so far) to absorb a linear's bias or the QKV projection into the fused
op; the absorbed nodes stay for any other reader and are removed as dead
code otherwise, so this never changes what the graph computes.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx.defs
import onnx_ir as ir
import torch
from onnxscript import opset23 as op
from onnxscript import values

from fxfuse.errors import FxfuseError, InputError

TARGETS = ("ort", "onnx")
OPSET = 23
MS_DOMAIN = "com.microsoft"

# ONNX op types that stand for a fused fxfuse block, by kind, per target. ("", name) is the default domain.
FUSED_OPS: dict[str, dict[str, set[tuple[str, str]]]] = {
    "ort": {
        # The standard Attention covers what no contrib op can (cross-attention with grouped heads or a soft-cap).
        "attention": {(MS_DOMAIN, "MultiHeadAttention"), (MS_DOMAIN, "GroupQueryAttention"), (MS_DOMAIN, "Attention"),
                      ("", "Attention")},
        "norm": {(MS_DOMAIN, "SkipLayerNormalization"), (MS_DOMAIN, "SkipSimplifiedLayerNormalization"),
                 ("", "LayerNormalization"), ("", "RMSNormalization"), ("", "SimplifiedLayerNormalization")},
        "rope": {(MS_DOMAIN, "RotaryEmbedding")},
        "activation": {(MS_DOMAIN, "Gelu"), (MS_DOMAIN, "BiasGelu"), (MS_DOMAIN, "FastGelu"), (MS_DOMAIN, "QuickGelu")},
    },
    "onnx": {
        "attention": {("", "Attention")},
        "norm": {("", "LayerNormalization"), ("", "RMSNormalization")},
        "rope": {("", "RotaryEmbedding")},
        "activation": {("", "Gelu")},
    },
}


class OnnxLoweringError(FxfuseError, RuntimeError):
    """A dialect op that a target cannot express; names the op and the reason."""

    def __init__(self, op_name: str, reason: str) -> None:
        super().__init__(f"fxfuse.{op_name}: {reason}")
        self.op_name = op_name
        self.reason = reason


def translation_table(target: str) -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: one function per dialect op."""
    if target == "ort":
        from fxfuse.codegen import onnx_ort as lowering
    elif target == "onnx":
        from fxfuse.codegen import onnx_std as lowering
    else:
        raise InputError(f"target must be one of {TARGETS}, got {target!r}")
    ops = torch.ops.fxfuse
    return {
        **third_party_translations(),
        ops.attention.default: lowering.attention,
        ops.latent_attention.default: lowering.latent_attention,
        ops.rms_norm.default: lowering.rms_norm,
        ops.add_rms_norm.default: lowering.add_rms_norm,
        ops.layer_norm.default: lowering.layer_norm,
        ops.add_layer_norm.default: lowering.add_layer_norm,
        ops.gated_mlp_act.default: lowering.gated_mlp_act,
        ops.gelu.default: lowering.gelu,
        ops.rope.default: lowering.rope,
    }


def third_party_translations() -> dict[Any, Callable]:
    """Translations for custom ops that other libraries put in the models fxfuse sees and torch's exporter lacks.

    ``transformers::grouped_mm_fallback``: the grouped GEMM of the mixture-of-
    experts layers (Mixtral, Qwen-MoE) on CPU or for float32 weights.
    """
    table: dict[Any, Callable] = {}
    namespace = getattr(torch.ops, "transformers", None)
    if namespace is not None and hasattr(namespace, "grouped_mm_fallback"):
        table[namespace.grouped_mm_fallback.default] = grouped_mm
    return table


def grouped_mm(x: ir.Value, weight: ir.Value, offsets: ir.Value) -> ir.Value:
    """out[r] = x[r] @ weight[g] for the rows r of group g: rows sorted by group, ``offsets`` the cumulative ends.

    x (M, K), weight (G, K, N), offsets (G,). The G groups are static: one
    ``Slice`` of rows and one ``MatMul`` each, then a ``Concat`` (empty groups
    give empty slices).
    """
    groups = static_dim(weight, 0, "grouped_mm", "number of groups")
    ends = op.Cast(offsets, to=ir.DataType.INT64)
    zero = op.Constant(value_ints=[0])
    parts = []
    for g in range(groups):
        index = op.Constant(value_ints=[g])
        start = zero if g == 0 else op.Gather(ends, op.Constant(value_ints=[g - 1]), axis=0)
        rows = op.Slice(x, start, op.Gather(ends, index, axis=0), zero)
        w = op.Squeeze(op.Gather(weight, index, axis=0), zero)
        parts.append(op.MatMul(rows, w))
    return parts[0] if groups == 1 else op.Concat(*parts, axis=0)


def count_onnx_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Every op type in ``model``'s main graph, ``domain::name`` for non-default domains."""
    return dict(sorted(Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    ).items()))


def count_fused_ops(model: onnx.ModelProto, target: str) -> dict[str, int]:
    """How many ONNX nodes of ``model`` are fused blocks of each kind (attention, norm, rope, activation)."""
    kinds = FUSED_OPS[target]
    counts: Counter = Counter()
    for node in model.graph.node:
        key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        for kind, members in kinds.items():
            if key in members:
                counts[kind] += 1
    return {kind: counts.get(kind, 0) for kind in kinds}


# --- contrib ops ------------------------------------------------------------------------------------------

_ALL_TYPES = [f"tensor({t})" for t in
              ("float", "float16", "bfloat16", "double", "int32", "int64", "bool", "uint8", "int8")]
_ATTR_TYPES = {float: onnx.defs.OpSchema.AttrType.FLOAT, int: onnx.defs.OpSchema.AttrType.INT,
               str: onnx.defs.OpSchema.AttrType.STRING}


def contrib_op(name: str, inputs: Sequence[str], outputs: Sequence[str], attributes: dict[str, type]) -> values.Op:
    """An onnxscript ``Op`` for the ``com.microsoft`` op ``name``.

    ``onnx.defs`` has no schemas for ONNX Runtime's contrib ops, so the
    signature the exporter needs is written here: ``inputs``/``outputs`` in
    order (a trailing ``?`` marks an optional one), attributes with their
    Python types. Nothing is registered globally.
    """
    param = onnx.defs.OpSchema.FormalParameter
    option = onnx.defs.OpSchema.FormalParameterOption
    single, optional = option.Single, option.Optional

    def params(names: Sequence[str], prefix: str) -> list:
        return [param(n.rstrip("?"), f"{prefix}{i}", param_option=optional if n.endswith("?") else single)
                for i, n in enumerate(names)]

    schema = onnx.defs.OpSchema(
        name, MS_DOMAIN, 1,
        inputs=params(inputs, "I"), outputs=params(outputs, "O"),
        type_constraints=[(f"I{i}", _ALL_TYPES, "") for i in range(len(inputs))]
        + [(f"O{i}", _ALL_TYPES, "") for i in range(len(outputs))],
        attributes=[onnx.defs.OpSchema.Attribute(a, _ATTR_TYPES[t], required=False) for a, t in attributes.items()],
    )
    return values.Op(values.Opset(MS_DOMAIN, 1), name, schema)


# --- shape helpers ----------------------------------------------------------------------------------------

def dims(value: ir.Value) -> tuple:
    """The static shape of ``value``: ints, and ``ir.SymbolicDim`` for dynamic dims."""
    if value.shape is None:
        raise OnnxLoweringError("?", f"value {value.name} has no shape information")
    return tuple(value.shape)


def same_dim(a: Any, b: Any) -> bool:
    """True when two dims are provably equal: equal ints, or symbolic dims of one name."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.value is not None and a.value == b.value


def static_dim(value: ir.Value, axis: int, op_name: str, what: str) -> int:
    """A dim that must be a known int (a head count, a head dim)."""
    d = dims(value)[axis]
    if not isinstance(d, int):
        raise OnnxLoweringError(op_name, f"the {what} (dim {axis} of {value.name}) must be static, got {d}")
    return d


def covers(a: tuple, b: tuple) -> bool:
    """True when a tensor of shape ``a`` has the shape of ``a + b`` (``b`` broadcasts into it)."""
    if len(b) > len(a):
        return False
    return all(same_dim(x, y) or (isinstance(y, int) and y == 1) for x, y in zip(a[len(a) - len(b):], b))


def dim_of(x: ir.Value, axis: int) -> ir.Value:
    """The size of ``x`` along ``axis`` as a 1-element int64 tensor."""
    return op.Shape(x, start=axis, end=axis + 1 if axis != -1 else None)


def ints(*v: int) -> ir.Value:
    return op.Constant(value_ints=list(v))


def scalar(v: float, dtype: ir.DataType) -> ir.Value:
    """A 0-d constant of ``dtype``."""
    return op.Constant(value=ir.tensor(np.array(v, dtype=dtype.numpy())))


def ones(n: int, dtype: ir.DataType) -> ir.Value:
    """A 1-D constant of n ones (the weight of a norm without one)."""
    return op.Constant(value=ir.tensor(np.ones(n, dtype=dtype.numpy())))


def const_ints(value: ir.Value) -> list[int] | None:
    """The integers of a constant value (an initializer or a ``Constant`` node's output), else None."""
    tensor = value.const_value
    node = value.producer()
    if tensor is None and node is not None and node.op_type == "Constant":
        attr = node.attributes.get("value") or node.attributes.get("value_ints") or node.attributes.get("value_int")
        if attr is not None and attr.type == ir.AttributeType.INTS:
            return list(attr.as_ints())
        if attr is not None and attr.type == ir.AttributeType.INT:
            return [attr.as_int()]
        tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
    return None if tensor is None else [int(i) for i in tensor.numpy().reshape(-1)]


def bias_add_parts(x: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(y, b) if ``x`` is computed as ``y = a @ w`` then ``y + b``, ``b`` 1-D along x's last dim (a linear's bias).

    The linears of a transformer export as ``MatMul`` + ``Add(bias)``; a
    fused op that takes a bias input (SkipLayerNormalization, BiasGelu,
    FastGelu) reads ``y`` and ``b`` instead of ``x``. The ``Add`` is left in
    place for any other reader and removed as dead code otherwise.
    """
    node = x.producer()
    if node is None or node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    last = dims(x)[-1]
    for y, b in (node.inputs, node.inputs[::-1]):
        if y is None or b is None or b.shape is None or b.dtype != x.dtype:
            continue
        if len(b.shape) != 1 or not same_dim(b.shape[0], last):
            continue
        # y must have x's full shape (not broadcast by the add): the output of a MatMul whose weight has D columns.
        mm = y.producer()
        if mm is None or mm.op_type != "MatMul" or len(mm.inputs) != 2 or mm.inputs[1] is None:
            continue
        a, w = mm.inputs
        columns = None
        if w.shape is not None and len(w.shape) == 2:
            columns = w.shape[1]
        elif w.producer() is not None and w.producer().op_type == "Transpose":  # linear's weight.T
            wt = w.producer().inputs[0]
            if wt.shape is not None and len(wt.shape) == 2:
                columns = wt.shape[0]
        if columns is None or not same_dim(columns, last) or a.shape is None or len(a.shape) != len(x.shape):
            continue
        return y, b
    return None


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
