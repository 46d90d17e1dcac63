"""Standard ONNX target (opset 23): the fxfuse dialect → ``Attention``, ``RMSNormalization``,
``RotaryEmbedding``, ``LayerNormalization``, ``Gelu``; for runtimes other than ONNX Runtime.
``latent_attention`` becomes ``Attention`` with the rotary parts concatenated to
the queries and to the latent keys, and the latent itself as the values.

The helpers here (mask → additive bias, layout changes, rope cache
preparation) serve the ONNX Runtime target too, which falls back on these
forms where its contrib ops cannot express a case.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir
from onnxscript import opset23 as op

from fxfuse.codegen.onnx import (
    OnnxLoweringError, const_ints, default_scale, dims, ones, same_dim, scalar, static_dim,
)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


# --- attention ---------------------------------------------------------------------------------------------

def _to_rank4(x: ir.Value) -> ir.Value:
    rank = len(dims(x))
    return x if rank == 4 else op.Unsqueeze(x, op.Constant(value_ints=list(range(4 - rank))))


def _causal_bias(q: ir.Value, k: ir.Value) -> ir.Value:
    """(1, 1, Sq, Sk): 0 where key j <= query i (top-left aligned), -inf above."""
    size = op.Concat(op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0)
    keep = op.Trilu(op.Expand(op.Constant(value=ir.tensor(True)), size), upper=0)
    bias = op.Where(keep, scalar(0.0, q.dtype), scalar(float("-inf"), q.dtype))
    return op.Unsqueeze(bias, op.Constant(value_ints=[0, 1]))


def attention_bias(q: ir.Value, k: ir.Value, mask: Optional[ir.Value], causal: bool,
                   full: bool) -> tuple[Optional[ir.Value], Optional[ir.Value], object]:
    """The mask (and ``causal``, top-left aligned) as one additive bias in q's dtype, rank 4, and the rows it keeps.

    Returns ``(bias, valid, heads)``: ``bias`` broadcasts to (B, H, Sq, Sk) —
    with ``full`` its last two dims are exactly (Sq, Sk), as ORT's contrib
    ops require; ``valid`` (b, heads, Sq | 1, 1) is False on query rows whose
    every key is masked (``-inf``), which the dialect defines as zeros.
    ``bias`` is None without a mask or causal bias; ``valid`` is None when no
    row can be fully masked.
    """
    if mask is None and not causal:
        return None, None, 1
    bias = valid = None
    heads: object = 1
    if mask is not None:
        md = dims(mask)
        if len(md) > 4:
            raise OnnxLoweringError("attention", f"a mask of rank {len(md)} (at most 4 expected)")
        m4 = (1,) * (4 - len(md)) + md
        heads = m4[1]
        if mask.dtype == ir.DataType.BOOL:
            bias = op.Where(mask, scalar(0.0, q.dtype), scalar(float("-inf"), q.dtype))
        elif mask.dtype in _FLOAT_TYPES:
            bias = mask if mask.dtype == q.dtype else op.CastLike(mask, q)
        else:
            raise OnnxLoweringError("attention", f"a mask of dtype {mask.dtype} (bool or float expected)")
        if len(md) < 4:
            bias = op.Unsqueeze(bias, op.Constant(value_ints=list(range(4 - len(md)))))
        exact = same_dim(m4[2], dims(q)[2]) and same_dim(m4[3], dims(k)[2])
    if causal:
        # Alone, a top-left causal mask leaves key 0 to every row: no row is fully masked.
        bias = _causal_bias(q, k) if bias is None else op.Add(bias, _causal_bias(q, k))
        exact = True
    if mask is not None:
        row_max = op.ReduceMax(bias, op.Constant(value_ints=[-1]), keepdims=1)
        valid = op.Not(op.IsInf(row_max, detect_negative=1, detect_positive=0))
    if full and not exact:
        size = op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3),
                         axis=0)
        bias = op.Expand(bias, size)
    return bias, valid, heads


def bhsd_to_bsd(x: ir.Value, width: int) -> ir.Value:
    """(B, H, S, D) → (B, S, H·D)."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, width]))


