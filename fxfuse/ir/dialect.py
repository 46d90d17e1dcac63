"""The fxfuse dialect: fused ops registered under the ``fxfuse::`` namespace.

Each op is a real ``torch.library`` custom op, so torch.export, torch.compile
and the ONNX exporter see it as one opaque node. Each has:

* a reference implementation in plain torch (what the eager back end runs),
* a fake implementation (shapes and dtypes only, for tracing),
* a docstring that states its exact semantics; back ends must match it.

Layout conventions follow ``torch.nn.functional.scaled_dot_product_attention``:
attention tensors are (batch, heads, seq, head_dim). Output memory layouts
are part of each op's contract, because compilers (Inductor) plan buffers from
the fake implementation's strides: ``attention`` and ``latent_attention``
return their (B, H, S, D) result laid out as (B, S, H, D) in memory, the
layout SDPA's CPU and flash kernels write and the one the following
``transpose(1, 2).reshape(B, S, H·D)`` reads without a copy; every other op
returns the layout ``torch.empty_like`` gives its first input. Backward
formulas are in ``fxfuse.ir.gradients``.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
GELU_APPROXIMATIONS = ("none", "tanh", "sigmoid")
QUICK_GELU_ALPHA = 1.702  # CLIP's quick GELU: x·σ(1.702·x)


def _check_gqa(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"fxfuse.attention takes 4-D (batch, heads, seq, head_dim) tensors; "
            f"got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"fxfuse.attention: query heads ({q.shape[1]}) must be a multiple of the "
            f"key/value heads ({k.shape[1]}, {v.shape[1]})"
        )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """softmax(cap(q·kᵀ·scale) + mask) · v, per head.

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv) with Hq a
    multiple of Hkv: query head h reads key/value head h // (Hq // Hkv)
    (grouped-query attention, no materialized repeat). ``mask`` broadcasts to
    (B, Hq, Sq, Sk): a float mask is added to the scores, a boolean mask keeps
    the positions where it is True. ``scale`` defaults to 1/sqrt(D).
    ``softcap`` c, if given, caps the scaled scores: cap(s) = c·tanh(s/c)
    (Gemma 2); without it cap is the identity. ``causal`` masks key j > query
    i (top-left aligned, as in SDPA). ``sinks`` (attention sinks, GPT-OSS),
    broadcasting to (B, Hq, Sq, n): n more logits per query row, taken into
    the softmax after the masked scores and then dropped (keys whose value is
    zero: they only add to each row's denominator). The softmax is taken in
    at least float32. A query row whose every score is -inf gives zeros, as
    SDPA does (eager softmax gives NaN there). Returns (B, Hq, Sq, Dv) in q's
    dtype.
    """
    _check_gqa(q, k, v)  # before the mask analysis reads q's and k's lengths
    if softcap is None and sinks is None:
        mask, causal = _simplify_mask(mask, causal, q.shape[-2], k.shape[-2])
    return _seq_major(_checked_attention(q, k, v, mask, scale, causal, softcap, sinks))


def traceable_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                        scale: Optional[float] = None, causal: bool = False, softcap: Optional[float] = None,
                        sinks: Optional[Tensor] = None) -> Tensor:
    """:func:`attention` without the steps a trace cannot take: the analysis of the mask's values (a mask
    that keeps every score handed to SDPA as none) and the copy into the seq-major layout. The same
    numbers; what Inductor traces for ``fxfuse.attention``, so that it calls SDPA itself."""
    _check_gqa(q, k, v)
    return _checked_attention(q, k, v, mask, scale, causal, softcap, sinks)


def _checked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: Optional[float],
                       causal: bool, softcap: Optional[float], sinks: Optional[Tensor]) -> Tensor:
    """:func:`traceable_attention` on shapes already checked."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if softcap is not None or sinks is not None:
        return _explicit_attention(q, k, v, mask, scale, causal, softcap, sinks)
    if causal and mask is not None:
        # SDPA's math kernel refuses a mask together with is_causal: fold one into the other.
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _seq_major_empty(like: Tensor, shape: tuple) -> Tensor:
    """An empty (B, H, S, D) tensor laid out as (B, S, H, D) in memory."""
    b, h, s, d = shape
    return like.new_empty((b, s, h, d)).transpose(1, 2)


