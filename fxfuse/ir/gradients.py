"""Backward formulas of the fxfuse dialect ops, registered with ``torch.library.register_autograd``.

With them a fused graph trains: eager autograd, AOT autograd and Inductor
differentiate each dialect op as one node. Each formula is the exact
derivative of the op's reference semantics (``fxfuse.ir.dialect``), computed
in float32 (float64 inputs stay float64) and returned in each input's dtype.
``attention``'s and ``latent_attention``'s backward recompute the
probabilities (O(Sq·Sk) memory per head, like the math SDPA backward); the other ops' are elementwise or per row.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from fxfuse.ir.dialect import GATED_ACTIVATIONS, QUICK_GELU_ALPHA, _activation, _rotate

aten = torch.ops.aten


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` summed over the dims ``like`` broadcast along, in ``like``'s dtype."""
    return grad.sum_to_size(like.shape).to(like.dtype)


def _save(ctx: Any, inputs: tuple, names: tuple[str, ...]) -> None:
    """Save the tensor inputs for backward and keep the others on ``ctx``, by name."""
    tensors = [(n, x) for n, x in zip(names, inputs) if isinstance(x, Tensor)]
    ctx.tensor_names = [n for n, _ in tensors]
    ctx.save_for_backward(*(x for _, x in tensors))
    for n, x in zip(names, inputs):
        if not isinstance(x, Tensor):
            setattr(ctx, n, x)


def _saved(ctx: Any, names: tuple[str, ...]) -> list[Any]:
    tensors = dict(zip(ctx.tensor_names, ctx.saved_tensors))
    return [tensors[n] if n in tensors else getattr(ctx, n) for n in names]


# --- attention --------------------------------------------------------------------------------------------

_ATTENTION = ("q", "k", "v", "mask", "scale", "causal", "softcap", "sinks")


def _attention_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save(ctx, inputs, _ATTENTION)


def _attention_backward(ctx: Any, grad: Tensor) -> tuple:
    q, k, v, mask, scale, causal, softcap, sinks = _saved(ctx, _ATTENTION)
    heads, kv_heads = q.shape[1], k.shape[1]
    groups = heads // kv_heads
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf, g = _wide(q), _wide(k).repeat_interleave(groups, 1), _wide(v).repeat_interleave(groups, 1), _wide(grad)

    scores = qf @ kf.transpose(-1, -2) * scale
    capped = None
    if softcap is not None:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + _wide(mask)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    sk = scores.shape[-1]
    if sinks is not None:
        extra = _wide(sinks).expand(*scores.shape[:-1], sinks.shape[-1])
        scores = torch.cat([scores, extra], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of -inf only: the op gives zeros

    key_probs = probs[..., :sk]
    d_probs = g @ vf.transpose(-1, -2)
    row = (d_probs * key_probs).sum(-1, keepdim=True)
    d_scores = key_probs * (d_probs - row)  # the sink columns' own d_probs are 0 (their values are zero)

    d_mask = d_sinks = None
    if mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]:
        d_mask = _sum_to(d_scores, mask)
    if sinks is not None and ctx.needs_input_grad[7]:
        d_sinks = _sum_to(-probs[..., sk:] * row, sinks)
    if capped is not None:
        d_scores = d_scores * (1 - capped * capped)
    d_scores = d_scores * scale
    d_q = (d_scores @ kf).to(q.dtype)
    d_k = _sum_groups(d_scores.transpose(-1, -2) @ qf, kv_heads).to(k.dtype)
    d_v = _sum_groups(key_probs.transpose(-1, -2) @ g, kv_heads).to(v.dtype)
    return d_q, d_k, d_v, d_mask, None, None, None, d_sinks