def bsd_to_bhsd(x: ir.Value, heads: int, head_dim: int) -> ir.Value:
    """(B, S, H·D) → (B, H, S, D)."""
    return op.Transpose(op.Reshape(x, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])


def zero_masked_rows(out: ir.Value, valid: Optional[ir.Value], valid_heads: object, heads: int,
                     head_dim: int, dtype: ir.DataType) -> ir.Value:
    """Zero the query rows of ``out`` (B, Sq, H·Dv) that ``valid`` (b, valid_heads, Sq, 1) marks fully masked."""
    if valid is None:
        return out
    zero = scalar(0.0, dtype)
    if isinstance(valid_heads, int) and valid_heads == 1:
        return op.Where(op.Squeeze(valid, op.Constant(value_ints=[1])), out, zero)
    per_head = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim]))
    kept = op.Where(op.Transpose(valid, perm=[0, 2, 1, 3]), per_head, zero)
    return op.Reshape(kept, op.Constant(value_ints=[0, 0, heads * head_dim]))


def attention(q: ir.Value, k: ir.Value, v: ir.Value, mask: Optional[ir.Value] = None, scale: Optional[float] = None,
              causal: bool = False, softcap: Optional[float] = None, sinks: Optional[ir.Value] = None) -> ir.Value:
    """Opset-23 ``Attention`` on (B, H, S, D) tensors: grouped heads, bool or float mask, causal, soft-cap, sinks."""
    d = static_dim(q, 3, "attention", "head dim")
    attrs = {"scale": default_scale(d, scale), "is_causal": int(bool(causal))}
    if softcap is not None:
        attrs["softcap"] = float(softcap)
    if q.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        attrs["softmax_precision"] = int(ir.DataType.FLOAT)  # the dialect takes the softmax in at least float32
    if sinks is not None:
        return _attention_with_sinks(q, k, v, mask, bool(causal), sinks, {**attrs, "is_causal": 0})
    if mask is None:
        return op.Attention(q, k, v, **attrs)[0]
    attn_mask = mask
    md = dims(mask)
    if len(md) < 2 or not (same_dim(md[-2], dims(q)[2]) and same_dim(md[-1], dims(k)[2])):
        # ONNX Runtime wants the mask's last two dims to be exactly (Sq, Sk), not broadcast.
        size = op.Concat(op.Constant(value_ints=[1] * max(len(md) - 2, 0)), op.Shape(q, start=2, end=3),
                         op.Shape(k, start=2, end=3), axis=0)
        attn_mask = op.Expand(mask, size)
    if mask.dtype in _FLOAT_TYPES:
        # ONNX Runtime's kernel gives zeros for a row whose every entry is the dtype's lowest value (as HF masks
        # write them); the dialect (SDPA) gives the uniform average there. One step above lowest keeps the math.
        # Only entries at exactly the lowest value move: -inf (a causal mask beside finfo.min padding) stays -inf.
        np_type = q.dtype.numpy().type
        lowest = np.finfo(np_type).min
        floor = np.nextafter(lowest, np_type(0), dtype=np_type)
        attn_mask = attn_mask if mask.dtype == q.dtype else op.Cast(attn_mask, to=q.dtype)
        attn_mask = op.Where(op.Equal(attn_mask, op.Constant(value=ir.tensor(np.array(lowest, dtype=np_type)))),
                             op.Constant(value=ir.tensor(np.array(floor, dtype=np_type))), attn_mask)
    out = op.Attention(q, k, v, attn_mask, **attrs)[0]
    _, valid, _ = attention_bias(q, k, mask, bool(causal), full=False)  # rows the mask (and causal) leave empty
    return op.Where(valid, out, scalar(0.0, q.dtype))