def _seq_major(out: Tensor) -> Tensor:
    """``out`` in attention's output layout, (B, S, H, D) in memory (copied only if it is not)."""
    _, h, s, d = out.shape
    if out.stride() == (s * h * d, d, h * d, 1):  # the strides _seq_major_empty gives, without allocating
        return out
    return _seq_major_empty(out, tuple(out.shape)).copy_(out)


def _like(out: Tensor, first: Tensor) -> Tensor:
    """``out`` in the layout ``torch.empty_like(first)`` has (copied only if it is not)."""
    if out.is_contiguous() and first.is_contiguous():
        return out
    template = torch.empty_like(first, dtype=out.dtype)
    if template.shape != out.shape or out.stride() == template.stride():
        return out
    return template.copy_(out)


def _simplify_mask(mask: Optional[Tensor], causal: bool, sq: int, sk: int) -> tuple[Optional[Tensor], bool]:
    """Hand SDPA its fast paths: a mask that keeps every score → no mask; exactly the causal one → ``causal``.

    A captured graph computes the padding-and-causal mask on every call, where
    the model's own code would have skipped it when nothing is padded; this
    check, O(Sq·Sk) bool work, gets back the mask-free and causal kernels.
    A float mask counts as dropping a score only where it is -inf or at most
    half the dtype's lowest value (exp underflows to 0 either way).
    """
    if mask is None or causal:
        return mask, causal
    if mask.is_inference():
        # No version counter would tell an in-place change apart: analyse on every call.
        kind = _mask_kind(mask, sq, sk)
    else:
        # Every layer of a model reads the same mask tensor: analyse it once.
        key = (id(mask), mask._version, mask.data_ptr(), tuple(mask.shape), sq, sk)
        if _LAST_MASK and _LAST_MASK[0] == key and _LAST_MASK[1]() is mask:
            kind = _LAST_MASK[2]
        else:
            kind = _mask_kind(mask, sq, sk)
            _LAST_MASK[:] = [key, weakref.ref(mask), kind]
    return {"none": (None, False), "causal": (None, True), "keep": (mask, False)}[kind]


_LAST_MASK: list = []  # [key, weak reference to the mask, kind] of the last analysis


