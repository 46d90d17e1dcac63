"""Rotary position embedding of q and k in one launch: ``rope(q, k, cos, sin)``.

Semantics of ``fxfuse::rope``: the first R = cos.shape[-1] dims of each head
rotate, x' = x·cos + rot(x)·sin, with rot pairing dim i with i + R/2
(``rotate_half``) or, if ``interleaved``, 2i with 2i+1; dims R..D pass
through. q and k may be in any layout with the head dim last ((B, H, S, D) or
(B, S, H, D)); cos and sin broadcast against them and are read through zero
strides, never expanded in memory.

One launch covers both tensors: the first programs rotate rows of q, the rest
rows of k (their head counts may differ, as in grouped-query attention). With
``inplace=True`` the results are written over q and k (only the R rotated
dims are touched), which the caller may ask for when nothing else reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxfuse.kernels._config import bucket, check_device, check_float, forward_only, next_pow2, tuned

MAX_RANK = 4  # (A0, A1, A2, D): any 4-D attention layout


def _configs():
    # BLOCK_R rows × the head dim per program: 4-16 rows of a 128-dim head
    # (0.5-2K elements) keep each warp busy with 16-byte loads; the first
    # config is the interpreter's and covers several rows (and the row mask).
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in
            ((4, 4), (8, 4), (16, 4), (16, 8), (32, 8))]


@triton.jit
def _rope_rows(
    X, O, C, S, r0, rows,
    A1, A2,
    sx0, sx1, sx2, sxd, so0, so1, so2, sc0, sc1, sc2, ss0, ss1, ss2, scd,
    D, R,
    INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    r = r0 + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    i2 = r % A2
    i1 = (r // A2) % A1
    i0 = r // (A2 * A1)
    x_row = i0.to(tl.int64) * sx0 + i1.to(tl.int64) * sx1 + i2.to(tl.int64) * sx2
    o_row = i0.to(tl.int64) * so0 + i1.to(tl.int64) * so1 + i2.to(tl.int64) * so2
    c_row = i0.to(tl.int64) * sc0 + i1.to(tl.int64) * sc1 + i2.to(tl.int64) * sc2
    s_row = i0.to(tl.int64) * ss0 + i1.to(tl.int64) * ss1 + i2.to(tl.int64) * ss2
    j = tl.arange(0, BLOCK_H)
    half = R // 2
    ok = row_ok[:, None] & (j[None, :] < half)
    if INTERLEAVED:
        d1 = 2 * j
        d2 = 2 * j + 1
    else:
        d1 = j
        d2 = j + half
    x1 = tl.load(X + x_row[:, None] + d1[None, :] * sxd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_row[:, None] + d2[None, :] * sxd, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(C + c_row[:, None] + d1[None, :] * scd, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(C + c_row[:, None] + d2[None, :] * scd, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(S + s_row[:, None] + d1[None, :] * scd, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(S + s_row[:, None] + d2[None, :] * scd, mask=ok, other=0.0).to(tl.float32)
    # rot(x)[d1] = -x[d2], rot(x)[d2] = x[d1]
    tl.store(O + o_row[:, None] + d1[None, :], (x1 * c1 - x2 * s1).to(O.dtype.element_ty), mask=ok)
    tl.store(O + o_row[:, None] + d2[None, :], (x2 * c2 + x1 * s2).to(O.dtype.element_ty), mask=ok)
    if COPY_PASS:
        p = R + tl.arange(0, BLOCK_P)
        p_ok = row_ok[:, None] & (p[None, :] < D)
        xp = tl.load(X + x_row[:, None] + p[None, :] * sxd, mask=p_ok, other=0.0)
        tl.store(O + o_row[:, None] + p[None, :], xp.to(O.dtype.element_ty), mask=p_ok)


@tuned(_configs(), key=["HQ_ROWS_BUCKET", "D"], restore_value=["QO", "KO"])
@triton.jit
def _rope_fwd_kernel(
    Q, K, QO, KO, C, S,
    q_rows, k_rows,
    qA1, qA2, kA1, kA2,
    sq0, sq1, sq2, sqd, sqo0, sqo1, sqo2,
    sk0, sk1, sk2, skd, sko0, sko1, sko2,
    cq0, cq1, cq2, sq_0, sq_1, sq_2,
    ck0, ck1, ck2, sk_0, sk_1, sk_2, scd,
    D, R, HQ_ROWS_BUCKET,
    INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    q_programs = tl.cdiv(q_rows, BLOCK_R)
    if pid < q_programs:
        _rope_rows(Q, QO, C, S, pid * BLOCK_R, q_rows, qA1, qA2,
                   sq0, sq1, sq2, sqd, sqo0, sqo1, sqo2, cq0, cq1, cq2, sq_0, sq_1, sq_2, scd, D, R,
                   INTERLEAVED, COPY_PASS, BLOCK_R, BLOCK_H, BLOCK_P)
    else:
        _rope_rows(K, KO, C, S, (pid - q_programs) * BLOCK_R, k_rows, kA1, kA2,
                   sk0, sk1, sk2, skd, sko0, sko1, sko2, ck0, ck1, ck2, sk_0, sk_1, sk_2, scd, D, R,
                   INTERLEAVED, COPY_PASS, BLOCK_R, BLOCK_H, BLOCK_P)


def supports(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the rope kernel cannot take these inputs (None if it can)."""
    for t in (q, k, cos, sin):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {t.dtype}"
    if max(q.dim(), k.dim(), cos.dim()) > MAX_RANK:
        return f"rank above {MAX_RANK}"
    if q.shape[-1] != k.shape[-1]:
        return "q and k head dims differ"
    if cos.shape != sin.shape:
        return "cos and sin shapes differ"
    return None


