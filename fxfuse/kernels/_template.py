"""The one attention template: source text specialized per score variant, written to disk and imported.

An :class:`AttentionVariant` says what the block does to the scores: the
scale (baked in as a literal), causal masking, soft-capping, a mask tensor
(boolean or additive float, read through broadcast strides), a sliding window
and ALiBi slopes (both computed in the kernel). :func:`render` turns
``TEMPLATE`` into the source of a FlashAttention-style forward kernel for that
variant alone: lines between ``#if FLAG`` / ``#else`` / ``#endif`` are kept or
dropped, ``$NAME`` fields are substituted, so the generated code has no
branches for what the variant does not do. :func:`compile_variant` writes the
source to a file named by its content hash (Triton's ``jit`` reads a
function's source from its file) and imports it, once per process.

Dtype, head dims, GQA packing and split-KV are not part of the variant:
Triton specializes them at compile time through ``tl.constexpr`` arguments.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from types import ModuleType

MASK_KINDS = ("none", "bool", "float")
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionVariant:
    """What an attention block does to its scores: one generated kernel per distinct value.

    ``scale`` multiplies q·kᵀ; ``softcap`` c caps the scaled scores, c·tanh(s/c);
    ``mask`` is the kind of mask tensor ("none", "bool": keep where True,
    "float": added); ``causal`` keeps key j ≤ query i (top-left aligned);
    ``window`` keeps key j > i - window (the window size is a run-time
    argument); ``alibi`` adds slope[head]·(j - i) (slopes are a run-time tensor).
    Order, as in ``fxfuse::attention``: softmax(cap(q·kᵀ·scale) + alibi + mask), then causal/window.
    """

    scale: float
    causal: bool = False
    softcap: float | None = None
    mask: str = "none"
    window: bool = False
    alibi: bool = False

    def __post_init__(self) -> None:
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {self.mask!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap must be a positive number, got {self.softcap}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))

    @property
    def log2_units(self) -> bool:
        """Scores kept in log2 units (log2(e) folded into the scale, exp2 in the softmax).

        Not with a float mask: HF fills masks with finfo.min, and finfo.min·log2(e)
        overflows float32 to -inf, turning a uniformly masked row (softmax: uniform)
        into a fully masked one (zeros). Those variants use natural units and exp.
        """
        return self.mask != "float"

    def describe(self) -> str:
        parts = [f"scale={self.scale!r}"]
        if self.causal:
            parts.append("causal")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap!r}")
        if self.mask != "none":
            parts.append(f"{self.mask} mask")
        if self.window:
            parts.append("sliding window")
        if self.alibi:
            parts.append("alibi")
        return ", ".join(parts)

    def flags(self) -> dict[str, bool]:
        return {
            "LOG2": self.log2_units, "CAUSAL": self.causal, "SOFTCAP": self.softcap is not None,
            "MASK": self.mask != "none", "MASK_BOOL": self.mask == "bool", "MASK_FLOAT": self.mask == "float",
            "WINDOW": self.window, "ALIBI": self.alibi,
        }


TEMPLATE = '''\
"""fxfuse attention forward kernel, generated from fxfuse/kernels/_template.py; do not edit.

Variant: $DESCRIPTION.
softmax(cap(q·kᵀ·scale) + alibi + mask) · v with an online softmax over key
blocks (FlashAttention-2), scores in $UNITS.
"""

import triton
import triton.language as tl


@triton.jit
def _attn_loop(
    acc, l_i, m_i, q, K_base, V_base, M_rows, slope, qi, row_ok,
    lo, hi, Sk, WINDOW,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    offs_d, offs_dv, D, DV,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Fold key blocks [lo, hi) into (acc, l_i, m_i); MASKED blocks check key bounds and positions."""
    if EVEN_D:  # constant-true masks fold away: plain loads
        d_ok = tl.full([offs_d.shape[0]], 1, tl.int1)
        dv_ok = tl.full([offs_dv.shape[0]], 1, tl.int1)
    else:
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n < Sk
        else:
            n_ok = tl.full([BLOCK_N], 1, tl.int1)  # every key of an unmasked block is in range
        kT = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST_DOT:  # Triton's CPU interpreter multiplies bfloat16 bit patterns as integers
            qk = tl.dot(q.to(tl.float32), kT.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kT, input_precision=INPUT_PRECISION)
#if SOFTCAP
        # c·tanh(s/c) as c·(2σ(2s/c) - 1): no tanh needed, exact at both tails
#if LOG2
        s = $SOFTCAP_LOG2 * (2.0 * tl.sigmoid(qk * $SOFTCAP_IN) - 1.0)
#else
        s = $SOFTCAP * (2.0 * tl.sigmoid(qk * $SOFTCAP_IN) - 1.0)
