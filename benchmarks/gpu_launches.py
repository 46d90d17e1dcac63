"""The launches of every fxfuse Triton kernel to compile ahead of time, and the GPU targets to compile for.

A :class:`Job` is one kernel specialization for one target, as JSON-able data:
the kernel family, the launch it stands for (dtype, head dim, flags, shapes),
the autotune config and the reason the launcher's pruning drops that config.
:func:`plan` lists the covering set (or the quick set the test compiles);
:func:`launch` rebuilds a job's jit function, positional arguments and keyword
arguments the way the kernel's launcher builds them, on meta tensors (same
dtypes, strides and 16-byte alignment as the CUDA tensors of a real launch).
Used by ``benchmarks/gpu_readiness.py``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Target:
    """A GPU generation's per-SM limits (CUDA C++ Programming Guide, "Technical Specifications per
    Compute Capability"; the per-block shared memory is what ``cudaDevAttrMaxSharedMemoryPerBlockOptin``
    reports and what Triton checks a kernel's ``shared`` against before launching it)."""

    name: str
    gpu: str
    arch: int
    smem_per_sm: int  # bytes usable by blocks on one SM
    smem_per_block: int  # bytes one block may opt in to
    smem_reserved: int = 1024  # the CUDA runtime keeps 1 KB of each resident block's shared memory
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256