def _mask_kind(mask: Tensor, sq: int, sk: int) -> str:
    """The mask's kind: "none" (keeps every score), "causal" (exactly SDPA's causal mask) or "keep"."""
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not torch.where(keep, True, mask <= torch.finfo(mask.dtype).min / 2).all():
            return "keep"  # a real bias (ALiBi, relative positions)
    if keep.all():
        return "none"
    if sq == sk and keep.shape[-2:] == (sq, sk):
        tril = torch.ones(sq, sk, dtype=torch.bool, device=keep.device).tril()
        if torch.equal(keep, tril.expand(keep.shape)):
            return "causal"
    return "keep"


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                        softcap: Optional[float], sinks: Optional[Tensor]) -> Tensor:
    """The soft-capped and sink cases, which SDPA cannot express: scores in (at least) float32, then softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    wide = torch.promote_types(q.dtype, torch.float32)  # at least float32
    scores = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    empty = scores.amax(-1, keepdim=True) == float("-inf")
    if sinks is not None:
        extra = sinks.to(wide).expand(*scores.shape[:-1], sinks.shape[-1])
        probs = torch.softmax(torch.cat([scores, extra], dim=-1), dim=-1)[..., : scores.shape[-1]]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(empty, 0.0).to(v.dtype)
    return torch.matmul(probs, v).to(q.dtype)


torch.library.custom_op("fxfuse::attention", attention, mutates_args=())


@torch.library.register_fake("fxfuse::attention")
def _(q, k, v, mask=None, scale=None, causal=False, softcap=None, sinks=None):
    _check_gqa(q, k, v)
    return _seq_major_empty(q, (*q.shape[:-1], v.shape[-1]))


def _check_latent(q_latent: Tensor, q_rope: Tensor, latent: Tensor, k_rope: Tensor) -> None:
    tensors = {"q_latent": q_latent, "q_rope": q_rope, "latent": latent, "k_rope": k_rope}
    if any(t.dim() != 4 for t in tensors.values()):
        shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"fxfuse.latent_attention takes 4-D (batch, heads, seq, dim) tensors; got {shapes}")
    (b, h, sq, r), (b2, h2, sq2, dr) = q_latent.shape, q_rope.shape
    (b3, g, sk, r3), (b4, g4, sk4, dr4) = latent.shape, k_rope.shape
    if b2 != b or b3 != b or b4 != b:
        raise ValueError(f"fxfuse.latent_attention: batch sizes differ: q_latent {b}, q_rope {b2}, latent {b3}, "
                         f"k_rope {b4}")
    if (h2, sq2) != (h, sq):
        raise ValueError(f"fxfuse.latent_attention: q_rope{tuple(q_rope.shape)} must have the heads and query "
                         f"length of q_latent{tuple(q_latent.shape)}")
    if (g4, sk4) != (g, sk):
        raise ValueError(f"fxfuse.latent_attention: k_rope{tuple(k_rope.shape)} must have the groups and key "
                         f"length of latent{tuple(latent.shape)}")
    if r3 != r:
        raise ValueError(f"fxfuse.latent_attention: the latent dim R of q_latent ({r}) and latent ({r3}) differ")
    if dr4 != dr:
        raise ValueError(f"fxfuse.latent_attention: the rotary dim Dr of q_rope ({dr}) and k_rope ({dr4}) differ")
    if g == 0 or h % g:
        raise ValueError(f"fxfuse.latent_attention: query heads ({h}) must be a multiple of the latent groups ({g})")


def latent_attention(
    q_latent: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    k_rope: Tensor,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
) -> Tensor:
    """Multi-head latent attention with absorbed up-projections (DeepSeek's MLA, TransMLA), per head.

    q_latent: (B, H, Sq, R), the queries already multiplied by the key
    up-projection; q_rope: (B, H, Sq, Dr), the rotary part of the queries
    (RoPE applied; Dr may be 0); latent: (B, G, Sk, R), the compressed KV
    cache, G latent groups with H a multiple of G (usually G = 1); k_rope:
    (B, G, Sk, Dr), the decoupled rotary key, shared by the heads of its
    group. Query head h reads group g = h // (H // G)::

        out_h = softmax((q_latent_h · latent_gᵀ + q_rope_h · k_rope_gᵀ) · scale + mask) · latent_g

    The keys and the values are one tensor, the latent: this equals
    ``attention(cat(q_latent, q_rope), cat(latent, k_rope), latent, mask,
    scale, causal)``. ``scale`` defaults to 1/sqrt(R + Dr). ``mask`` and
    ``causal`` mean what they mean for ``attention``: ``mask`` broadcasts to
    (B, H, Sq, Sk), a float mask is added, a boolean mask keeps the positions
    where it is True; ``causal`` masks key j > query i (top-left aligned). The
    softmax is taken in at least float32; a query row whose every score is
    -inf gives zeros. Returns (B, H, Sq, R) in q_latent's dtype, laid out as
    (B, Sq, H, R) in memory, as ``attention``'s result is.
    """
    _check_latent(q_latent, q_rope, latent, k_rope)
    b, h, sq, r = q_latent.shape
    g, sk, dr = latent.shape[1], latent.shape[2], q_rope.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(r + dr)
    wide = torch.promote_types(q_latent.dtype, torch.float32)  # at least float32
    # The heads of a group as one block of (H/G)·Sq query rows against the group's latent: one GEMM per
    # group, the latent neither repeated nor broadcast.
    rows = h // g * sq
    lat = latent.to(wide)
    scores = q_latent.to(wide).reshape(b, g, rows, r) @ lat.transpose(-1, -2)
    if dr:
        scores = scores + q_rope.to(wide).reshape(b, g, rows, dr) @ k_rope.to(wide).transpose(-1, -2)
    scores = scores.view(b, h, sq, sk) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if causal:
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q_latent.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    empty = scores.isneginf().all(-1, keepdim=True)  # also true of every row when Sk = 0
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    out = probs.view(b, g, rows, sk) @ lat
    return _seq_major_empty(q_latent, (b, h, sq, r)).copy_(out.view(b, h, sq, r))  # one copy: layout and dtype


torch.library.custom_op("fxfuse::latent_attention", latent_attention, mutates_args=())


@torch.library.register_fake("fxfuse::latent_attention")
def _(q_latent, q_rope, latent, k_rope, mask=None, scale=None, causal=False):
    _check_latent(q_latent, q_rope, latent, k_rope)
    return _seq_major_empty(q_latent, tuple(q_latent.shape))


def _rms(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in float32.

    y = (x' · rsqrt(mean(x'², -1) + eps)).to(x.dtype) with x' = x.float(),
    then ``weight * y`` when a weight is given (dtype: promotion of the two).
    """
    return _like(_rms(x, weight, eps), x)


torch.library.custom_op("fxfuse::rms_norm", rms_norm, mutates_args=())


@torch.library.register_fake("fxfuse::rms_norm")
def _(x, weight, eps):
    dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
    return torch.empty_like(x, dtype=dtype)


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """Residual add fused with RMSNorm: s = x + residual; returns (rms_norm(s, weight, eps), s)."""
    s = _like(x + residual, x)
    return _like(_rms(s, weight, eps), s), s


torch.library.custom_op("fxfuse::add_rms_norm", add_rms_norm, mutates_args=())


@torch.library.register_fake("fxfuse::add_rms_norm")
def _(x, residual, weight, eps):
    s = _add_fake(x, residual)
    dtype = s.dtype if weight is None else torch.promote_types(weight.dtype, s.dtype)
    return torch.empty_like(s, dtype=dtype), s


def _add_fake(x: Tensor, residual: Tensor) -> Tensor:
    """The fake residual sum: the broadcast shape and promoted dtype, in the layout ``empty_like(x)`` has."""
    s = x + residual
    if s.shape == x.shape:
        return torch.empty_like(x, dtype=s.dtype)
    return torch.empty_like(s)


def _ln(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased variance)."""
    return _like(_ln(x, weight, bias, eps), x)


torch.library.custom_op("fxfuse::layer_norm", layer_norm, mutates_args=())


@torch.library.register_fake("fxfuse::layer_norm")
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """Residual add fused with LayerNorm: s = x + residual; returns (layer_norm(s, weight, bias, eps), s)."""
    s = _like(x + residual, x)
    return _like(_ln(s, weight, bias, eps), s), s


torch.library.custom_op("fxfuse::add_layer_norm", add_layer_norm, mutates_args=())


@torch.library.register_fake("fxfuse::add_layer_norm")
def _(x, residual, weight, bias, eps):
    s = _add_fake(x, residual)
    return torch.empty_like(s), s


def _activation(x: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"fxfuse.gated_mlp_act: activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")


def gated_mlp_act(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """act(gate) * up, with act one of "silu", "gelu" (erf) or "gelu_tanh"."""
    return _like(_activation(gate, activation) * up, gate)


torch.library.custom_op("fxfuse::gated_mlp_act", gated_mlp_act, mutates_args=())


@torch.library.register_fake("fxfuse::gated_mlp_act")
def _(gate, up, activation):
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"fxfuse.gated_mlp_act: activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")
    return _add_fake(gate, up)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU: x·Φ(x) ("none", erf form), 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) ("tanh"),
    or x·σ(1.702·x) ("sigmoid", the quick GELU of CLIP)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"fxfuse.gelu: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    if approximate == "sigmoid":
        return _like(x * torch.sigmoid(QUICK_GELU_ALPHA * x), x)
    return _like(F.gelu(x, approximate=approximate), x)


torch.library.custom_op("fxfuse::gelu", gelu, mutates_args=())


@torch.library.register_fake("fxfuse::gelu")
def _(x, approximate="none"):
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"fxfuse.gelu: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    return torch.empty_like(x)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    rot_dim = cos.shape[-1]
    xr, xpass = x[..., :rot_dim], x[..., rot_dim:]
    if interleaved:
        pairs = xr.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        half = rot_dim // 2
        rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos + rotated * sin
    return torch.cat((out, xpass), dim=-1) if xpass.shape[-1] else out


def _check_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if cos.shape != sin.shape:
        raise ValueError(f"fxfuse.rope: cos{tuple(cos.shape)} and sin{tuple(sin.shape)} must have one shape")
    rot_dim = cos.shape[-1]
    if rot_dim % 2 or rot_dim > q.shape[-1] or rot_dim > k.shape[-1]:
        raise ValueError(
            f"fxfuse.rope: the rotary dim (cos.shape[-1] = {rot_dim}) must be even and at most "
            f"the head dim ({q.shape[-1]})"
        )


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary position embedding applied to q and k; returns (q', k').

    q, k: (..., D) with the head dim last, in any layout ((B, H, S, D) or
    GPT-J's (B, S, H, D)); cos, sin broadcast against them, with last dim
    R = cos.shape[-1] ≤ D, even. The first R dims rotate: x' = x·cos + rot(x)·sin, where rot
    pairs dim i with i + R/2 (``rotate_half``: rot(x) = cat(-x[R/2:], x[:R/2]))
    or, if ``interleaved``, dim 2i with 2i+1 (rot(x)[2i] = -x[2i+1],
    rot(x)[2i+1] = x[2i]). Dims R..D pass through unchanged (partial rotary).
    """
    _check_rope(q, k, cos, sin)
    return _like(_rotate(q, cos, sin, interleaved), q), _like(_rotate(k, cos, sin, interleaved), k)


torch.library.custom_op("fxfuse::rope", rope, mutates_args=())


@torch.library.register_fake("fxfuse::rope")
def _(q, k, cos, sin, interleaved=False):
    _check_rope(q, k, cos, sin)
    return _add_fake(q, cos[..., :1]), _add_fake(k, cos[..., :1])


OPS = {
    "attention": torch.ops.fxfuse.attention.default,
    "latent_attention": torch.ops.fxfuse.latent_attention.default,
    "rms_norm": torch.ops.fxfuse.rms_norm.default,
    "add_rms_norm": torch.ops.fxfuse.add_rms_norm.default,
    "layer_norm": torch.ops.fxfuse.layer_norm.default,
    "add_layer_norm": torch.ops.fxfuse.add_layer_norm.default,
    "gated_mlp_act": torch.ops.fxfuse.gated_mlp_act.default,
    "gelu": torch.ops.fxfuse.gelu.default,
    "rope": torch.ops.fxfuse.rope.default,
}
"""Every dialect op by its short name."""

REFERENCE = {name: globals()[name] for name in OPS}
"""Every dialect op's reference implementation (a plain function: calling it skips the dispatcher)."""


def is_dialect_op(target: object) -> bool:
    """True if ``target`` (an fx node target) is an fxfuse dialect op."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fxfuse"


from fxfuse.ir import gradients  # noqa: E402  (its formulas read this module's helpers)

gradients.register()