#endif
#else
#if LOG2
        s = qk * $QK_SCALE_LOG2
#else
        s = qk * $QK_SCALE
#endif
#endif
#if ALIBI
        s += slope[:, None] * (offs_n[None, :] - qi[:, None]).to(tl.float32)
#endif
#if MASK
        m_ok = row_ok[:, None] & n_ok[None, :]
#if MASK_FLOAT
        s += tl.load(M_rows[:, None] + offs_n[None, :] * stride_mn, mask=m_ok, other=0.0).to(tl.float32)
#else
        keep = tl.load(M_rows[:, None] + offs_n[None, :] * stride_mn, mask=m_ok, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
#endif
#endif
        if MASKED:
            valid = n_ok[None, :]
#if CAUSAL
            valid = valid & (offs_n[None, :] <= qi[:, None])
#endif
#if WINDOW
            valid = valid & (offs_n[None, :] > qi[:, None] - WINDOW)
#endif
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no key so far keeps m = -inf: subtract 0 there, so p = 0 and no NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
#if LOG2
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
#else
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
#endif
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def $NAME(
    Q, K, V, Out, Mask, Slopes, PartO, PartML,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    B, Hq, Hkv, Sq, Sk, D, DV, WINDOW,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, PACK_GQA: tl.constexpr, NUM_SPLITS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Grid (query blocks, batch × heads, splits). PACK_GQA: a program takes every query row
    of the heads that share one key/value head (decoding). NUM_SPLITS > 1: a program takes
    one slice of the keys and writes partial results for the split-KV reduction."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    group = Hq // Hkv
    offs_r = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        b = pid_bh // Hkv
        hkv = pid_bh % Hkv
        head = hkv * group + offs_r // Sq
        qi = offs_r % Sq
        row_ok = offs_r < group * Sq
        q_first = 0
        q_last = Sq - 1
    else:
        b = pid_bh // Hq
        h = pid_bh % Hq
        hkv = h // group  # grouped-query attention: query head h reads kv head h // group
        head = h + offs_r * 0
        qi = pid_m * BLOCK_M + offs_r
        row_ok = qi < Sq
        q_first = pid_m * BLOCK_M
        q_last = tl.minimum(Sq, q_first + BLOCK_M) - 1
    b64 = b.to(tl.int64)
    head64 = head.to(tl.int64)
    qi64 = qi.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = b64 * stride_qb + head64 * stride_qh + qi64 * stride_qm
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    K_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    V_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
#if MASK
    M_rows = Mask + b64 * stride_mb + head64 * stride_mh + qi64 * stride_mm
#else
    M_rows = Mask
#endif
#if ALIBI
#if LOG2
    slope = tl.load(Slopes + head, mask=row_ok, other=0.0).to(tl.float32) * $LOG2E
#else
    slope = tl.load(Slopes + head, mask=row_ok, other=0.0).to(tl.float32)
#endif
#else
    slope = 0.0
#endif
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo = 0
#if CAUSAL
    hi = tl.minimum(Sk, q_last + 1)
#else
    hi = Sk
#endif
#if WINDOW
    lo = tl.maximum(0, q_first - WINDOW + 1) // BLOCK_N * BLOCK_N
#endif
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
        s_lo = lo + pid_s * per_split
        s_hi = tl.minimum(hi, s_lo + per_split)
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, K_base, V_base, M_rows, slope, qi, row_ok, s_lo, s_hi, Sk, WINDOW,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_d, offs_dv, D, DV,
            BLOCK_N, True, EVEN_D, INPUT_PRECISION, UPCAST_DOT)
        part = ((pid_s * B + b64) * Hq + head64) * Sq + qi64
        tl.store(PartO + part[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=row_ok[:, None])
        tl.store(PartML + part * 2, m_i, mask=row_ok)
        tl.store(PartML + part * 2 + 1, l_i, mask=row_ok)
    else:
        # Keys [safe_lo, safe_hi) are in range and allowed for every row of the block:
        # no position mask there; the blocks before and after are masked.
#if CAUSAL
        safe_hi = tl.minimum(Sk, q_first + 1) // BLOCK_N * BLOCK_N
#else
        safe_hi = Sk // BLOCK_N * BLOCK_N
#endif
#if WINDOW
        safe_lo = tl.minimum(tl.cdiv(tl.maximum(lo, q_last - WINDOW + 1), BLOCK_N) * BLOCK_N, hi)
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, K_base, V_base, M_rows, slope, qi, row_ok, lo, safe_lo, Sk, WINDOW,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_d, offs_dv, D, DV,
            BLOCK_N, True, EVEN_D, INPUT_PRECISION, UPCAST_DOT)
#else
        safe_lo = lo
#endif
        mid = tl.maximum(safe_lo, tl.minimum(safe_hi, hi))
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, K_base, V_base, M_rows, slope, qi, row_ok, safe_lo, mid, Sk, WINDOW,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_d, offs_dv, D, DV,
            BLOCK_N, False, EVEN_D, INPUT_PRECISION, UPCAST_DOT)
        acc, l_i, m_i = _attn_loop(
            acc, l_i, m_i, q, K_base, V_base, M_rows, slope, qi, row_ok, mid, hi, Sk, WINDOW,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, offs_d, offs_dv, D, DV,
            BLOCK_N, True, EVEN_D, INPUT_PRECISION, UPCAST_DOT)
        # a row that no key reaches (every score -inf) has l = 0 and acc = 0: its output is 0
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = b64 * stride_ob + head64 * stride_oh + qi64 * stride_om
        tl.store(Out + o_rows[:, None] + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))
