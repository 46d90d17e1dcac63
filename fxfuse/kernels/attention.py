"""Attention forward: ``attention(q, k, v, ...)`` with the layout and semantics of SDPA.

q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) → (B, Hq, Sq, Dv) in
q's dtype, for float16, bfloat16 and float32, head dims 1 to 256 (blocks are
padded to the next power of two, at least 16, with masked loads). Beyond
``torch.nn.functional.scaled_dot_product_attention`` it takes ``softcap``
(Gemma 2), ``window`` (a sliding window: key j > i - window) and
``alibi_slopes`` (adds slope[h]·(j - i)); the kernel is generated for each
combination from one template (``fxfuse.kernels._template``).

* Grouped-query heads: query head h reads key/value head h // (Hq // Hkv),
  through the index, never a copy.
* Masks: boolean (True keeps) or float (added), any shape that broadcasts to
  (B, Hq, Sq, Sk), read through zero strides on the broadcast dims.
* ``is_causal``: key j ≤ query i, top-left aligned as in SDPA.
* A query row that no key reaches (all scores -inf) gives zeros.
* Decoding (few query rows): the query heads that share a key/value head are
  packed into one block of rows, and the keys are split across programs
  (split-KV, "flash decoding") with a second kernel reducing the partial results.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fxfuse.kernels._config import (
    FLOAT_DTYPES, INTERPRET, bucket, check_device, forward_only, needs_grad, next_pow2, num_sms, tuned,
)
from fxfuse.kernels._template import LOG2E, AttentionVariant, GeneratedKernel, compile_variant

MAX_HEAD_DIM = 256
# Packed decoding: at most this many query rows (heads of a group × query positions)
# in one block; more and the prefill tiling is as good.
MAX_PACKED_ROWS = 128
# Split-KV aims at this many programs per SM (two resident CTAs hide each other's
# memory latency), with each split at least one key block long.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64


def _prefill_configs():
    # FlashAttention-2 tilings from the Triton tutorial and their Hopper retunes:
    # 128×64/128×128 blocks with 4-8 warps for head dims up to 128, smaller
    # blocks and fewer stages for 256 (the K/V tiles of 3-4 stages no longer
    # fit in shared memory) with 8 warps to spread its 64×256 accumulator, and
    # 16-row blocks for float32, whose exact ("ieee") dots run on the FMA units
    # with both operands in registers. ``prune`` keeps what fits the launch.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 4, 4),
            (64, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2),
            (64, 64, 8, 2), (64, 32, 8, 3), (16, 32, 4, 2), (16, 32, 8, 2), (16, 16, 8, 2),
        )
    ]


def _decode_configs():
    # Decoding streams K and V once: key blocks of 32-128 rows with 4 warps;
    # deeper pipelines (3-4 stages) keep more loads in flight per SM; 8 warps
    # on 32-key blocks for float32 at head dim 256.
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in ((64, 4, 3), (128, 4, 3), (64, 4, 4), (32, 4, 4), (128, 8, 3), (64, 4, 2), (32, 8, 2),
                         (16, 8, 2))
    ]


# The resource model behind the pruning, calibrated on ahead-of-time compiles of every config
# for sm_80 and sm_90 (benchmarks/gpu_readiness.py → benchmarks/results/gpu-readiness.md).
# Shared memory holds the q tile and, per pipeline buffer, a K and a V tile (and a mask
# tile): Hopper's pipeline (wgmma) keeps num_stages buffers; Ampere's (cp.async, mma.sync)
# num_stages - 1, plus the p tile on its way to the second dot; 1 KB covers the cross-warp
# reductions. Registers hold the fp32 accumulator and score tiles, one more score-sized tile
# per modifier that reads or computes one (mask, ALiBi, sliding window) and, with mma.sync,
# the q operand fragments: past 128 such 32-bit values per thread ptxas spills (128×64
# blocks on 4 warps at head dim 128 need 256 and spill on both targets). float32 dots
# ("ieee") run on the FMA units with the q, K and V tiles in registers as well; there the
# compiles spill from about 80 values per thread.
MAX_TILE_VALUES = 128
MAX_TILE_VALUES_FMA = 64
EXTRA_TILE_VALUES = 48


def shared_memory_estimate(block_m: int, block_n: int, block_d: int, block_dv: int, num_stages: int,
                           elem_bytes: int, capability: int, mask: bool = False) -> int:
    """Bytes of shared memory the generated kernel needs at most, on a device of ``capability`` (80, 90, ...)."""
    buffers = num_stages if capability >= 90 else max(1, num_stages - 1)
    per_buffer = block_n * (block_d + block_dv) * elem_bytes + (block_m * block_n * 2 if mask else 0)
    shared = block_m * block_d * elem_bytes + buffers * per_buffer + 1024
    if capability < 90:
        shared += block_m * block_n * elem_bytes
    return shared


def tile_values_per_thread(block_m: int, block_n: int, block_d: int, block_dv: int, num_warps: int,
                           elem_bytes: int, capability: int, score_tiles: int = 0) -> int:
    """32-bit values per thread that one program's tiles keep in registers (compare with ``tile_value_limit``).

    ``score_tiles``: extra BLOCK_M × BLOCK_N tiles the score modifiers keep live.
    """
    if elem_bytes == 4:
        values = block_m * block_d + block_n * (block_d + block_dv) + block_m * (block_dv + block_n)
    else:
        values = block_m * (block_dv + block_n) + (block_m * block_d // 2 if capability < 90 else 0)
    values += score_tiles * block_m * block_n
    return values // (32 * num_warps)


def tile_value_limit(elem_bytes: int) -> int:
    """Tile values per thread past which ptxas spills: FMA dots for float32, tensor-core dots otherwise."""
    return MAX_TILE_VALUES_FMA if elem_bytes == 4 else MAX_TILE_VALUES


def prune_reason(config: triton.Config, *, block_d: int, block_dv: int, elem_bytes: int, capability: int,
                 max_shared: int, block_m: int | None = None, mask: bool = False, score_tiles: int = 0) -> str | None:
    """Why ``config`` should not be launched on this device (None: it fits).

    ``block_m`` is the launcher's for decoding (packed rows), else the config's;
    ``mask``: a mask tensor is read; ``score_tiles``: see :func:`tile_values_per_thread`.
    Too much shared memory fails the launch (Triton raises OutOfResources);
    spilled registers go through local memory on every key block.
    """
    bm = block_m if block_m is not None else config.kwargs["BLOCK_M"]
    bn = config.kwargs["BLOCK_N"]
    shared = shared_memory_estimate(bm, bn, block_d, block_dv, config.num_stages, elem_bytes, capability, mask)
    if shared > max_shared:
        return f"shared memory: {shared // 1024} KB > {max_shared // 1024} KB"
    values = tile_values_per_thread(bm, bn, block_d, block_dv, config.num_warps, elem_bytes, capability,
                                    score_tiles)
    # with a score modifier (its index tiles) or in the decode kernel (packed rows, split bookkeeping)
    # the compiles already spill at the limit itself, and each further modifier takes more than its
    # tile (index and predicate tiles): fitted on the compiles
    at_limit = score_tiles > 0 or block_m is not None
    limit = tile_value_limit(elem_bytes) - (1 if at_limit else 0) - EXTRA_TILE_VALUES * max(0, score_tiles - 1)
    if values > limit:
        return f"registers: {values} tile values/thread > {limit}"
    return None


def prune(configs: list[triton.Config], named_args: dict, kwargs: dict, capability: int,
          max_shared: int) -> tuple[list[triton.Config], list[str | None]]:
    """(kept configs, the reason each config is dropped or None) for a launch on a device with these limits.

    ``named_args`` and ``kwargs`` are what the autotuner's pruning hook receives. If no
    config fits, one is kept so the launch still runs: the fewest tile values per
    thread among those that fit in shared memory, else the least shared memory.
    """
    q, mask = named_args["Q"], named_args["Mask"] is not None
    tiles = mask + (named_args["Slopes"] is not None) + (named_args["WINDOW"] != 0)
    bd, bdv, elem, bm = kwargs["BLOCK_D"], kwargs["BLOCK_DV"], q.element_size(), kwargs.get("BLOCK_M")
    reasons = [prune_reason(c, block_d=bd, block_dv=bdv, elem_bytes=elem, capability=capability,
                            max_shared=max_shared, block_m=bm, mask=mask, score_tiles=tiles) for c in configs]
    kept = [c for c, r in zip(configs, reasons) if r is None]
    if not kept:
        def cost(c):
            m, n = bm or c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            shared = shared_memory_estimate(m, n, bd, bdv, c.num_stages, elem, capability, mask)
            values = tile_values_per_thread(m, n, bd, bdv, c.num_warps, elem, capability, tiles)
            return (shared > max_shared, values if shared <= max_shared else shared)
        kept = [min(configs, key=cost)]
    return kept, reasons


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(compute capability as 80/90/..., shared memory bytes one block may opt in to) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return props.major * 10 + props.minor, props.shared_memory_per_block_optin


def _prune(configs, named_args, **kwargs):
    """Autotune hook (prefill and decode): the configs that fit this launch on its device."""
    q = named_args["Q"]
    if q.device.type != "cuda":
        return configs
    return prune(configs, named_args, kwargs, *_device_limits(q.device))[0]


# Under the interpreter: 16-row blocks, so small test shapes still cross several
# query and key blocks (and the diagonal, window and boundary code paths).
_INTERPRET_PREFILL = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})
_INTERPRET_DECODE = triton.Config({"BLOCK_N": 16})

_PREFILL_KEY = ["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "BLOCK_DV", "NUM_SPLITS"]
_DECODE_KEY = ["SK_BUCKET", "BLOCK_M", "BLOCK_D", "BLOCK_DV", "NUM_SPLITS"]
_LAUNCHERS: dict[AttentionVariant, tuple] = {}


def _launchers(variant: AttentionVariant):
    """(generated kernel, prefill autotuner, decode autotuner) for ``variant``."""
    hit = _LAUNCHERS.get(variant)
    if hit is None:
        gen = compile_variant(variant)
        prefill = tuned(_prefill_configs(), _PREFILL_KEY, interpret=_INTERPRET_PREFILL,
                        prune_configs_by={"early_config_prune": _prune})(gen.kernel)
        decode = tuned(_decode_configs(), _DECODE_KEY, interpret=_INTERPRET_DECODE,
                       prune_configs_by={"early_config_prune": _prune})(gen.kernel)
        hit = _LAUNCHERS[variant] = (gen, prefill, decode)
    return hit


@triton.jit
def _attn_split_reduce_kernel(
    PartO, PartML, Out, B, Hq, Sq, DV,
    stride_ob, stride_oh, stride_om, stride_od,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_DV: tl.constexpr, LOG2_UNITS: tl.constexpr,
):
    """Combine the splits' (unnormalized acc, running max m, sum l) of one query row."""
    row = tl.program_id(0).to(tl.int64)
    i = row % Sq
    h = (row // Sq) % Hq
    b = row // (Sq * Hq)
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < NUM_SPLITS
    part = s.to(tl.int64) * (B * Hq * Sq) + row
    m = tl.load(PartML + part * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(PartML + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    if LOG2_UNITS:
        w = tl.math.exp2(m - m_use)
    else:
        w = tl.exp(m - m_use)
    total = tl.sum(l_s * w, 0)
    offs = tl.arange(0, BLOCK_DV)
    acc = tl.load(PartO + part[:, None] * BLOCK_DV + offs[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + offs * stride_od,
             out.to(Out.dtype.element_ty), mask=offs < DV)


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ALiBi slopes of Press et al. (BLOOM, MPT): 2^(-8i/n) for n a power of two, interleaved otherwise."""
    def pow2_slopes(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        slopes = pow2_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = pow2_slopes(closest) + pow2_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def variant_for(q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                softcap: float | None, window: int | None, alibi: torch.Tensor | None) -> AttentionVariant:
    """The kernel variant these arguments select."""
    mask = "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
    return AttentionVariant(
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        causal=bool(is_causal), softcap=None if softcap is None else float(softcap), mask=mask,
        window=window is not None, alibi=alibi is not None,
    )


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot take these inputs (None if it can); for callers that fall back."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-D (batch, heads, seq, head_dim)"
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (one of float16, bfloat16, float32 for all)"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} above {MAX_HEAD_DIM}"
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return f"mask dtype {attn_mask.dtype}"
    return None


def get_kernel(variant: AttentionVariant) -> GeneratedKernel:
    """The generated kernel (source, path, jit function) of ``variant``, compiling it if needed."""
    return _launchers(variant)[0]


def head_constexprs(dtype: torch.dtype, d: int, dv: int) -> dict:
    """The constexprs a launch takes from the dtype and head dims (shared with the ahead-of-time check).

    Head dims are padded to a power of two, at least 16 (a ``tl.dot`` operand's
    minimum), with masked loads when the padding is not exact (EVEN_D False).
    """
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    return dict(BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=block_d == d and block_dv == dv,
                # float32 inputs: full-precision products (tf32 would miss the 1e-4 of float32)
                INPUT_PRECISION="ieee" if dtype == torch.float32 else None,
                # the CPU interpreter's tl.dot reads bfloat16 as integers: multiply in float32 there
                UPCAST_DOT=INTERPRET and dtype == torch.bfloat16)


def _default_splits(programs: int, sk: int, device: torch.device) -> int:
    want = PROGRAMS_PER_SM * num_sms(device)
    if programs >= want:
        return 1
    return max(1, min(want // programs, triton.cdiv(sk, 64), MAX_SPLITS))


def _launch(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap, window, alibi_slopes, num_splits):
    if (reason := supports(q, k, v, attn_mask)) is not None:
        raise ValueError(f"fxfuse.kernels.attention: {reason}")
    check_device("attention", q, k, v, attn_mask, alibi_slopes)
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape[0] != B or v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != Sk or k.shape[-1] != D:
        raise ValueError(f"fxfuse.kernels.attention: shapes q{tuple(q.shape)}, k{tuple(k.shape)}, "
                         f"v{tuple(v.shape)} do not fit (B, H, S, D)")
    if Hq != Hkv and not (enable_gqa and Hq % Hkv == 0):
        raise ValueError(f"fxfuse.kernels.attention: {Hq} query heads and {Hkv} key/value heads need "
                         f"enable_gqa=True and a whole number of query heads per key/value head")
    if window is not None and window < 1:
        raise ValueError(f"fxfuse.kernels.attention: window must be at least 1, got {window}")
    if alibi_slopes is not None and alibi_slopes.shape != (Hq,):
        raise ValueError(f"fxfuse.kernels.attention: alibi_slopes must have shape ({Hq},)")
    variant = variant_for(q, attn_mask, is_causal, scale, softcap, window, alibi_slopes)
    gen, prefill, decode = _launchers(variant)
    # Output laid out (B, Sq, Hq, Dv) and viewed (B, Hq, Sq, Dv), as SDPA's flash kernel does:
    # the usual transpose(1, 2).reshape(B, Sq, Hq·Dv) after attention is then free.
    out = torch.empty(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    mask, mstrides = None, (0, 0, 0, 0)
    if attn_mask is not None:
        mask = attn_mask.expand(B, Hq, Sq, Sk)  # a view: broadcast dims get stride 0
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        mstrides = mask.stride()
    group = Hq // Hkv
    common = head_constexprs(q.dtype, D, Dv)
    block_dv = common["BLOCK_DV"]
    packed = Sq * group <= MAX_PACKED_ROWS and Sq <= 16
    if packed:
        block_m = max(16, next_pow2(Sq * group))
        programs = B * Hkv
    else:
        programs = B * Hq * triton.cdiv(Sq, 64)
    splits = num_splits if num_splits is not None else (
        _default_splits(programs, Sk, q.device) if packed else 1)
    splits = max(1, min(int(splits), max(1, triton.cdiv(Sk, 16))))
    part_o = part_ml = None
    if splits > 1:
        part_o = torch.empty(splits, B, Hq, Sq, block_dv, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(splits, B, Hq, Sq, 2, dtype=torch.float32, device=q.device)
    args = (
        q, k, v, out, mask, alibi_slopes, part_o, part_ml,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstrides,
        B, Hq, Hkv, Sq, Sk, D, Dv, 0 if window is None else int(window),
        bucket(Sq), bucket(Sk),
    )
    if packed:
        decode[(1, B * Hkv, splits)](*args, BLOCK_M=block_m, PACK_GQA=True, NUM_SPLITS=splits, **common)
    else:
        grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq, splits)  # noqa: E731
        prefill[grid](*args, PACK_GQA=False, NUM_SPLITS=splits, **common)
    if splits > 1:
        _attn_split_reduce_kernel[(B * Hq * Sq,)](
            part_o, part_ml, out, B, Hq, Sq, Dv, *out.stride(),
            NUM_SPLITS=splits, SPLITS_P2=next_pow2(splits), BLOCK_DV=block_dv, LOG2_UNITS=variant.log2_units,
        )
    return out


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False, softcap: float | None = None, window: int | None = None,
    alibi_slopes: torch.Tensor | None = None, num_splits: int | None = None,
) -> torch.Tensor:
    """softmax(cap(q·kᵀ·scale) + alibi + attn_mask) · v; the arguments of SDPA plus the score modifiers.

    ``scale`` defaults to 1/sqrt(D). ``softcap`` c: scores c·tanh(s/c) after the
    scale. ``window`` w keeps key j > i - w. ``alibi_slopes`` (Hq,) adds
    slope[h]·(j - i) (see :func:`alibi_slopes`). ``num_splits`` forces the number
    of key splits (default: chosen for decoding shapes, 1 otherwise). Forward
    only: under autograd the result's backward raises NotImplementedError.
    """
    if needs_grad(q, k, v, attn_mask, alibi_slopes):
        return forward_only(
            "attention",
            lambda q_, k_, v_, m_, a_: _launch(q_, k_, v_, m_, is_causal, scale, enable_gqa, softcap, window, a_,
                                               num_splits),
            q, k, v, attn_mask, alibi_slopes)
    return _launch(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap, window, alibi_slopes, num_splits)


__all__ = ["AttentionVariant", "LOG2E", "alibi_slopes", "attention", "get_kernel", "supports", "variant_for"]
