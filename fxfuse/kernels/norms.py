"""RMSNorm and LayerNorm over the last dim, optionally fused with the residual add.

``rms_norm(x, weight, eps, residual=None)`` and ``layer_norm(x, weight, bias,
eps, residual=None)`` follow ``fxfuse::rms_norm`` / ``fxfuse::layer_norm``;
with ``residual`` they compute s = x + residual once, normalize s and return
``(normalized, s)`` (``fxfuse::add_rms_norm`` / ``add_layer_norm``): one read of
x and residual, one write of each output.

A program normalizes ``BLOCK_M`` rows held whole in registers (``BLOCK_N`` is
the row length rounded up to a power of two), the layout of the Triton
layer-norm tutorial and Liger-Kernel; rows longer than ``MAX_ROW`` fall back
(the callers check ``supports``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxfuse.kernels._config import bucket, check_device, check_float, forward_only, next_pow2, tuned

# A whole row lives in registers. Compiled ahead of time for sm_80 and sm_90
# (benchmarks/results/gpu-readiness.md), 32K-element rows fit (up to 255
# registers a thread, no spills) and 64K-element rows spill on both targets.
MAX_ROW = 32768


def _configs():
    # Short rows (BERT's 384-1024) leave warps idle with one row per program:
    # several rows per program keep ~4-16K elements in flight; long rows
    # (LLaMA's 2-8K) want one row and more warps to spread the registers.
    # The first config is the interpreter's (several rows, so the tests cover the row mask).
    out = [triton.Config({"BLOCK_M": 4}, num_warps=4)]
    for block_m in (1, 2, 4, 8, 16):
        for warps in (2, 4, 8, 16):
            out.append(triton.Config({"BLOCK_M": block_m}, num_warps=warps))
    return out


def _prune(configs, named_args, **kwargs):
    """Keep tiles of at most 32K elements (more spills registers) and enough warps for the row.

    A row past 32K elements is refused before launch (``supports``, ``MAX_ROW``); should
    none fit anyway, the one with the fewest elements per thread is kept.
    """
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_n <= 32768
            and c.num_warps * 32 <= max(64, c.kwargs["BLOCK_M"] * block_n // 2)
            and (block_n < 4096 or c.num_warps >= 8)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * block_n / c.num_warps)]


@triton.jit
def _rows_in_f32(X, R, S, rows64, cols, ok, stride_x, stride_r, stride_s, HAS_RESIDUAL: tl.constexpr):
    """The rows to normalize, in float32: x, or s = x + residual, which is also stored to S."""
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=ok, other=0.0)
        # s = x + residual, rounded to its dtype as torch does; the norm reads the rounded s.
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=ok)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    return xf


@tuned(_configs(), key=["N_BUCKET", "HAS_RESIDUAL"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S,  # input, residual (or None), weight (or None), output, residual sum (or None)
    M, N, eps,
    stride_x, stride_r, stride_y, stride_s,
    N_BUCKET,  # autotune key only
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]
    xf = _rows_in_f32(X, R, S, rows64, cols, ok, stride_x, stride_r, stride_s, HAS_RESIDUAL)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)
    y = xf * rstd[:, None]
    if HAS_WEIGHT:
        # fxfuse::rms_norm: normalize, cast to the input dtype, then weight * y in the promoted dtype.
        w = tl.load(W + cols, mask=cols < N, other=0.0)
        y = y.to(S.dtype.element_ty if HAS_RESIDUAL else X.dtype.element_ty).to(tl.float32) * w.to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


@tuned(_configs(), key=["N_BUCKET", "HAS_RESIDUAL"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S,
    M, N, eps,
    stride_x, stride_r, stride_y, stride_s,
    N_BUCKET,  # autotune key only
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols[None, :] < N
    ok = (rows[:, None] < M) & col_ok
    rows64 = rows.to(tl.int64)[:, None]
    xf = _rows_in_f32(X, R, S, rows64, cols, ok, stride_x, stride_r, stride_s, HAS_RESIDUAL)
    mean = tl.sum(xf, axis=1) / N
    xc = tl.where(col_ok, xf - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N  # biased, as F.layer_norm
    y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def supports(x: torch.Tensor) -> str | None:
    """Why the norm kernels cannot take ``x`` (None if they can)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype}"
    if x.dim() == 0 or x.shape[-1] > MAX_ROW:
        return f"row length {x.shape[-1] if x.dim() else 0} (1..{MAX_ROW} supported)"
    return None


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (rows, n) with unit column stride, without a copy when its layout allows."""
    t2 = t.reshape(-1, n)
    return t2 if n == 1 or t2.stride(-1) == 1 else t2.contiguous()


def _prepare(name: str, x: torch.Tensor, residual: torch.Tensor | None, params: tuple):
    check_float(name, x, residual, *params)
    check_device(name, x, residual, *params)
    if (reason := supports(x)) is not None:
        raise ValueError(f"fxfuse.kernels.{name}: unsupported input ({reason})")
    n = x.shape[-1]
    for p in params:
        if p is not None and p.shape != (n,):
            raise ValueError(f"fxfuse.kernels.{name}: weight/bias must have shape ({n},), got {tuple(p.shape)}")
    if residual is not None:
        shape = torch.broadcast_shapes(x.shape, residual.shape)
        x, residual = x.expand(shape), residual.expand(shape)
        s_dtype = torch.promote_types(x.dtype, residual.dtype)
    else:
        s_dtype = x.dtype
    return x, residual, s_dtype


def _launch(kernel, x: torch.Tensor, residual: torch.Tensor | None, params: tuple, eps: float,
            s_dtype: torch.dtype, y_dtype: torch.dtype, **flags):
    """Run a norm kernel over the rows of ``x`` (and ``residual``); ``(y, s)`` with a residual, else ``y``."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = None if residual is None else _rows(residual, n)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    s = None if residual is None else torch.empty(x.shape, dtype=s_dtype, device=x.device)
    m = x2.shape[0]
    if m:
        y2, s2 = y.view(-1, n), (None if s is None else s.view(-1, n))
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        kernel[grid](
            x2, r2, *params, y2, s2, m, n, float(eps),
            x2.stride(0), 0 if r2 is None else r2.stride(0), y2.stride(0), 0 if s2 is None else s2.stride(0),
            bucket(n), HAS_RESIDUAL=residual is not None, BLOCK_N=next_pow2(n), **flags,
        )
    return y if residual is None else (y, s)