def _sum_groups(grad: Tensor, kv_heads: int) -> Tensor:
    """The gradient of each key/value head: the sum over the query heads that read it."""
    b, h, s, d = grad.shape
    return grad.reshape(b, kv_heads, h // kv_heads, s, d).sum(2)


# --- latent attention -------------------------------------------------------------------------------------

_LATENT = ("q_latent", "q_rope", "latent", "k_rope", "mask", "scale", "causal")


def _latent_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save(ctx, inputs, _LATENT)


def _latent_attention_backward(ctx: Any, grad: Tensor) -> tuple:
    q_latent, q_rope, latent, k_rope, mask, scale, causal = _saved(ctx, _LATENT)
    heads, groups = q_latent.shape[1], latent.shape[1]
    per_group = heads // groups
    scale = 1.0 / math.sqrt(q_latent.shape[-1] + q_rope.shape[-1]) if scale is None else scale
    ql, qr, g = _wide(q_latent), _wide(q_rope), _wide(grad)
    lat, kr = _wide(latent).repeat_interleave(per_group, 1), _wide(k_rope).repeat_interleave(per_group, 1)

    scores = (ql @ lat.transpose(-1, -2) + qr @ kr.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + _wide(mask)
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of -inf only: the op gives zeros

    d_probs = g @ lat.transpose(-1, -2)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    d_mask = None
    if mask is not None and mask.is_floating_point() and ctx.needs_input_grad[4]:
        d_mask = _sum_to(d_scores, mask)
    d_scores = d_scores * scale
    # The latent is both the keys' first part and the values: its gradient has both terms.
    d_latent = _sum_groups(d_scores.transpose(-1, -2) @ ql + probs.transpose(-1, -2) @ g, groups)
    d_k_rope = _sum_groups(d_scores.transpose(-1, -2) @ qr, groups)
    return ((d_scores @ lat).to(q_latent.dtype), (d_scores @ kr).to(q_rope.dtype), d_latent.to(latent.dtype),
            d_k_rope.to(k_rope.dtype), d_mask, None, None)


# --- norms ------------------------------------------------------------------------------------------------

def _rms_backward(x: Tensor, weight: Optional[Tensor], eps: float, grad: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """d/dx and d/dweight of ``weight * (x · rsqrt(mean(x²) + eps))``, in float32."""
    xf = _wide(x)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = xf * r
    d_weight = None
    if weight is not None:
        d_weight = _sum_to(_wide(grad) * normed.to(x.dtype), weight)
        grad = _wide(grad) * _wide(weight)
    d_normed = _wide(grad)
    d_x = r * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
    return d_x, d_weight


def _rms_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save(ctx, inputs, ("x", "weight", "eps"))


def _rms_norm_backward(ctx: Any, grad: Tensor) -> tuple:
    x, weight, eps = _saved(ctx, ("x", "weight", "eps"))
    d_x, d_weight = _rms_backward(x, weight, eps, grad)
    return d_x.to(x.dtype), d_weight, None


def _add_rms_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save(ctx, inputs, ("x", "residual", "weight", "eps"))


def _add_rms_norm_backward(ctx: Any, grad: Optional[Tensor], grad_sum: Optional[Tensor]) -> tuple:
    x, residual, weight, eps = _saved(ctx, ("x", "residual", "weight", "eps"))
    s = x + residual
    d_s, d_weight = _rms_backward(s, weight, eps, _zero_if_none(grad, s))
    if grad_sum is not None:
        d_s = d_s + _wide(grad_sum)
    return _sum_to(d_s, x), _sum_to(d_s, residual), d_weight, None


def _ln_backward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, grad: Tensor,
                 needs: tuple[bool, bool, bool]) -> tuple[Optional[Tensor], ...]:
    shape = [x.shape[-1]]
    _, mean, rstd = aten.native_layer_norm(x, shape, weight, bias, eps)
    return aten.native_layer_norm_backward(grad, x, shape, mean, rstd, weight, bias, list(needs))


def _ln_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save(ctx, inputs, ("x", "weight", "bias", "eps"))


def _layer_norm_backward(ctx: Any, grad: Tensor) -> tuple:
    x, weight, bias, eps = _saved(ctx, ("x", "weight", "bias", "eps"))
    needs = (True, weight is not None and ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    d_x, d_weight, d_bias = _ln_backward(x, weight, bias, eps, grad.contiguous(), needs)
    return d_x, d_weight, d_bias, None


def _add_ln_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save(ctx, inputs, ("x", "residual", "weight", "bias", "eps"))


def _add_layer_norm_backward(ctx: Any, grad: Optional[Tensor], grad_sum: Optional[Tensor]) -> tuple:
    x, residual, weight, bias, eps = _saved(ctx, ("x", "residual", "weight", "bias", "eps"))
    s = x + residual
    needs = (True, weight is not None and ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3])
    d_s, d_weight, d_bias = _ln_backward(s, weight, bias, eps, _zero_if_none(grad, s).contiguous(), needs)
    if grad_sum is not None:
        d_s = d_s + grad_sum
    return _sum_to(d_s, x), _sum_to(d_s, residual), d_weight, d_bias, None


def _zero_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


# --- activations ------------------------------------------------------------------------------------------

def _d_activation(x: Tensor, activation: str) -> Tensor:
    """act'(x) in float32 for the activations of ``gated_mlp_act`` and ``gelu``."""
    xf = _wide(x)
    if activation == "silu":
        s = torch.sigmoid(xf)
        return s * (1 + xf * (1 - s))
    if activation == "sigmoid":
        s = torch.sigmoid(QUICK_GELU_ALPHA * xf)
        return s + QUICK_GELU_ALPHA * xf * s * (1 - s)
    approximate = {"gelu": "none", "gelu_tanh": "tanh"}.get(activation, activation)
    return aten.gelu_backward(torch.ones_like(xf), xf, approximate=approximate)


def _gated_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save(ctx, inputs, ("gate", "up", "activation"))


def _gated_mlp_act_backward(ctx: Any, grad: Tensor) -> tuple:
    gate, up, activation = _saved(ctx, ("gate", "up", "activation"))
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"fxfuse.gated_mlp_act: unknown activation {activation!r}")
    g = _wide(grad)
    d_gate = _sum_to(g * _wide(up) * _d_activation(gate, activation), gate)
    d_up = _sum_to(g * _wide(_activation(gate, activation)), up)
    return d_gate, d_up, None


def _gelu_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save(ctx, inputs, ("x", "approximate"))


def _gelu_backward(ctx: Any, grad: Tensor) -> tuple:
    x, approximate = _saved(ctx, ("x", "approximate"))
    return (_wide(grad) * _d_activation(x, approximate)).to(x.dtype), None


# --- rope -------------------------------------------------------------------------------------------------

def _rope_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save(ctx, inputs, ("q", "k", "cos", "sin", "interleaved"))


def _rope_backward(ctx: Any, grad_q: Optional[Tensor], grad_k: Optional[Tensor]) -> tuple:
    q, k, cos, sin, interleaved = _saved(ctx, ("q", "k", "cos", "sin", "interleaved"))
    rot = cos.shape[-1]

    def rotated(y: Tensor) -> Tensor:  # R(y) on the rotary dims
        return _rotate(y, y.new_zeros(rot), y.new_ones(rot), interleaved)

    d_cos = d_sin = None
    grads = []
    for x, g in ((q, grad_q), (k, grad_k)):
        if g is None:
            grads.append(None)
            continue
        g_rot, g_pass = g[..., :rot], g[..., rot:]
        # x' = x·cos + R(x)·sin with R antisymmetric: dx = g·cos - R(g·sin).
        d_rot = g_rot * cos - rotated(g_rot * sin)
        grads.append(_sum_to(torch.cat((d_rot, g_pass), dim=-1), x))
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            xr = x[..., :rot]
            dc, ds = _sum_to(g_rot * xr, cos), _sum_to(g_rot * rotated(xr), sin)
            d_cos = dc if d_cos is None else d_cos + dc
            d_sin = ds if d_sin is None else d_sin + ds
    return (grads[0], grads[1], d_cos if ctx.needs_input_grad[2] else None,
            d_sin if ctx.needs_input_grad[3] else None, None)


_FORMULAS = {
    "attention": (_attention_backward, _attention_setup),
    "latent_attention": (_latent_attention_backward, _latent_setup),
    "rms_norm": (_rms_norm_backward, _rms_setup),
    "add_rms_norm": (_add_rms_norm_backward, _add_rms_setup),
    "layer_norm": (_layer_norm_backward, _ln_setup),
    "add_layer_norm": (_add_layer_norm_backward, _add_ln_setup),
    "gated_mlp_act": (_gated_mlp_act_backward, _gated_setup),
    "gelu": (_gelu_backward, _gelu_setup),
    "rope": (_rope_backward, _rope_setup),
}


def register() -> None:
    """Register every dialect op's backward formula (called once, when ``fxfuse.ir.dialect`` is imported)."""
    for name, (backward, setup) in _FORMULAS.items():
        torch.library.register_autograd(f"fxfuse::{name}", backward, setup_context=setup)


__all__ = ["register"]