def _attention_with_sinks(q: ir.Value, k: ir.Value, v: ir.Value, mask: Optional[ir.Value], causal: bool,
                          sinks: ir.Value, attrs: dict) -> ir.Value:
    """Sinks as n extra keys whose score is the sink logit and whose value is zero.

    q·0 is 0, so each extra key's score is its mask entry, the sink logit; its
    zero value adds nothing to the output, only exp(sink) to the row's
    denominator: exactly the dialect's sinks. No row is left fully masked.
    """
    n = static_dim(sinks, -1, "attention", "sink count")
    bias, _, _ = attention_bias(q, k, mask, causal, full=False)
    rows = op.Concat(op.Shape(q, start=0, end=3), op.Shape(k, start=2, end=3), axis=0)  # (B, Hq, Sq, Sk)
    bias = op.Expand(scalar(0.0, q.dtype) if bias is None else bias, rows)
    sink_cols = op.Expand(op.CastLike(_to_rank4(sinks), q),
                          op.Concat(op.Shape(q, start=0, end=3), op.Constant(value_ints=[n]), axis=0))
    extra = {}
    for name, t in (("k", k), ("v", v)):
        size = op.Concat(op.Shape(t, start=0, end=2), op.Constant(value_ints=[n]), op.Shape(t, start=3, end=4),
                         axis=0)
        extra[name] = op.Concat(t, op.Expand(scalar(0.0, t.dtype), size), axis=2)
    return op.Attention(q, extra["k"], extra["v"], op.Concat(bias, sink_cols, axis=3), **attrs)[0]


def latent_query_key(q_latent: ir.Value, q_rope: ir.Value, latent: ir.Value, k_rope: ir.Value,
                     scale: Optional[float]) -> tuple[ir.Value, ir.Value, float]:
    """``latent_attention`` as plain attention: (queries, keys, scale), the rotary parts concatenated to the
    latent ones (the values are the latent itself); no ``Concat`` when the rotary dim is 0."""
    r = static_dim(q_latent, 3, "latent_attention", "latent dim")
    dr = static_dim(q_rope, 3, "latent_attention", "rotary dim")
    scale = default_scale(r + dr, scale)
    if dr == 0:
        return q_latent, latent, scale
    return _concat_last(q_latent, q_rope, r + dr), _concat_last(latent, k_rope, r + dr), scale


def _concat_last(a: ir.Value, b: ir.Value, width: int) -> ir.Value:
    """``Concat`` along the last dim, with the shape and dtype the attention lowerings read (tracing infers none)."""
    out = op.Concat(a, b, axis=-1)
    out.shape = ir.Shape([*dims(a)[:-1], width])
    out.dtype = a.dtype
    return out


def latent_attention(q_latent: ir.Value, q_rope: ir.Value, latent: ir.Value, k_rope: ir.Value,
                     mask: Optional[ir.Value] = None, scale: Optional[float] = None, causal: bool = False) -> ir.Value:
    """Opset-23 ``Attention`` with keys cat(latent, k_rope) and the latent as values (ONNX has no latent op)."""
    q, k, scale = latent_query_key(q_latent, q_rope, latent, k_rope, scale)
    return attention(q, k, latent, mask, scale, causal)


# --- norms -------------------------------------------------------------------------------------------------

def _weight(weight: Optional[ir.Value], ref: ir.Value, name: str) -> ir.Value:
    """The norm's weight, or ones of ``ref``'s last dim and dtype (``ref``: an input with static shape info)."""
    return weight if weight is not None else ones(static_dim(ref, -1, name, "normalized (last) dim"), ref.dtype)


def _layer_norm(x: ir.Value, weight: Optional[ir.Value], bias: Optional[ir.Value], eps: float,
                ref: ir.Value) -> ir.Value:
    y, _, _ = op.LayerNormalization(x, _weight(weight, ref, "layer_norm"), bias, axis=-1, epsilon=float(eps))
    return y


def layer_norm(x: ir.Value, weight: Optional[ir.Value], bias: Optional[ir.Value], eps: float) -> ir.Value:
    return _layer_norm(x, weight, bias, eps, x)


def add_layer_norm(x: ir.Value, residual: ir.Value, weight: Optional[ir.Value], bias: Optional[ir.Value],
                   eps: float) -> tuple[ir.Value, ir.Value]:
    s = op.Add(x, residual)
    return _layer_norm(s, weight, bias, eps, x), s


