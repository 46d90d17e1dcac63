"""Latent attention forward: ``latent_attention(q_latent, q_rope, latent, k_rope, ...)``, as the dialect op.

Multi-head latent attention with absorbed up-projections (DeepSeek's MLA,
TransMLA): q_latent (B, H, Sq, R), q_rope (B, H, Sq, Dr), latent (B, G, Sk, R),
k_rope (B, G, Sk, Dr) → (B, H, Sq, R) in q_latent's dtype, for float16,
bfloat16 and float32, R up to 512 and Dr from 0 to 128::

    out_h = softmax((q_latent_h · latent_gᵀ + q_rope_h · k_rope_gᵀ) · scale + mask) · latent_g
    with g = h // (H // G)

The latent is both the keys (with k_rope) and the values: the kernel loads
each latent tile once and uses it for the scores and for P · latent, so a
step of decoding reads the compressed cache once, not once as keys and
again as values.

* Heads: the H // G query heads of a latent group are packed with the
  query rows into one block of rows (row = query · H/G + head), so every
  head of the group shares each latent tile load (all heads, at decoding).
* Masks: boolean (True keeps) or float (added), any shape that broadcasts to
  (B, H, Sq, Sk), read through zero strides on the broadcast dims.
* ``is_causal``: key j ≤ query i, top-left aligned as in SDPA.
* A query row that no key reaches (all scores -inf) gives zeros.
* Decoding (few query rows): the keys are split across programs (split-KV),
  and the attention kernel's reduction combines the partial results.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fxfuse.kernels._config import (
    FLOAT_DTYPES, INTERPRET, bucket, check_device, forward_only, needs_grad, next_pow2, tuned,
)
from fxfuse.kernels._template import LOG2E
from fxfuse.kernels.attention import (
    _attn_split_reduce_kernel, _default_splits, _device_limits, shared_memory_estimate, tile_value_limit,
    tile_values_per_thread,
)

MAX_LATENT_DIM = 512
MAX_ROPE_DIM = 128
# Split-KV only for decoding shapes: at most this many query positions.
MAX_DECODE_QUERIES = 16
MASK_KINDS = {"none": 0, "bool": 1, "float": 2}


def _configs():
    # Rows are (query, head) pairs of one latent group. DeepSeek's decoding shape
    # (128 heads, R = 512, Dr = 64) fits 32-row blocks on 8 warps: the 32 × 512
    # float32 accumulator is 64 values per thread, and the q tile and a 32 × 576
    # latent tile take 74 KB (compiled without spills for sm_80 and sm_90, see
    # benchmarks/gpu_readiness.py); 64-row blocks need 16-bit R ≤ 256 to stay in
    # registers, and 128-row blocks are for prefill at R ≤ 128. 16-row blocks are
    # the float32 configs (exact dots on the FMA units, operands in registers).
    # ``prune`` keeps what fits the launch.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3),
            (16, 32, 4, 2), (16, 64, 4, 3), (16, 16, 4, 2), (16, 16, 8, 2),
        )
    ]


def prune_reason(config: triton.Config, *, block_r: int, block_dr: int, elem_bytes: int, capability: int,
                 max_shared: int, mask: bool = False) -> str | None:
    """Why ``config`` should not be launched on this device (None: it fits).

    The attention kernel's resource model (``fxfuse.kernels.attention``) with
    the latent read once: the key tile is latent ‖ k_rope (R + Dr columns)
    and there is no separate value tile in shared memory; the accumulator is
    R wide. ``mask``: a mask tensor is read.
    """
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    width = block_r + block_dr
    shared = shared_memory_estimate(bm, bn, width, 0, config.num_stages, elem_bytes, capability, mask)
    if shared > max_shared:
        return f"shared memory: {shared // 1024} KB > {max_shared // 1024} KB"
    values = tile_values_per_thread(bm, bn, width, block_r, config.num_warps, elem_bytes, capability, int(mask))
    limit = tile_value_limit(elem_bytes)
    if values > limit:
        return f"registers: {values} tile values/thread > {limit}"
    return None


def prune(configs: list[triton.Config], named_args: dict, kwargs: dict, capability: int,
          max_shared: int) -> tuple[list[triton.Config], list[str | None]]:
    """(kept configs, the reason each config is dropped or None) for a launch on a device with these limits.

    If no config fits, the one with the fewest tile values per thread among
    those that fit in shared memory is kept (else the least shared memory).
    """
    mask, elem = named_args["Mask"] is not None, named_args["QL"].element_size()
    br, bdr = kwargs["BLOCK_R"], kwargs["BLOCK_DR"] if kwargs["HAS_ROPE"] else 0
    reasons = [prune_reason(c, block_r=br, block_dr=bdr, elem_bytes=elem, capability=capability,
                            max_shared=max_shared, mask=mask) for c in configs]
    kept = [c for c, r in zip(configs, reasons) if r is None]
    if not kept:
        def cost(c):
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            shared = shared_memory_estimate(m, n, br + bdr, 0, c.num_stages, elem, capability, mask)
            values = tile_values_per_thread(m, n, br + bdr, br, c.num_warps, elem, capability, int(mask))
            return (shared > max_shared, values if shared <= max_shared else shared)
        kept = [min(configs, key=cost)]
    return kept, reasons


def _prune(configs, named_args, **kwargs):
    """Autotune hook: the configs that fit this launch on its device."""
    q = named_args["QL"]
    if q.device.type != "cuda":
        return configs
    return prune(configs, named_args, kwargs, *_device_limits(q.device))[0]


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:  # Triton's CPU interpreter multiplies bfloat16 bit patterns as integers
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _latent_attn_kernel(
    QL, QR, L, KR, Out, Mask, PartO, PartML,
    stride_qlb, stride_qlh, stride_qlm, stride_qld,
    stride_qrb, stride_qrh, stride_qrm, stride_qrd,
    stride_lb, stride_lg, stride_ln, stride_ld,
    stride_krb, stride_krg, stride_krn, stride_krd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    B, H, G, Sq, Sk, R, DR, qk_scale,
    ROWS_BUCKET, SK_BUCKET,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    HAS_ROPE: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, LOG2: tl.constexpr,
    NUM_SPLITS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Grid (row blocks, batch × groups, splits). A row is a (query, head) pair of one latent group:
    row = query · (H // G) + head within the group. MASK: 0 none, 1 boolean, 2 float. LOG2: scores in
    log2 units (``qk_scale`` holds log2(e)), not with a float mask (finfo.min·log2(e) overflows).
    NUM_SPLITS > 1: a program takes one slice of the keys and writes partial results."""
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)
    per_group = H // G
    b = pid_bg // G
    grp = pid_bg % G
    rows = per_group * Sq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    qi = offs_m // per_group
    head = grp * per_group + offs_m % per_group
    q_last = (tl.minimum(rows, pid_m * BLOCK_M + BLOCK_M) - 1) // per_group
    b64 = b.to(tl.int64)
    head64 = head.to(tl.int64)
    qi64 = qi.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    ql = tl.load(QL + (b64 * stride_qlb + head64 * stride_qlh + qi64 * stride_qlm)[:, None]
                 + offs_r[None, :] * stride_qld, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    L_base = L + b64 * stride_lb + grp.to(tl.int64) * stride_lg
    if HAS_ROPE:
        offs_dr = tl.arange(0, BLOCK_DR)
        dr_ok = offs_dr < DR
        qr = tl.load(QR + (b64 * stride_qrb + head64 * stride_qrh + qi64 * stride_qrm)[:, None]
                     + offs_dr[None, :] * stride_qrd, mask=row_ok[:, None] & dr_ok[None, :], other=0.0)
        KR_base = KR + b64 * stride_krb + grp.to(tl.int64) * stride_krg
    if MASK != 0:
        M_rows = Mask + b64 * stride_mb + head64 * stride_mh + qi64 * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    if CAUSAL:
        hi = tl.minimum(Sk, q_last + 1)
    else:
        hi = Sk
    lo = 0
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = pid_s * per_split
        hi = tl.minimum(hi, lo + per_split)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Sk
        # One load of the latent tile: the keys' first R columns and the values.
        lat = tl.load(L_base + offs_n[:, None] * stride_ln + offs_r[None, :] * stride_ld,
                      mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        qk = _dot(ql, tl.trans(lat), INPUT_PRECISION, UPCAST_DOT)
        if HAS_ROPE:
            kr = tl.load(KR_base + offs_n[:, None] * stride_krn + offs_dr[None, :] * stride_krd,
                         mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
            qk += _dot(qr, tl.trans(kr), INPUT_PRECISION, UPCAST_DOT)
        s = qk * qk_scale
        if MASK == 1:
            keep = tl.load(M_rows[:, None] + offs_n[None, :] * stride_mn, mask=row_ok[:, None] & n_ok[None, :],
                           other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        if MASK == 2:
            s += tl.load(M_rows[:, None] + offs_n[None, :] * stride_mn, mask=row_ok[:, None] & n_ok[None, :],
                         other=0.0).to(tl.float32)
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= qi[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no key so far keeps m = -inf: subtract 0 there, so p = 0 and no NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        if LOG2:
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        else:
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(lat.dtype), lat, INPUT_PRECISION, UPCAST_DOT)
        m_i = m_new
    if NUM_SPLITS > 1:
        part = ((pid_s * B + b64) * H + head64) * Sq + qi64
        tl.store(PartO + part[:, None] * BLOCK_R + offs_r[None, :], acc, mask=row_ok[:, None])
        tl.store(PartML + part * 2, m_i, mask=row_ok)
        tl.store(PartML + part * 2 + 1, l_i, mask=row_ok)
    else:
        # a row that no key reaches (every score -inf) has l = 0 and acc = 0: its output is 0
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = b64 * stride_ob + head64 * stride_oh + qi64 * stride_om
        tl.store(Out + o_rows[:, None] + offs_r[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & r_ok[None, :])


# Under the interpreter: 16-row blocks, so small test shapes still cross several row and key blocks.
_INTERPRET = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})
_KEY = ["ROWS_BUCKET", "SK_BUCKET", "BLOCK_R", "BLOCK_DR", "HAS_ROPE", "CAUSAL", "MASK", "NUM_SPLITS"]
_kernel = tuned(_configs(), _KEY, interpret=_INTERPRET, prune_configs_by={"early_config_prune": _prune})(
    _latent_attn_kernel)


def supports(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
             attn_mask: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot take these inputs (None if it can); for callers that fall back."""
    tensors = (q_latent, q_rope, latent, k_rope)
    if any(t.dim() != 4 for t in tensors):
        return "q_latent, q_rope, latent and k_rope must be 4-D (batch, heads, seq, dim)"
    if q_latent.dtype not in FLOAT_DTYPES or any(t.dtype != q_latent.dtype for t in tensors):
        return (f"dtypes q_latent {q_latent.dtype}, q_rope {q_rope.dtype}, latent {latent.dtype}, "
                f"k_rope {k_rope.dtype} (one of float16, bfloat16, float32 for all)")
    if q_latent.shape[-1] > MAX_LATENT_DIM:
        return f"latent dim {q_latent.shape[-1]} above {MAX_LATENT_DIM}"
    if q_rope.shape[-1] > MAX_ROPE_DIM:
        return f"rotary dim {q_rope.shape[-1]} above {MAX_ROPE_DIM}"
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return f"mask dtype {attn_mask.dtype}"
    return None


def constexprs(dtype: torch.dtype, r: int, dr: int, mask: str, causal: bool, splits: int) -> dict:
    """The constexprs a launch takes (shared with the ahead-of-time check); ``mask``: "none", "bool" or "float".

    Dims are padded to a power of two, at least 16 (a ``tl.dot`` operand's
    minimum), with masked loads.
    """
    return dict(
        BLOCK_R=max(16, next_pow2(r)), BLOCK_DR=max(16, next_pow2(dr)), HAS_ROPE=dr > 0, CAUSAL=bool(causal),
        MASK=MASK_KINDS[mask], LOG2=mask != "float", NUM_SPLITS=splits,
        # float32 inputs: full-precision products (tf32 would miss the 1e-4 of float32)
        INPUT_PRECISION="ieee" if dtype == torch.float32 else None,
        # the CPU interpreter's tl.dot reads bfloat16 as integers: multiply in float32 there
        UPCAST_DOT=INTERPRET and dtype == torch.bfloat16,
    )


def _launch(q_latent, q_rope, latent, k_rope, attn_mask, is_causal, scale, num_splits):
    if (reason := supports(q_latent, q_rope, latent, k_rope, attn_mask)) is not None:
        raise ValueError(f"fxfuse.kernels.latent_attention: {reason}")
    check_device("latent_attention", q_latent, q_rope, latent, k_rope, attn_mask)
    B, H, Sq, R = q_latent.shape
    G, Sk, Dr = latent.shape[1], latent.shape[2], q_rope.shape[-1]
    if (tuple(q_rope.shape[:3]) != (B, H, Sq) or latent.shape[0] != B or latent.shape[-1] != R
            or tuple(k_rope.shape) != (B, G, Sk, Dr) or G == 0 or H % G):
        raise ValueError(f"fxfuse.kernels.latent_attention: shapes q_latent{tuple(q_latent.shape)}, "
                         f"q_rope{tuple(q_rope.shape)}, latent{tuple(latent.shape)}, k_rope{tuple(k_rope.shape)} "
                         f"do not fit (B, H, Sq, R), (B, H, Sq, Dr), (B, G, Sk, R), (B, G, Sk, Dr) with H % G == 0")
    # Output laid out (B, Sq, H, R) and viewed (B, H, Sq, R), as the dialect op's result is.
    out = torch.empty(B, Sq, H, R, dtype=q_latent.dtype, device=q_latent.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    mask, mstrides, kind = None, (0, 0, 0, 0), "none"
    if attn_mask is not None:
        mask = attn_mask.expand(B, H, Sq, Sk)  # a view: broadcast dims get stride 0
        kind = "bool" if mask.dtype == torch.bool else "float"
        if kind == "bool":
            mask = mask.view(torch.uint8)
        mstrides = mask.stride()
    log2 = kind != "float"
    scale = 1.0 / math.sqrt(R + Dr) if scale is None else float(scale)
    rows = Sq * (H // G)
    if num_splits is not None:
        splits = num_splits
    elif Sq <= MAX_DECODE_QUERIES:
        splits = _default_splits(B * G * triton.cdiv(rows, 32), Sk, q_latent.device)  # 32-row decoding blocks
    else:
        splits = 1
    splits = max(1, min(int(splits), max(1, triton.cdiv(Sk, 16))))
    flags = constexprs(q_latent.dtype, R, Dr, kind, is_causal, splits)
    block_r = flags["BLOCK_R"]
    part_o = part_ml = None
    if splits > 1:
        part_o = torch.empty(splits, B, H, Sq, block_r, dtype=torch.float32, device=q_latent.device)
        part_ml = torch.empty(splits, B, H, Sq, 2, dtype=torch.float32, device=q_latent.device)
    rope = Dr > 0
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), B * G, splits)  # noqa: E731
    _kernel[grid](
        q_latent, q_rope if rope else None, latent, k_rope if rope else None, out, mask, part_o, part_ml,
        *q_latent.stride(), *q_rope.stride(), *latent.stride(), *k_rope.stride(), *out.stride(), *mstrides,
        B, H, G, Sq, Sk, R, Dr, scale * LOG2E if log2 else scale, bucket(rows), bucket(Sk), **flags,
    )
    if splits > 1:
        _attn_split_reduce_kernel[(B * H * Sq,)](
            part_o, part_ml, out, B, H, Sq, R, *out.stride(),
            NUM_SPLITS=splits, SPLITS_P2=next_pow2(splits), BLOCK_DV=block_r, LOG2_UNITS=log2,
        )
    return out


def latent_attention(
    q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, *,
    attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """softmax((q_latent·latentᵀ + q_rope·k_ropeᵀ)·scale + attn_mask) · latent, per head (see the module).

    ``scale`` defaults to 1/sqrt(R + Dr). ``num_splits`` forces the number of
    key splits (default: chosen for decoding shapes, 1 otherwise). Forward
    only: under autograd the result's backward raises NotImplementedError.
    """
    if needs_grad(q_latent, q_rope, latent, k_rope, attn_mask):
        return forward_only(
            "latent_attention",
            lambda ql, qr, lat, kr, m: _launch(ql, qr, lat, kr, m, is_causal, scale, num_splits),
            q_latent, q_rope, latent, k_rope, attn_mask)
    return _launch(q_latent, q_rope, latent, k_rope, attn_mask, is_causal, scale, num_splits)


__all__ = ["MAX_LATENT_DIM", "MAX_ROPE_DIM", "constexprs", "latent_attention", "prune", "prune_reason", "supports"]
