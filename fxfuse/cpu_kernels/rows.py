"""Decode-sized row ops on the CPU: RMSNorm, residual add + RMSNorm and the rotary embedding in one C++ call.

At one token these ops touch a few hundred floats; their ATen composites
spend their time in dispatch (5-8 kernels, about 30-60 µs a call), which a
decode step pays 60-90 times. ``rows.cpp`` computes the same values in one
call each. They take float32 CPU tensors of at most :data:`MAX_ROWS` rows
(bigger calls keep the ATen forms, which use every thread) and no autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fxfuse.cpu_kernels import build

# Rows (all dims but the last) up to which one C++ call beats the ATen composites.
MAX_ROWS = 64


def eligible(x: Tensor, *others: Optional[Tensor]) -> bool:
    """True if the row ops can take these operands: float32 CPU tensors, at most :data:`MAX_ROWS` rows of
    ``x``, no gradient wanted, and the kernels built. (Called on every decode op: written for speed.)"""
    if x.dtype is not torch.float32 or x.device.type != "cpu" or x.dim() == 0 or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    for t in others:
        if t is not None and (t.dtype is not torch.float32 or t.device.type != "cpu"):
            return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in others)):
        return False
    return build.available()


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """``fxfuse.rms_norm`` (x · rsqrt(mean(x², -1) + eps) · weight), weight a vector of x's last dim or None."""
    return build.require().rms_norm(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``fxfuse.add_rms_norm``: (rms_norm(x + residual), x + residual), x and residual of one shape."""
    return build.require().add_rms_norm(x, residual, weight, eps)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """``fxfuse.rope`` with rotate_half pairs (not interleaved); None where cos and sin do not broadcast
    within q's and k's shapes (the reference then broadcasts past them)."""
    return build.require().rope(q, k, cos, sin)