def _rms_norm(x: ir.Value, weight: Optional[ir.Value], eps: float, ref: ir.Value) -> ir.Value:
    """RMSNormalization in float32 (stash_type=1), then ``weight *`` in the promoted dtype, as the dialect says."""
    if weight is None or weight.dtype == ref.dtype:
        return op.RMSNormalization(x, _weight(weight, ref, "rms_norm"), axis=-1, epsilon=float(eps), stash_type=1)
    normalized = op.RMSNormalization(x, _weight(None, ref, "rms_norm"), axis=-1, epsilon=float(eps), stash_type=1)
    wide = weight.dtype if _wider(weight.dtype, ref.dtype) else ref.dtype
    return op.Mul(op.Cast(weight, to=wide), op.Cast(normalized, to=wide))


def rms_norm(x: ir.Value, weight: Optional[ir.Value], eps: float) -> ir.Value:
    return _rms_norm(x, weight, eps, x)


def _wider(a: ir.DataType, b: ir.DataType) -> bool:
    order = [ir.DataType.BFLOAT16, ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE]
    return order.index(a) > order.index(b) if a in order and b in order else False


def add_rms_norm(x: ir.Value, residual: ir.Value, weight: Optional[ir.Value], eps: float) -> tuple[ir.Value, ir.Value]:
    s = op.Add(x, residual)
    return _rms_norm(s, weight, eps, x), s


# --- activations -------------------------------------------------------------------------------------------

def _quick_gelu(x: ir.Value, alpha: float) -> ir.Value:
    return op.Mul(x, op.Sigmoid(op.Mul(x, scalar(alpha, x.dtype))))


def gelu(x: ir.Value, approximate: str = "none") -> ir.Value:
    if approximate == "sigmoid":
        return _quick_gelu(x, 1.702)
    if approximate in ("none", "tanh"):
        return op.Gelu(x, approximate=approximate)
    raise OnnxLoweringError("gelu", f"unknown approximation {approximate!r}")


def gated_mlp_act(gate: ir.Value, up: ir.Value, activation: str) -> ir.Value:
    if activation == "silu":
        act = op.Mul(gate, op.Sigmoid(gate))
    elif activation in ("gelu", "gelu_tanh"):
        act = op.Gelu(gate, approximate="none" if activation == "gelu" else "tanh")
    else:
        raise OnnxLoweringError("gated_mlp_act", f"unknown activation {activation!r}")
    return op.Mul(act, up)


# --- rotary embedding --------------------------------------------------------------------------------------

def rope(q: ir.Value, k: ir.Value, cos: ir.Value, sin: ir.Value,
         interleaved: bool = False) -> tuple[ir.Value, ir.Value]:
    plan = rope_plan(q, k, cos, sin, interleaved)
    if plan is None:
        return rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)
    cos_cache, sin_cache, positions = plan.caches(q, cos, sin)

    def rotary(x: ir.Value, **attrs) -> ir.Value:
        return op.RotaryEmbedding(x, cos_cache, sin_cache, positions, **attrs)

    return plan.apply(q, rotary), plan.apply(k, rotary)