def _launch_rms(x, weight, eps, residual):
    x, residual, s_dtype = _prepare("rms_norm", x, residual, (weight,))
    y_dtype = s_dtype if weight is None else torch.promote_types(weight.dtype, s_dtype)
    return _launch(_rms_norm_fwd_kernel, x, residual, (weight,), eps, s_dtype, y_dtype,
                   HAS_WEIGHT=weight is not None)


def _launch_ln(x, weight, bias, eps, residual):
    x, residual, s_dtype = _prepare("layer_norm", x, residual, (weight, bias))
    return _launch(_layer_norm_fwd_kernel, x, residual, (weight, bias), eps, s_dtype, s_dtype,
                   HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of ``x`` (of ``x + residual`` when given, returning ``(normalized, x + residual)``).

    Semantics of ``fxfuse::rms_norm``: computed in float32, normalized value cast
    to the input dtype, then scaled by ``weight`` in the promoted dtype.
    """
    return forward_only("rms_norm", _launch_rms, x, weight, eps, residual)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None):
    """LayerNorm of ``x`` (of ``x + residual`` when given, returning ``(normalized, x + residual)``).

    Semantics of ``fxfuse::layer_norm``: biased variance, computed in float32, one rounding to the input dtype.
    """
    return forward_only("layer_norm", _launch_ln, x, weight, bias, eps, residual)
