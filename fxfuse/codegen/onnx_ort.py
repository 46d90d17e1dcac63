"""ONNX Runtime target: the fxfuse dialect → ``com.microsoft`` contrib ops.

Which op each dialect op becomes, and why:

* ``attention`` → ``MultiHeadAttention`` when query and key/value have the
  same head count and no soft-cap (BERT, GPT-2, T5, …);
  ``GroupQueryAttention`` for grouped/multi-query heads or a soft-cap (it
  reads K/V with fewer heads without repeating them, has ``softcap``, and
  with ``causal=0`` takes any additive ``attention_bias``); the standard
  opset-23 ``Attention`` where neither fits (cross-attention with grouped
  heads or a soft-cap, a value head dim unlike the key's). Query, key and
  value go in as (B, S, H·D) — the transposes back from (B, H, S, D) cancel
  against the model's own. A mask becomes an additive bias of shape
  (B|1, H|1, Sq, Sk) (``-inf`` where a boolean mask is False); ``causal``
  uses the op's own causal mode for self-attention and is folded into the
  bias otherwise. A query row whose every key is masked gives zeros, as the
  dialect says (the ORT kernels give NaN or a uniform average there).
* ``latent_attention`` → the ``attention`` lowering of queries
  cat(q_latent, q_rope), keys cat(latent, k_rope) and the latent as values
  (ORT has no latent attention op): ``GroupQueryAttention`` without a rotary
  part, ``MultiHeadAttention`` for one latent per head, the standard
  ``Attention`` for grouped heads with a rotary part (the value head dim
  differs from the key's).
* ``add_layer_norm`` → ``SkipLayerNormalization`` and ``add_rms_norm`` →
  ``SkipSimplifiedLayerNormalization`` (their 4th output is the sum); the
  bias of a linear that feeds them moves into the op's ``bias`` input.
* ``layer_norm`` → ``LayerNormalization``; ``rms_norm`` → the standard
  ``RMSNormalization`` (ORT's ``SimplifiedLayerNormalization`` sits in the
  ONNX domain, which ``onnx.checker`` rejects).
* ``gelu`` → ``Gelu`` / ``BiasGelu`` (erf), ``FastGelu`` (tanh, with its
  bias), ``QuickGelu`` (x·σ(1.702x)).
* ``gated_mlp_act`` → ``QuickGelu(alpha=1)`` (= SiLU), ``Gelu`` or
  ``FastGelu`` of the gate times the up projection: ORT has no fused gated
  MLP for float weights on CPU (only MoE and 4-bit ``MatMulNBitsMlp``).
* ``rope`` → ``RotaryEmbedding`` when cos and sin are provably made of two
  equal halves (rotate_half) or of equal pairs (interleaved), which is how
  every rotary embedding computes them and what the contrib op assumes
  (it takes half-width caches); otherwise the standard-op form.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir
from onnxscript import opset23 as op

from fxfuse.codegen import onnx_std
from fxfuse.codegen.onnx import (
    OnnxLoweringError, bias_add_parts, const_ints, contrib_op, default_scale, dims, ones, same_dim, static_dim,
)
from fxfuse.codegen.onnx_std import attention_bias, bhsd_to_bsd, bsd_to_bhsd, latent_query_key, zero_masked_rows

_MHA = contrib_op(
    "MultiHeadAttention",
    ["query", "key?", "value?", "bias?", "key_padding_mask?", "attention_bias?"],
    ["output"],
    {"num_heads": int, "scale": float, "unidirectional": int, "mask_filter_value": float},
)
_PACKED = contrib_op(
    "Attention",
    ["input", "weights", "bias?", "mask_index?", "past?", "attention_bias?"],
    ["output"],
    {"num_heads": int, "scale": float, "unidirectional": int, "mask_filter_value": float},
)
_GQA = contrib_op(
    "GroupQueryAttention",
    ["query", "key?", "value?", "past_key?", "past_value?", "seqlens_k", "total_sequence_length",
     "cos_cache?", "sin_cache?", "position_ids?", "attention_bias?"],
    ["output"],
    {"num_heads": int, "kv_num_heads": int, "scale": float, "softcap": float, "causal": int, "local_window_size": int},
)
_SKIP_LN = contrib_op("SkipLayerNormalization", ["input", "skip", "gamma", "beta?", "bias?"],
                      ["output", "mean?", "inv_std_var?", "input_skip_bias_sum?"], {"epsilon": float})
_SKIP_RMS = contrib_op("SkipSimplifiedLayerNormalization", ["input", "skip", "gamma", "bias?"],
                       ["output", "mean?", "inv_std_var?", "input_skip_bias_sum?"], {"epsilon": float})
_GELU = contrib_op("Gelu", ["X"], ["Y"], {})
_BIAS_GELU = contrib_op("BiasGelu", ["A", "B"], ["C"], {})
_FAST_GELU = contrib_op("FastGelu", ["X", "bias?"], ["Y"], {})
_QUICK_GELU = contrib_op("QuickGelu", ["X"], ["Y"], {"alpha": float})
_ROTARY = contrib_op("RotaryEmbedding", ["input", "position_ids", "cos_cache", "sin_cache"], ["output"],
                     {"num_heads": int, "rotary_embedding_dim": int, "interleaved": int})


def attention(q: ir.Value, k: ir.Value, v: ir.Value, mask: Optional[ir.Value] = None, scale: Optional[float] = None,
              causal: bool = False, softcap: Optional[float] = None, sinks: Optional[ir.Value] = None) -> ir.Value:
    if sinks is not None:  # no contrib op takes sink logits: the standard op with extra zero keys does
        return onnx_std.attention(q, k, v, mask, scale, causal, softcap, sinks)
    name = "attention"
    hq, d = static_dim(q, 1, name, "query head count"), static_dim(q, 3, name, "head dim")
    hkv, dv = static_dim(k, 1, name, "key/value head count"), static_dim(v, 3, name, "value head dim")
    self_attention = same_dim(dims(q)[2], dims(k)[2])
    grouped = hkv != hq or softcap is not None
    if grouped and not (self_attention and d == dv):
        # GroupQueryAttention needs self-attention and one head dim: the standard op covers the rest.
        return onnx_std.attention(q, k, v, mask, scale, causal, softcap)
    # Self-attention with no mask: the op's own causal mode (top-left = bottom-right when Sq == Sk).
    native_causal = bool(causal) and mask is None and self_attention
    bias, valid, valid_heads = attention_bias(q, k, mask, causal and not native_causal, full=True)
    scale = default_scale(d, scale)
    packed = None if grouped or d != dv or not self_attention else _packed_projection(q, k, v, hq * d)
    if packed is not None:
        x, weights, qkv_bias = packed
        if qkv_bias is None:  # ORT 1.31's CPU kernel crashes (segfault) without the optional bias
            qkv_bias = op.Constant(value=ir.tensor(np.zeros(3 * hq * d, dtype=q.dtype.numpy())))
        out = _PACKED(x, weights, qkv_bias, None, None, bias, num_heads=hq, scale=scale,
                      unidirectional=int(native_causal))
        return bsd_to_bhsd(zero_masked_rows(out, valid, valid_heads, hq, dv, q.dtype), hq, dv)
    # (B, H, S, D) → (B, S, H·D): these transposes cancel against the model's own when the ONNX graph is optimized.
    q3, k3, v3 = bhsd_to_bsd(q, hq * d), bhsd_to_bsd(k, hkv * d), bhsd_to_bsd(v, hkv * dv)
    if not grouped:
        out = _MHA(q3, k3, v3, None, None, bias, num_heads=hq, scale=scale, unidirectional=int(native_causal))
    else:
        # No KV cache, no padding known to the op: every row holds Sk keys (the mask is in the bias).
        seq = op.Cast(op.Shape(k, start=2, end=3), to=ir.DataType.INT32)
        one = op.Cast(op.Constant(value_ints=[1]), to=ir.DataType.INT32)
        seqlens = op.Expand(op.Sub(seq, one), op.Shape(q, start=0, end=1))
        total = op.Squeeze(seq, op.Constant(value_ints=[0]))
        out = _GQA(q3, k3, v3, None, None, seqlens, total, None, None, None, bias,
                   num_heads=hq, kv_num_heads=hkv, scale=scale, softcap=float(softcap or 0.0),
                   causal=int(native_causal))
    return bsd_to_bhsd(zero_masked_rows(out, valid, valid_heads, hq, dv, q.dtype), hq, dv)


def latent_attention(q_latent: ir.Value, q_rope: ir.Value, latent: ir.Value, k_rope: ir.Value,
                     mask: Optional[ir.Value] = None, scale: Optional[float] = None, causal: bool = False) -> ir.Value:
    """``attention`` with keys cat(latent, k_rope) and the latent as values: ORT has no latent attention op."""
    q, k, scale = latent_query_key(q_latent, q_rope, latent, k_rope, scale)
    return attention(q, k, latent, mask, scale, causal)


def _heads_of(t: ir.Value, width: int) -> Optional[tuple[ir.Node, int]]:
    """(split, i) if t = Transpose(Reshape(part i of split(qkv, 3 × width, -1), (B, S, H, D)), (0, 2, 1, 3)).

    The split is a ``Split`` node or, as torch's exporter writes
    ``split_with_sizes`` + ``getitem``, a ``SplitToSequence`` read by index.
    """
    node = t.producer()
    perm = node.attributes.get("perm") if node is not None and node.op_type == "Transpose" else None
    if perm is None or list(perm.as_ints()) != [0, 2, 1, 3]:
        return None
    reshape = node.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    part = reshape.inputs[0]
    if part.shape is None or len(part.shape) != 3 or not same_dim(part.shape[-1], width):
        return None
    split = part.producer()
    if split is None:
        return None
    if split.op_type == "Split":
        index = part.index()
    elif split.op_type in ("aten_getitem", "SequenceAt") and len(split.inputs) == 2:
        index = const_ints(split.inputs[1])
        index = index[0] if index is not None and len(index) == 1 else None
        split = split.inputs[0].producer()
        if split is None or split.op_type != "SplitToSequence":
            return None
    else:
        return None
    axis = split.attributes.get("axis")
    qkv = split.inputs[0]
    if index is None or axis is None or axis.as_int() not in (-1, 2) or qkv.shape is None or len(qkv.shape) != 3 \
            or qkv.shape[-1] != 3 * width:
        return None
    return split, index


def _packed_projection(q: ir.Value, k: ir.Value, v: ir.Value, width: int) -> Optional[tuple]:
    """(x, W, b) when q, k and v are the three equal parts of one linear ``x @ W + b`` (merge-projections' QKV).

    The packed ``Attention`` op then computes that projection itself, straight
    into its per-head layout: one op instead of MatMul, Add, Split and the
    reshapes and transposes of q, k and v (the projection nodes stay for any
    other reader and are removed as dead code otherwise).
    """
    parts = [_heads_of(t, width) for t in (q, k, v)]
    if any(p is None for p in parts) or not (parts[0][0] is parts[1][0] is parts[2][0]) \
            or [p[1] for p in parts] != [0, 1, 2]:
        return None
    qkv = parts[0][0].inputs[0]
    with_bias = bias_add_parts(qkv)
    out, b = with_bias if with_bias else (qkv, None)
    matmul = out.producer()
    if matmul is not None and matmul.op_type == "MatMul":
        x, w = matmul.inputs
        return (x, w, b) if x.shape is not None and len(x.shape) == 3 else None
    return _flat_linear(qkv) if with_bias is None else None


def _flat_linear(y: ir.Value) -> Optional[tuple]:
    """(x, W, b) for y = (x.reshape(-1, K) @ W + b).reshape(B, S, N): GPT-2's Conv1D (``addmm``, a ``Gemm``)."""
    unflatten = y.producer()
    gemm = unflatten.inputs[0].producer() if unflatten is not None and unflatten.op_type == "Reshape" else None
    if gemm is None or gemm.op_type != "Gemm":
        return None
    attrs = {name: attr.value for name, attr in gemm.attributes.items()}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    flatten = gemm.inputs[0].producer()
    if flatten is None or flatten.op_type != "Reshape":
        return None
    x = flatten.inputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if x.shape is None or y.shape is None or len(x.shape) != 3 or len(y.shape) != 3 \
            or not all(same_dim(a, c) for a, c in zip(x.shape[:2], y.shape[:2])) \
            or (bias is not None and (bias.shape is None or len(bias.shape) != 1)):
        return None
    w = gemm.inputs[1]
    return x, op.Transpose(w, perm=[1, 0]) if attrs.get("transB", 0) else w, bias


def _skip_inputs(x: ir.Value, residual: ir.Value) -> tuple[ir.Value, ir.Value, Optional[ir.Value]] | None:
    """(input, skip, bias) for a Skip*Normalization computing x + residual, or None if it cannot.

    The skip input may broadcast only over the batch; a linear's bias on the
    full-shape operand moves into the op's bias input.
    """
    a, b = dims(x), dims(residual)
    if len(a) not in (2, 3) or len(b) not in (2, 3):
        return None

    def fits(full: tuple, skip: tuple) -> bool:
        if len(full) == 3 and len(skip) == 3:
            return all(same_dim(f, s) for f, s in zip(full, skip)) or (
                isinstance(skip[0], int) and skip[0] == 1 and all(same_dim(f, s) for f, s in zip(full[1:], skip[1:])))
        if len(full) == 3 and len(skip) == 2:
            return all(same_dim(f, s) for f, s in zip(full[1:], skip))
        return len(full) == len(skip) == 2 and all(same_dim(f, s) for f, s in zip(full, skip))

    for full, skip, shape in ((x, residual, a), (residual, x, b)):
        if fits(shape, dims(skip)):
            parts = bias_add_parts(full)
            return (parts[0], skip, parts[1]) if parts else (full, skip, None)
    return None


def add_layer_norm(x: ir.Value, residual: ir.Value, weight: Optional[ir.Value], bias: Optional[ir.Value],
                   eps: float) -> tuple[ir.Value, ir.Value]:
    parts = _skip_inputs(x, residual)
    if parts is None:  # a broadcast the op cannot take: add, then norm
        return onnx_std.add_layer_norm(x, residual, weight, bias, eps)
    inp, skip, linear_bias = parts
    gamma = weight if weight is not None else ones(static_dim(x, -1, "add_layer_norm", "hidden size"), x.dtype)
    y, _, _, s = _SKIP_LN(inp, skip, gamma, bias, linear_bias, epsilon=float(eps))
    return y, s


def add_rms_norm(x: ir.Value, residual: ir.Value, weight: Optional[ir.Value], eps: float) -> tuple[ir.Value, ir.Value]:
    parts = _skip_inputs(x, residual)
    if parts is None or (weight is not None and weight.dtype != x.dtype):
        return onnx_std.add_rms_norm(x, residual, weight, eps)
    inp, skip, linear_bias = parts
    gamma = weight if weight is not None else ones(static_dim(x, -1, "add_rms_norm", "hidden size"), x.dtype)
    y, _, _, s = _SKIP_RMS(inp, skip, gamma, linear_bias, epsilon=float(eps))
    return y, s


layer_norm = onnx_std.layer_norm
rms_norm = onnx_std.rms_norm


def gelu(x: ir.Value, approximate: str = "none") -> ir.Value:
    if approximate == "sigmoid":
        return _QUICK_GELU(x, alpha=1.702)
    parts = bias_add_parts(x)
    if approximate == "tanh":
        return _FAST_GELU(*parts) if parts else _FAST_GELU(x)
    if approximate == "none":
        return _BIAS_GELU(*parts) if parts else _GELU(x)
    raise OnnxLoweringError("gelu", f"unknown approximation {approximate!r}")


def gated_mlp_act(gate: ir.Value, up: ir.Value, activation: str) -> ir.Value:
    if activation == "silu":
        act = _QUICK_GELU(gate, alpha=1.0)
    elif activation == "gelu":
        act = _GELU(gate)
    elif activation == "gelu_tanh":
        act = _FAST_GELU(gate)
    else:
        raise OnnxLoweringError("gated_mlp_act", f"unknown activation {activation!r}")
    return op.Mul(act, up)


def rope(q: ir.Value, k: ir.Value, cos: ir.Value, sin: ir.Value,
         interleaved: bool = False) -> tuple[ir.Value, ir.Value]:
    plan = onnx_std.rope_plan(q, k, cos, sin, interleaved)
    if plan is None:
        return onnx_std.rotate(q, cos, sin, interleaved), onnx_std.rotate(k, cos, sin, interleaved)
    cos_cache, sin_cache, positions = plan.caches(q, cos, sin)

    def rotary(x: ir.Value, **attrs) -> ir.Value:
        return _ROTARY(x, positions, cos_cache, sin_cache, **attrs)

    return plan.apply(q, rotary, heads_with_partial=True), plan.apply(k, rotary, heads_with_partial=True)