def rotate(x: ir.Value, cos: ir.Value, sin: ir.Value, interleaved: bool) -> ir.Value:
    """x·cos + rot(x)·sin on the first R = cos.shape[-1] dims of x, the rest passed through (standard ops)."""
    r = static_dim(cos, -1, "rope", "rotary dim")
    d = static_dim(x, -1, "rope", "head dim")
    last = op.Constant(value_ints=[-1])
    xr = x if r == d else op.Slice(x, op.Constant(value_ints=[0]), op.Constant(value_ints=[r]), last)
    if interleaved:
        pairs = op.Reshape(xr, op.Constant(value_ints=[0] * (len(dims(x)) - 1) + [r // 2, 2]))
        even, odd = op.Split(pairs, axis=-1, num_outputs=2)
        rotated = op.Reshape(op.Concat(op.Neg(odd), even, axis=-1), op.Shape(xr))
    else:
        first, second = op.Split(xr, axis=-1, num_outputs=2)
        rotated = op.Concat(op.Neg(second), first, axis=-1)
    out = op.Add(op.Mul(xr, cos), op.Mul(rotated, sin))
    if r == d:
        return out
    rest = op.Slice(x, op.Constant(value_ints=[r]), op.Constant(value_ints=[d]), last)
    return op.Concat(out, rest, axis=-1)


# Ops through which "cos is made of two equal halves (pairs)" carries over: elementwise on the value alone,
# or with a one-element constant, or moving dims other than the last.
_ELEMENTWISE = {"Cos", "Sin", "Cast", "CastLike", "Identity", "Neg"}
_WITH_SCALAR = {"Mul", "Div", "Add", "Sub"}
_DIM_MOVES = {"Unsqueeze", "Squeeze", "Expand", "Reshape", "Transpose", "Slice"}


def _numel_one(v: ir.Value) -> bool:
    """A one-element constant (a scalar scale such as the rotary ``attention_scaling``)."""
    tensor = v.const_value
    node = v.producer()
    if tensor is None and node is not None and node.op_type == "Constant":
        attr = next(iter(node.attributes.values()), None)
        if attr is not None and attr.type in (ir.AttributeType.FLOAT, ir.AttributeType.INT):
            return True
        tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
    return tensor is not None and tensor.size == 1


def _halves_equal(value: ir.Value, interleaved: bool, depth: int = 0) -> bool:
    """True if ``value``'s last dim is provably [a, a] (halves) or [a0, a0, a1, a1, …] (pairs), by its producers."""
    node = value.producer()
    if node is None or depth > 16:
        return False
    kind = node.op_type
    if kind in _ELEMENTWISE:
        return _halves_equal(node.inputs[0], interleaved, depth + 1)
    if kind in _WITH_SCALAR:
        a, b = node.inputs
        if _numel_one(b):
            return _halves_equal(a, interleaved, depth + 1)
        return _numel_one(a) and _halves_equal(b, interleaved, depth + 1)
    if interleaved and kind == "Reshape" and _repeats_pairs(value, node):
        return True
    if kind in _DIM_MOVES:
        src = node.inputs[0]
        if src.shape is None or value.shape is None or not src.shape or not value.shape:
            return False
        if not same_dim(src.shape[-1], value.shape[-1]) or (kind == "Transpose" and _moves_last(node)):
            return False
        return _halves_equal(src, interleaved, depth + 1)
    if not interleaved and kind == "Concat":
        axis = node.attributes["axis"].as_int()
        rank = len(value.shape) if value.shape is not None else None
        last = axis == -1 or (rank is not None and axis == rank - 1)
        return last and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
    return False


def _repeats_pairs(value: ir.Value, reshape: ir.Node) -> bool:
    """``value`` = repeat_interleave(c, 2, -1), as exported: Reshape(Expand(Unsqueeze(c, -1), …, 2), …, 2m)."""
    expand = reshape.inputs[0].producer()
    unsqueeze = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or value.shape is None:
        return False
    src, out = unsqueeze.inputs[0], tuple(value.shape)
    axes = const_ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    if src.shape is None or axes is None or len(axes) != 1 or axes[0] not in (-1, len(src.shape)):
        return False
    inner = tuple(src.shape)
    # Same leading dims, last dim doubled: the new trailing axis (size 1) was expanded to 2 and merged.
    return len(inner) == len(out) and all(same_dim(a, b) for a, b in zip(inner[:-1], out[:-1])) \
        and isinstance(inner[-1], int) and isinstance(out[-1], int) and out[-1] == 2 * inner[-1]


def _moves_last(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    if perm is None:
        return True
    p = perm.as_ints()
    return p[-1] != len(p) - 1


class RopePlan:
    """How a rope maps onto a RotaryEmbedding op: where q's head axis is, and the rotary dim."""

    def __init__(self, head_axis: int, rotary_dim: int, head_dim: int, interleaved: bool, per_batch: bool) -> None:
        self.head_axis, self.rotary_dim, self.head_dim = head_axis, rotary_dim, head_dim
        self.interleaved = interleaved
        self.per_batch = per_batch  # cos has a batch dim (per-sequence positions), else it is shared

    def caches(self, q: ir.Value, cos: ir.Value, sin: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(cos_cache, sin_cache, position_ids): caches of one half (pair) per (batch, position) row, and ids.

        cos (b, 1, S, R) with b = 1 or B → a (b·S, R/2) cache read at ``position_ids`` (B, S). No ``Expand``
        over the batch: onnxscript 0.7's optimizer drops a batch-broadcasting Expand feeding a Slice of a
        Concat (it then hands RotaryEmbedding a batch-1 cache).
        """
        seq_axis = 3 - self.head_axis
        r, half = self.rotary_dim, self.rotary_dim // 2
        caches = []
        for c in (cos, sin):
            c = op.Squeeze(_to_rank4(c), op.Constant(value_ints=[self.head_axis]))  # (b, S, R)
            c = op.Slice(c, op.Constant(value_ints=[0]), op.Constant(value_ints=[r if self.interleaved else half]),
                         op.Constant(value_ints=[-1]), op.Constant(value_ints=[2 if self.interleaved else 1]))
            caches.append(op.Reshape(c, op.Constant(value_ints=[-1, half])))
        batch, seq = op.Shape(q, start=0, end=1), op.Shape(q, start=seq_axis, end=seq_axis + 1)
        scalar_seq = op.Squeeze(seq, op.Constant(value_ints=[0]))
        if self.per_batch:  # row b·S + s
            count = op.Mul(op.Squeeze(batch, op.Constant(value_ints=[0])), scalar_seq)
            positions = op.Reshape(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)),
                                   op.Concat(batch, seq, axis=0))
        else:  # row s, for every batch
            zeros = op.ConstantOfShape(op.Concat(batch, seq, axis=0),
                                       value=ir.tensor(np.zeros(1, dtype=np.int64)))
            positions = op.Add(zeros, op.Range(op.Constant(value_int=0), scalar_seq, op.Constant(value_int=1)))
        return caches[0], caches[1], positions

    def apply(self, x: ir.Value, rotary, heads_with_partial: bool = False) -> ir.Value:
        """Run ``rotary(x, **attrs)`` on x in a layout the op takes ((B, H, S, D) or (B, S, H·D)); x's layout back.

        ``heads_with_partial``: the op wants ``num_heads`` whenever
        ``rotary_embedding_dim`` is set (ORT's contrib op).
        """
        heads = dims(x)[self.head_axis]
        attrs = {"interleaved": int(self.interleaved)}
        if self.rotary_dim != self.head_dim:
            attrs["rotary_embedding_dim"] = self.rotary_dim
            if heads_with_partial:
                attrs["num_heads"] = heads
        if self.head_axis == 1:  # (B, H, S, D): the op's 4-D layout
            return rotary(x, **attrs)
        attrs["num_heads"] = heads  # (B, S, H, D): as (B, S, H·D)
        flat = op.Reshape(x, op.Constant(value_ints=[0, 0, heads * self.head_dim]))
        return op.Reshape(rotary(flat, **attrs), op.Constant(value_ints=[0, 0, heads, self.head_dim]))


def rope_plan(q: ir.Value, k: ir.Value, cos: ir.Value, sin: ir.Value, interleaved: bool) -> Optional[RopePlan]:
    """A plan for a RotaryEmbedding op, or None where only the standard-op form is exact."""
    qd, kd, cd = dims(q), dims(k), dims(cos)
    if len(qd) != 4 or len(kd) != 4 or len(cd) > 4 or q.dtype not in _FLOAT_TYPES:
        return None
    if dims(sin) != cd or not (_halves_equal(cos, interleaved) and _halves_equal(sin, interleaved)):
        return None
    r, d = cd[-1], qd[-1]
    if not (isinstance(r, int) and isinstance(d, int) and same_dim(kd[-1], d)):
        return None
    c4 = (1,) * (4 - len(cd)) + cd
    # The head axis: where q has a static head count and cos has 1; the other of axes 1, 2 is the sequence.
    candidates = [a for a in (1, 2) if isinstance(qd[a], int) and isinstance(kd[a], int)
                  and isinstance(c4[a], int) and c4[a] == 1]
    if len(candidates) != 1:
        return None
    head_axis = candidates[0]
    seq_axis = 3 - head_axis
    if not (same_dim(qd[seq_axis], kd[seq_axis]) and same_dim(qd[0], kd[0]) and same_dim(c4[seq_axis], qd[seq_axis])):
        return None
    if same_dim(c4[0], qd[0]):
        per_batch = True
    elif isinstance(c4[0], int) and c4[0] == 1:
        per_batch = False
    else:
        return None
    return RopePlan(head_axis, r, d, interleaved, per_batch)