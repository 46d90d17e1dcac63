"""Skinny GEMMs on the CPU (a decode step's matrix-vector products) that stream each weight at memory speed.

At one row, a GEMM reads every weight once and uses it once: its time is
the weight's bytes over the memory bandwidth. ATen's GEMM (MKL) and oneDNN
do not reach that bandwidth on every x86 CPU (on an AMD EPYC Zen 4, 2
threads: 10 and 15 GB/s where a plain sum reads 30 GB/s), so fxfuse has its
own kernel, ``skinny_gemm.cpp``: one weight row at a time (one sequential
stream per thread), output rows split over ATen's intra-op threads, the
epilogue (bias, activation, gate × up, residual add) applied to the outputs
in registers. See :mod:`fxfuse.cpu_kernels.build` for how it is built::

    from fxfuse.cpu_kernels import skinny_gemm
    if skinny_gemm.eligible(x, w, b):
        y = skinny_gemm.linear(x, w, b, act="silu")             # silu(x @ w.T + b)
        h = skinny_gemm.gated(x, w_gate, None, w_up, None, "silu")
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fxfuse.cpu_kernels import build

# Where the kernel can win: a decode step's rows (batch × new tokens). Above this a GEMM is no longer
# bandwidth-bound and the BLAS kernels' register blocking wins.
MAX_ROWS = 16
# The kernel's codes for the epilogue activations (the Act enum in skinny_gemm.cpp); "gelu" is erf's.
ACTIVATIONS = {"none": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}


def eligible(x: Tensor, weight: Tensor, *others: Optional[Tensor]) -> bool:
    """True if :func:`linear` can take these operands: float32 CPU tensors, at most :data:`MAX_ROWS` rows, an
    (out, in) weight with unit stride in ``in``, contiguous biases, no gradient wanted, and the kernel built."""
    tensors = [t for t in (x, weight, *others) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if x.dim() == 0 or weight.dim() != 2 or weight.stride(1) != 1 or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    if any(t.dim() == 1 and not t.is_contiguous() for t in others if t is not None):  # a strided bias
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return build.available()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "none",
           residual: Optional[Tensor] = None) -> Tensor:
    """``act(F.linear(x, weight, bias)) + residual`` (``act``: a key of :data:`ACTIVATIONS`)."""
    return build.require().linear(x, weight, bias, ACTIVATIONS[act], residual)


def gated(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
          act: str) -> Tensor:
    """``act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)``, both weights streamed in one pass."""
    return build.require().gated(x, w_gate, b_gate, w_up, b_up, ACTIVATIONS[act])