TARGETS = {
    "sm_80": Target("sm_80", "A100", 80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_90": Target("sm_90", "H100", 90, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


@dataclass(frozen=True)
class Job:
    """One kernel specialization to compile for one target.

    ``family`` names the kernel (attn-prefill, attn-decode, split-reduce, rms_norm, ...),
    ``params`` the launch it stands for, ``config`` the autotune config (None: the
    launcher passes none), ``pruned`` why the launcher's pruning hook drops it, if it
    does, and ``skip`` that it is listed but not compiled.
    """

    family: str
    label: str
    target: str
    params: dict[str, Any]
    config: dict[str, Any] | None = None
    pruned: str | None = None
    skip: bool = False

    def key(self) -> str:
        return json.dumps([self.family, self.label, self.params, self.config], sort_keys=True)


def config_dict(config) -> dict[str, Any]:
    """A ``triton.Config`` as JSON-able data."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _variant(d: int, **flags) -> dict[str, Any]:
    return dict(scale=d ** -0.5, **flags)


# One spelling of every score modifier the template generates, the pairs models use, and all at once.
FLAG_VARIANTS = {
    "causal": dict(causal=True),
    "softcap": dict(softcap=50.0),
    "bool mask": dict(mask="bool"),
    "float mask": dict(mask="float"),
    "window": dict(window=True, causal=True),
    "alibi": dict(alibi=True),
    "window + mask": dict(window=True, causal=True, mask="bool"),  # Mistral/Gemma with padding
    "alibi + mask": dict(alibi=True, causal=True, mask="bool"),  # BLOOM/MPT with padding
    "all": dict(causal=True, softcap=50.0, mask="float", window=True, alibi=True),
}


def prefill_shape(d: int, dtype: str, hkv: int = 8) -> dict[str, Any]:
    """A prefill launch: 2 × 8 query heads × 1000 tokens (a length that is not a multiple of 16)."""
    return dict(dtype=dtype, d=d, b=2, hq=8, hkv=hkv, sq=1000, sk=1000, splits=1)


def decode_shape(d: int, dtype: str, group: int = 4, tokens: int = 1, splits: int = 16) -> dict[str, Any]:
    """A packed decoding launch: ``group`` query heads per key/value head × ``tokens`` new tokens, 1000 keys."""
    return dict(dtype=dtype, d=d, b=1, hq=8 * group, hkv=8, sq=tokens, sk=1000, splits=splits)


def _attention_jobs(family: str, label: str, params: dict, configs: list, target: str,
                    first_kept: bool = False, compile_pruned: bool = True) -> list[Job]:
    """Jobs for ``configs`` (or the first the pruning keeps), each marked with the pruning's reason to drop it.

    ``compile_pruned`` False: configs the pruning drops are listed with the reason, not compiled.
    """
    kept, reasons = prune_attention(params, configs, target)
    if first_kept:
        configs, reasons = kept[:1], [None]
    return [Job(family, label, target, params, config_dict(c), r, skip=r is not None and not compile_pruned)
            for c, r in zip(configs, reasons)]


def latent_shape(dtype: str, r: int = 512, dr: int = 64, heads: int = 128, groups: int = 1, sq: int = 1,
                 splits: int = 16, causal: bool = False, mask: str = "none") -> dict[str, Any]:
    """A latent attention launch: DeepSeek-V3's decoding step by default (128 heads over one latent of
    R = 512 with Dr = 64 rotary dims, one new token, 1000 cached keys, 16 key splits)."""
    return dict(dtype=dtype, r=r, dr=dr, b=1, h=heads, g=groups, sq=sq, sk=1000, splits=splits, causal=causal,
                mask=mask)


def _latent_jobs(label: str, params: dict, configs: list, target: str, first_kept: bool = False,
                 compile_pruned: bool = True) -> list[Job]:
    """As :func:`_attention_jobs`, for the latent attention kernel."""
    import torch

    kernel = _module("latent_attention")
    named, kwargs = _latent_call(params, getattr(torch, params["dtype"]), "meta")
    spec = TARGETS[target]
    kept, reasons = kernel.prune(configs, named, kwargs, spec.arch, spec.smem_per_block)
    if first_kept:
        configs, reasons = kept[:1], [None]
    return [Job("latent-attn", label, target, params, config_dict(c), r, skip=r is not None and not compile_pruned)
            for c, r in zip(configs, reasons)]


def _latent_plan(quick: bool, target: str) -> list[Job]:
    """The latent attention jobs of :func:`plan` for ``target``."""
    configs = _module("latent_attention")._configs()
    if quick:
        return _latent_jobs("decode", latent_shape("bfloat16"), configs, target, first_kept=True)
    jobs = _latent_jobs("decode", latent_shape("bfloat16"), configs, target)
    for dtype in ("float16", "float32"):
        jobs += _latent_jobs("decode", latent_shape(dtype), configs, target, first_kept=True)
    for label, p in (("4 tokens, causal, bool mask", latent_shape("bfloat16", sq=4, causal=True, mask="bool")),
                     ("float mask", latent_shape("bfloat16", mask="float")),
                     ("no rotary part, 4 groups", latent_shape("bfloat16", dr=0, heads=32, groups=4)),
                     ("prefill", latent_shape("bfloat16", r=128, dr=32, heads=16, sq=1000, splits=1, causal=True))):
        jobs += _latent_jobs(label, p, configs, target, first_kept=True)
    return jobs


def _latent_call(params: dict[str, Any], dtype, device: str) -> tuple[dict, dict]:
    """(positional args by name, constexpr kwargs) of a latent attention launch, built as its ``_launch`` does."""
    import torch
    from fxfuse.kernels._config import bucket

    kernel = _module("latent_attention")
    b, h, g, sq, sk, r, dr, splits = (params[k] for k in ("b", "h", "g", "sq", "sk", "r", "dr", "splits"))
    e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
    ql, qr, lat, kr = e(b, h, sq, r), e(b, h, sq, dr), e(b, g, sk, r), e(b, g, sk, dr)
    out = e(b, sq, h, r).transpose(1, 2)
    mask, mstrides = None, (0, 0, 0, 0)
    if params["mask"] != "none":
        mask = e(b, 1, sq, sk, dt=torch.bool if params["mask"] == "bool" else dtype).expand(b, h, sq, sk)
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mstrides = mask.stride()
    kwargs = kernel.constexprs(dtype, r, dr, params["mask"], params["causal"], splits)
    part_o = part_ml = None
    if splits > 1:
        part_o = e(splits, b, h, sq, kwargs["BLOCK_R"], dt=torch.float32)
        part_ml = e(splits, b, h, sq, 2, dt=torch.float32)
    rows = sq * (h // g)
    args = (ql, qr if dr else None, lat, kr if dr else None, out, mask, part_o, part_ml, *ql.stride(), *qr.stride(),
            *lat.stride(), *kr.stride(), *out.stride(), *mstrides, b, h, g, sq, sk, r, dr, 0.1, bucket(rows),
            bucket(sk))
    return dict(zip(kernel._latent_attn_kernel.arg_names, args)), kwargs


def plan(quick: bool = False, targets: Iterable[str] = tuple(TARGETS)) -> list[Job]:
    """The kernels to compile: the covering set, or (``quick``) the small set the test compiles.

    Full, per target: the base attention variant (no mask, not causal) in float16 at every
    head dim with every prefill config and every split-KV decode config, in bfloat16 and
    float32 with the configs the pruning keeps at head dim 128 (the dropped ones listed
    with the reason) and the first kept one at the other head dims; the
    score modifiers (causal, softcap, bool mask, float mask, sliding window, ALiBi) each at
    head dim 128 in float16, the pairs models use with a padding mask (sliding window +
    mask, ALiBi + mask) likewise, and all of them at once at every head dim in float16 and at
    128 in bfloat16 and float32, with the first config the pruning keeps; unsplit decoding
    at every head dim in float16 and at 128 in every dtype; 128 packed rows (GQA 8 × 16
    tokens) with every decode config at head dim 128; prefill with one key/value head; the
    split reduction; every config of the elementwise kernels at one size and each of their
    flags and dtypes once. Quick: head dim 128, float16, the prefill configs the pruning
    keeps and the first it drops for registers, the deepest prefill pipeline at head dim
    256 (which it must drop for shared memory), the first decode config kept, the first
    prefill config kept for sliding window + mask, and each other kernel once. Latent attention
    (latent-attn): DeepSeek-V3's decoding step (128 heads over one latent, R = 512, Dr = 64) in bfloat16
    with every config, in float16 and float32 with the first the pruning keeps, and with that first kept
    config causal 4-token decoding with a boolean mask, a float mask, no rotary part over 4 latent groups
    and a causal prefill at R = 128, Dr = 32; quick: the bfloat16 decoding step's first kept config.
    """
    attention, norms, rope, activations = (_module(n) for n in ("attention", "norms", "rope", "activations"))
    prefill, decode = attention._prefill_configs(), attention._decode_configs()
    jobs: list[Job] = []
    for t in targets:
        if quick:
            base = _attention_jobs("attn-prefill", "base", dict(prefill_shape(128, "float16"), variant=_variant(128)),
                                   prefill, t)
            # what the autotuner may pick, and the first config dropped for registers (it must spill)
            jobs += [j for j in base if j.pruned is None]
            spilling = [j for j in base if j.pruned and j.pruned.startswith("registers")]
            if not spilling:
                raise ValueError(f"the attention pruning drops no head-dim-128 float16 prefill config for "
                                 f"registers on {t}; the 128×64 tiles on 4 warps spill there")
            jobs.append(spilling[0])
            # the deepest pipeline of the widest key blocks at head dim 256: over shared memory, must be pruned
            big = max(prefill, key=lambda c: (c.num_stages, c.kwargs["BLOCK_N"]))
            jobs += _attention_jobs("attn-prefill", "base", dict(prefill_shape(256, "float16"), variant=_variant(256)),
                                    [big], t)
            jobs += _attention_jobs("attn-decode", "base split-KV",
                                    dict(decode_shape(128, "float16"), variant=_variant(128)), decode, t,
                                    first_kept=True)
            # two score modifiers (Mistral's window with a padding mask): the pruning's tightest rule
            p = dict(prefill_shape(128, "float16"), variant=_variant(128, **FLAG_VARIANTS["window + mask"]))
            jobs += _attention_jobs("attn-prefill", "window + mask", p, prefill, t, first_kept=True)
        else:
            for d in HEAD_DIMS:
                for dtype in DTYPES:
                    every = dtype == "float16"  # every config, pruned ones too; else the kept ones
                    first = dtype != "float16" and d != 128  # ... at head dim 128, the first kept elsewhere
                    p = dict(prefill_shape(d, dtype), variant=_variant(d))
                    jobs += _attention_jobs("attn-prefill", "base", p, prefill, t, first_kept=first,
                                            compile_pruned=every)
                    p = dict(decode_shape(d, dtype), variant=_variant(d))
                    jobs += _attention_jobs("attn-decode", "base split-KV", p, decode, t, first_kept=first,
                                            compile_pruned=every)
            runs = [(name, 128, "float16") for name in FLAG_VARIANTS if name != "all"]
            runs += [("all", d, "float16") for d in HEAD_DIMS] + [("all", 128, dt) for dt in DTYPES[1:]]
            for name, d, dtype in runs:
                p = dict(prefill_shape(d, dtype), variant=_variant(d, **FLAG_VARIANTS[name]))
                jobs += _attention_jobs("attn-prefill", name, p, prefill, t, first_kept=True)
            for d, dtype in [(d, "float16") for d in HEAD_DIMS] + [(128, dt) for dt in DTYPES[1:]]:
                p = dict(decode_shape(d, dtype, splits=1), variant=_variant(d))
                jobs += _attention_jobs("attn-decode", "base unsplit", p, decode, t, first_kept=True)
            p = dict(decode_shape(128, "float16", group=8, tokens=16), variant=_variant(128))
            jobs += _attention_jobs("attn-decode", "128 packed rows", p, decode, t)
            p = dict(prefill_shape(128, "float16", hkv=1), variant=_variant(128))
            jobs += _attention_jobs("attn-prefill", "GQA, 1 kv head", p, prefill, t, first_kept=True)
        jobs += _latent_plan(quick, t)
        for d in ((128,) if quick else (64, 128, 256)):
            for dtype in (("float16",) if quick else DTYPES):
                jobs.append(Job("split-reduce", "log2", t, dict(dtype=dtype, d=d, splits=16, log2=True)))
        if not quick:
            jobs.append(Job("split-reduce", "natural", t, dict(dtype="float16", d=128, splits=16, log2=False)))
        jobs += _elementwise_jobs(quick, t, norms, rope, activations)
    return jobs


def _elementwise_jobs(quick: bool, target: str, norms, rope, activations) -> list[Job]:
    """Norm, rope and activation jobs: every config at one size (norms: what the pruning keeps), each flag once."""
    jobs: list[Job] = []
    for fam in ("rms_norm", "layer_norm"):
        for n in ((4096,) if quick else (768, 4096, norms.MAX_ROW)):
            configs = norms._configs()
            kept = norms._prune(configs, {}, BLOCK_N=_next_pow2(n))
            runs = kept[:1] if quick or n != 4096 else [c for c in configs if c in kept]
            for c in runs:
                jobs.append(Job(fam, f"n={n}", target, dict(dtype="float16", n=n, residual=True),
                                config_dict(c)))
        if not quick:
            for dtype in DTYPES:
                for residual in (False, True):
                    kept = norms._prune(norms._configs(), {}, BLOCK_N=4096)
                    jobs.append(Job(fam, "flags", target, dict(dtype=dtype, n=4096, residual=residual),
                                    config_dict(kept[0])))
    rope_configs = rope._configs()
    for c in (rope_configs if not quick else rope_configs[:1]):
        jobs.append(Job("rope", "configs", target, dict(dtype="bfloat16", d=128, rdim=128, interleaved=False,
                                                         inplace=False), config_dict(c)))
    if not quick:
        for dtype in DTYPES:
            for interleaved, rdim, inplace in ((True, 64, False), (False, 64, False), (False, 128, True)):
                jobs.append(Job("rope", "flags", target, dict(dtype=dtype, d=128, rdim=rdim,
                                                               interleaved=interleaved, inplace=inplace),
                                config_dict(rope_configs[0])))
    act_configs = activations._configs()
    for fam, act in (("gated_act", "silu"), ("gelu", "none")):
        for c in (act_configs if not quick else act_configs[:1]):
            jobs.append(Job(fam, "configs", target, dict(dtype="bfloat16", act=act, flat=True), config_dict(c)))
    if not quick:
        for dtype in DTYPES:
            for act in ("silu", "gelu", "gelu_tanh"):
                jobs.append(Job("gated_act", "flags", target, dict(dtype=dtype, act=act, flat=act != "gelu"),
                                config_dict(act_configs[0])))
            for act in ("none", "tanh", "sigmoid"):
                jobs.append(Job("gelu", "flags", target, dict(dtype=dtype, act=act), config_dict(act_configs[0])))
    return jobs


def _module(name: str):
    """A kernel module by name (``fxfuse.kernels`` re-exports functions of the same names as its modules)."""
    return importlib.import_module(f"fxfuse.kernels.{name}")


def _next_pow2(n: int) -> int:
    from fxfuse.kernels._config import next_pow2
    return next_pow2(n)


def prune_attention(params: dict[str, Any], configs: list, target: str) -> tuple[list, list[str | None]]:
    """(kept configs, reason each is dropped) by the launchers' pruning for this launch on ``target``."""
    import torch

    attention = _module("attention")
    named, kwargs = _attention_call(params, getattr(torch, params["dtype"]), "meta", attention)
    spec = TARGETS[target]
    return attention.prune(configs, named, kwargs, spec.arch, spec.smem_per_block)


def _attention_call(params: dict[str, Any], dtype, device: str, attention) -> tuple[dict, dict]:
    """(positional args by name, constexpr kwargs) of an attention launch, built as ``attention._launch`` does."""
    import torch
    from fxfuse.kernels._template import AttentionVariant
    from fxfuse.kernels._config import bucket, next_pow2

    v = AttentionVariant(**params["variant"])
    b, hq, hkv, sq, sk, d = (params[k] for k in ("b", "hq", "hkv", "sq", "sk", "d"))
    splits = params["splits"]
    e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
    q, k, vv = e(b, hq, sq, d), e(b, hkv, sk, d), e(b, hkv, sk, d)
    out = e(b, sq, hq, d).transpose(1, 2)
    mask, mstrides = None, (0, 0, 0, 0)
    if v.mask != "none":
        mask = e(b, 1, sq, sk, dt=torch.bool if v.mask == "bool" else dtype).expand(b, hq, sq, sk)
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mstrides = mask.stride()
    slopes = e(hq, dt=torch.float32) if v.alibi else None
    common = attention.head_constexprs(dtype, d, d)
    part_o = part_ml = None
    if splits > 1:
        part_o = e(splits, b, hq, sq, common["BLOCK_DV"], dt=torch.float32)
        part_ml = e(splits, b, hq, sq, 2, dt=torch.float32)
    args = (q, k, vv, out, mask, slopes, part_o, part_ml, *q.stride(), *k.stride(), *vv.stride(), *out.stride(),
            *mstrides, b, hq, hkv, sq, sk, d, d, 256 if v.window else 0, bucket(sq), bucket(sk))
    named = dict(zip(_attention_kernel(v).arg_names, args))
    packed = sq * (hq // hkv) <= attention.MAX_PACKED_ROWS and sq <= 16
    kwargs = dict(common, PACK_GQA=packed, NUM_SPLITS=splits)
    if packed:
        kwargs["BLOCK_M"] = max(16, next_pow2(sq * (hq // hkv)))
    return named, kwargs


def _attention_kernel(variant):
    from fxfuse.kernels._template import compile_variant
    return compile_variant(variant).kernel


def _jit(fn):
    """The JITFunction under autotuner/heuristics wrappers."""
    while not hasattr(fn, "params"):
        fn = fn.fn
    return fn


def _elementwise_call(job: Job, dtype, device: str) -> tuple[Any, dict, dict]:
    """(kernel, positional args by name, constexpr kwargs) of a norm, rope or activation launch."""
    import torch
    from fxfuse.kernels._config import bucket, next_pow2

    norms, rope, activations = (_module(n) for n in ("norms", "rope", "activations"))
    p = job.params
    e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
    if job.family in ("rms_norm", "layer_norm"):
        m, n = 64, p["n"]
        x, y, w = e(m, n), e(m, n), e(n)
        r, s = (e(m, n), e(m, n)) if p["residual"] else (None, None)
        if job.family == "rms_norm":
            kernel, params, flags = norms._rms_norm_fwd_kernel, (w,), dict(HAS_WEIGHT=True)
        else:
            kernel, params, flags = norms._layer_norm_fwd_kernel, (w, e(n)), dict(HAS_WEIGHT=True, HAS_BIAS=True)
        args = (x, r, *params, y, s, m, n, 1e-6, n, 0 if r is None else n, n, 0 if s is None else n, bucket(n))
        kwargs = dict(flags, HAS_RESIDUAL=r is not None, BLOCK_N=next_pow2(n))
    elif job.family == "rope":
        b, h, sq, d, rdim = 2, 8, 1000, p["d"], p["rdim"]
        q, k = e(b, h, sq, d), e(b, 2, sq, d)
        cos = e(1, 1, sq, rdim)  # read through zero strides on the broadcast dims, as the launcher does
        qo, ko = (q, k) if p["inplace"] else (e(b, h, sq, d), e(b, 2, sq, d))
        lead = lambda t: list(t.stride()[:-1])  # noqa: E731
        cq, ck = lead(cos.expand(b, h, sq, rdim)), lead(cos.expand(b, 2, sq, rdim))
        args = (q, k, qo, ko, cos, cos, b * h * sq, b * 2 * sq, h, sq, 2, sq,
                *lead(q), q.stride(-1), *lead(qo), *lead(k), k.stride(-1), *lead(ko),
                *cq, *cq, *ck, *ck, cos.stride(-1), d, rdim, bucket(b * h * sq, 1 << 20))
        kernel = rope._rope_fwd_kernel
        kwargs = dict(INTERLEAVED=p["interleaved"], COPY_PASS=not p["inplace"] and d > rdim,
                      BLOCK_H=next_pow2(rdim // 2), BLOCK_P=next_pow2(max(d - rdim, 1)))
    elif job.family == "gated_act":
        m, n = 2048, 8192
        g, u, y = e(m, n), e(m, n), e(m, n)
        args = (g, u, y, m, n, n, n, bucket(m * n, 1 << 24))
        kernel = activations._gated_act_fwd_kernel
        kwargs = dict(ACT=activations.ACTIVATIONS[p["act"]], FLAT=p["flat"])
    elif job.family == "gelu":
        numel = 2048 * 8192
        args = (e(numel), e(numel), numel, bucket(numel, 1 << 24))
        kernel = activations._gelu_fwd_kernel
        kwargs = dict(ACT=activations.ACTIVATIONS[activations.GELU_APPROXIMATIONS[p["act"]]])
    else:
        raise ValueError(f"unknown kernel family {job.family!r}")
    return kernel, dict(zip(kernel.arg_names, args)), kwargs


def launch(job: Job) -> tuple[Any, tuple, dict]:
    """(jit function, positional args, keyword args incl. the config's) for a job, on meta tensors."""
    import torch
    from fxfuse.kernels._template import AttentionVariant

    attention = _module("attention")
    dtype = getattr(torch, job.params["dtype"])
    if job.family.startswith("attn-"):
        kernel = _attention_kernel(AttentionVariant(**job.params["variant"]))
        named, kwargs = _attention_call(job.params, dtype, "meta", attention)
    elif job.family == "latent-attn":
        kernel = _module("latent_attention")._latent_attn_kernel
        named, kwargs = _latent_call(job.params, dtype, "meta")
    elif job.family == "split-reduce":
        p = job.params
        b, hq, sq, d, splits = 1, 32, 1, p["d"], p["splits"]
        block_dv = attention.head_constexprs(dtype, d, d)["BLOCK_DV"]
        e = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
        out = e(b, sq, hq, d, dt=dtype).transpose(1, 2)
        kernel = attention._attn_split_reduce_kernel
        named = dict(zip(kernel.arg_names,
                         (e(splits, b, hq, sq, block_dv), e(splits, b, hq, sq, 2), out, b, hq, sq, d, *out.stride())))
        kwargs = dict(NUM_SPLITS=splits, SPLITS_P2=_next_pow2(splits), BLOCK_DV=block_dv, LOG2_UNITS=p["log2"])
    else:
        kernel, named, kwargs = _elementwise_call(job, dtype, "meta")
    if job.config is not None:
        kwargs.update(job.config["kwargs"])
        kwargs.update(num_warps=job.config["num_warps"], num_stages=job.config["num_stages"])
    return _jit(kernel), tuple(named.values()), kwargs