def _lead3(shape) -> list[int]:
    shape = list(shape)
    return [1] * (3 - len(shape)) + shape


def _plan(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Broadcast shapes and 3 leading strides each for x (read), cos and sin."""
    lead = torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1])
    xe = x.expand(*lead, x.shape[-1])
    ce = cos.expand(*lead, cos.shape[-1])
    se = sin.expand(*lead, sin.shape[-1])

    def strides(t):
        s = list(t.stride()[:-1])
        return [0] * (3 - len(s)) + s

    return lead, xe, strides(xe), strides(ce), strides(se)


def _launch(q, k, cos, sin, interleaved, inplace):
    check_float("rope", q, k, cos, sin)
    check_device("rope", q, k, cos, sin)
    if (reason := supports(q, k, cos, sin)) is not None:
        raise ValueError(f"fxfuse.kernels.rope: unsupported inputs ({reason})")
    d, rdim = q.shape[-1], cos.shape[-1]
    if rdim % 2 or rdim > d or rdim == 0:
        raise ValueError(f"fxfuse.kernels.rope: the rotary dim {rdim} must be even, positive and at most {d}")
    if cos.stride(-1) != sin.stride(-1):
        cos, sin = cos.contiguous(), sin.contiguous()
    outs, plans = [], []
    for x in (q, k):
        lead, xe, sx, sc, ss = _plan(x, cos, sin)
        dtype = torch.promote_types(x.dtype, cos.dtype)
        if inplace:
            if tuple(lead) != tuple(x.shape[:-1]) or dtype != x.dtype:
                raise ValueError("fxfuse.kernels.rope: inplace needs outputs of the inputs' shape and dtype")
            out = x
        else:
            out = torch.empty(*lead, d, dtype=dtype, device=x.device)
        so = [0] * (3 - (out.dim() - 1)) + list(out.stride()[:-1])
        if out.stride(-1) != 1:
            raise ValueError("fxfuse.kernels.rope: inplace needs a unit stride on the head dim")
        outs.append(out)
        plans.append((_lead3(lead), xe, sx, so, sc, ss))
    (qa, qe, sq, sqo, cq, sq_), (ka, ke, sk, sko, ck, sk_) = plans
    q_rows, k_rows = qa[0] * qa[1] * qa[2], ka[0] * ka[1] * ka[2]
    if q_rows + k_rows:
        block_h = next_pow2(rdim // 2)
        block_p = next_pow2(max(d - rdim, 1))
        copy_pass = not inplace and d > rdim

        def grid(meta):
            return (triton.cdiv(q_rows, meta["BLOCK_R"]) + triton.cdiv(k_rows, meta["BLOCK_R"]),)

        _rope_fwd_kernel[grid](
            qe, ke, outs[0], outs[1], cos, sin, q_rows, k_rows,
            qa[1], qa[2], ka[1], ka[2],
            *sq, qe.stride(-1), *sqo, *sk, ke.stride(-1), *sko,
            *cq, *sq_, *ck, *sk_, cos.stride(-1),
            d, rdim, bucket(q_rows, 1 << 20),
            INTERLEAVED=bool(interleaved), COPY_PASS=copy_pass,
            BLOCK_H=block_h, BLOCK_P=block_p,
        )
    return outs[0], outs[1]


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         interleaved: bool = False, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k'): q and k rotated by (cos, sin) in one launch; as ``fxfuse::rope``.

    ``inplace=True`` writes the rotated dims over q and k and returns them
    (needs q, k of the result's shape and dtype, head dim of unit stride).
    """
    return forward_only("rope", _launch, q, k, cos, sin, interleaved, inplace)