'''


def _preprocess(text: str, flags: dict[str, bool]) -> str:
    """Keep the lines whose enclosing ``#if FLAG`` / ``#else`` / ``#endif`` blocks hold; drop the directives."""
    out: list[str] = []
    stack: list[bool] = []  # whether each open block's current branch is taken
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("#if "):
            stack.append(flags[stripped[4:].strip()])
        elif stripped == "#else":
            stack[-1] = not stack[-1]
        elif stripped == "#endif":
            stack.pop()
        elif all(stack):
            out.append(line)
    if stack:
        raise ValueError("unbalanced #if/#endif in the attention template")
    return "".join(out)


def kernel_name(variant: AttentionVariant) -> str:
    """A readable, unique name: the features, then a hash of the whole variant (the scale, the cap)."""
    parts = ["fxfuse_attn"]
    if variant.causal:
        parts.append("causal")
    if variant.mask != "none":
        parts.append(f"{variant.mask}mask")
    if variant.softcap is not None:
        parts.append("softcap")
    if variant.window:
        parts.append("window")
    if variant.alibi:
        parts.append("alibi")
    digest = hashlib.sha1(repr(variant).encode()).hexdigest()[:8]
    return "_".join(parts + [digest])


def render(variant: AttentionVariant) -> str:
    """The kernel source for ``variant``: the template with its flags applied and its constants filled in."""
    text = _preprocess(TEMPLATE, variant.flags())
    cap = variant.softcap
    fields = {
        "NAME": kernel_name(variant),
        "DESCRIPTION": variant.describe(),
        "QK_SCALE": repr(variant.scale),
        "QK_SCALE_LOG2": repr(variant.scale * LOG2E),
        "LOG2E": repr(LOG2E),
        "UNITS": "log2 units (exp2)" if variant.log2_units else "natural units (exp): a float mask may hold finfo.min",
        "SOFTCAP": repr(cap) if cap is not None else "None",
        "SOFTCAP_LOG2": repr(cap * LOG2E) if cap is not None else "None",
        "SOFTCAP_IN": repr(2.0 * variant.scale / cap) if cap is not None else "None",
    }
    return Template(text).substitute(fields)


@dataclass
class GeneratedKernel:
    """One compiled variant: its source, the file it was imported from and the jit kernel."""

    variant: AttentionVariant
    name: str
    source: str
    path: Path
    module: ModuleType = field(repr=False)

    @property
    def kernel(self):
        return getattr(self.module, self.name)


_LOCK = threading.Lock()
_COMPILED: dict[AttentionVariant, GeneratedKernel] = {}
_SOURCE_DIR: Path | None = None


def source_dir() -> Path:
    """Where generated sources are written (a per-user folder under the system temp dir by default)."""
    if _SOURCE_DIR is not None:
        return _SOURCE_DIR
    user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"fxfuse-kernels-{user}"


def set_source_dir(path: str | os.PathLike | None) -> None:
    """Write generated kernel sources to ``path`` from now on (None: back to the default)."""
    global _SOURCE_DIR
    _SOURCE_DIR = None if path is None else Path(path)


def _write(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: another process importing the same variant sees a whole file


def compile_variant(variant: AttentionVariant) -> GeneratedKernel:
    """The kernel for ``variant``: rendered, written and imported on first use, then cached."""
    with _LOCK:
        hit = _COMPILED.get(variant)
        if hit is not None:
            return hit
        source = render(variant)
        name = kernel_name(variant)
        digest = hashlib.sha1(source.encode()).hexdigest()[:12]
        path = source_dir() / f"{name}_{digest}.py"
        _write(path, source)
        module_name = f"fxfuse_generated.{name}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        generated = GeneratedKernel(variant, name, source, path, module)
        _COMPILED[variant] = generated
        return generated


def compiled_variants() -> list[GeneratedKernel]:
    """Every variant compiled in this process so far."""
    with _LOCK:
        return list(_COMPILED.values())
