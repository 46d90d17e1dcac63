"""Elementwise activations: the gated MLP product ``act(gate) * up`` and GELU.

``gated_mlp_act(gate, up, act)`` (act: "silu", "gelu", "gelu_tanh") and
``gelu(x, approximate)`` ("none", "tanh", "sigmoid") follow
``fxfuse::gated_mlp_act`` and ``fxfuse::gelu``. Both are memory bound: one
read of each input, one write, everything in float32 registers. The tanh
GELU is written as x·σ(2z) (= ½x(1 + tanh z)), which needs no tanh and does
not cancel for large |x|.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxfuse.kernels._config import bucket, check_device, check_float, forward_only, tuned

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "gelu_sigmoid": 3}
GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh", "sigmoid": "gelu_sigmoid"}



def _configs():
    # 1-D tiles of BLOCK elements: 4K elements × 4 warps gives each thread 32
    # values (16-byte vector loads of bf16 with room for latency hiding); the
    # larger tiles amortize the program prologue on big tensors. The first
    # config is the interpreter's.
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in
            ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16))]


@triton.jit
def _act(x, ACT: tl.constexpr):
    """The activation in float32."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
    else:
        y = x * tl.sigmoid(1.702 * x)
    return y


@tuned(_configs(), key=["N_BUCKET"])
@triton.jit
def _gated_act_fwd_kernel(
    G, U, Y, M, N,
    stride_g, stride_u,  # row strides of the (M, N) input views; 0 broadcasts a row
    N_BUCKET,  # autotune key only
    ACT: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
):
    # A program covers BLOCK consecutive elements of the (M, N) output, so short
    # rows do not waste lanes. Same-shape contiguous inputs (the usual case) are
    # read flat; a broadcast input (row stride 0, say) needs the row index, an
    # integer division per element that the flat path avoids.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M * N
    if FLAT:
        g_off = idx
        u_off = idx
    else:
        row = idx // N
        col = idx % N
        g_off = row * stride_g + col
        u_off = row * stride_u + col
    g = tl.load(G + g_off, mask=ok, other=0.0)
    u = tl.load(U + u_off, mask=ok, other=0.0)
    # act(gate) is rounded to gate's dtype before the product, as in torch's two-op reference.
    a = _act(g.to(tl.float32), ACT).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + idx, (a * u.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)


@tuned(_configs(), key=["N_BUCKET"])
@triton.jit
def _gelu_fwd_kernel(X, Y, numel, N_BUCKET, ACT: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    x = tl.load(X + idx, mask=ok, other=0.0)
    tl.store(Y + idx, _act(x.to(tl.float32), ACT).to(Y.dtype.element_ty), mask=ok)


def _row_view(t: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """(tensor, row stride) reading ``t`` broadcast to ``shape`` as (rows, N) rows; copies only if it must."""
    n = shape[-1]
    e = t.expand(shape)
    if e.dim() == 1:
        return e, 0
    lead = [(size, stride) for size, stride in zip(e.shape[:-1], e.stride()[:-1]) if size != 1]
    if (e.stride(-1) == 1 or n == 1) and lead:
        # collapsible into one row stride: each dim's stride is the next one's stride × size
        strides = [s for _, s in lead]
        if all(strides[i] == strides[i + 1] * lead[i + 1][0] for i in range(len(lead) - 1)):
            return e, strides[-1]
    if (e.stride(-1) == 1 or n == 1) and not lead:
        return e, 0
    c = e.contiguous()
    return c, n


def _launch_gated(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    check_float("gated_mlp_act", gate, up)
    check_device("gated_mlp_act", gate, up)
    if act not in ("silu", "gelu", "gelu_tanh"):
        raise ValueError(f"fxfuse.kernels.gated_mlp_act: act must be silu, gelu or gelu_tanh, got {act!r}")
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    if len(shape) == 0:
        shape = torch.Size([1])
        gate, up = gate.reshape(1), up.reshape(1)
    out = torch.empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = shape[-1]
    m = out.numel() // n if n else 0
    if out.numel():
        g, sg = _row_view(gate, shape)
        u, su = _row_view(up, shape)
        grid = lambda meta: (triton.cdiv(m * n, meta["BLOCK"]),)  # noqa: E731
        _gated_act_fwd_kernel[grid](g, u, out, m, n, sg, su, bucket(m * n, 1 << 24), ACT=ACTIVATIONS[act],
                                    FLAT=(sg == n or m == 1) and (su == n or m == 1))
    return out


def _launch_gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    check_float("gelu", x)
    check_device("gelu", x)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"fxfuse.kernels.gelu: approximate must be one of {tuple(GELU_APPROXIMATIONS)}, "
                         f"got {approximate!r}")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    if xc.numel():
        grid = lambda meta: (triton.cdiv(xc.numel(), meta["BLOCK"]),)  # noqa: E731
        _gelu_fwd_kernel[grid](xc, out, xc.numel(), bucket(xc.numel(), 1 << 24),
                               ACT=ACTIVATIONS[GELU_APPROXIMATIONS[approximate]])
    return out


def gated_mlp_act(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate) * up`` (broadcasting), act one of "silu", "gelu" (erf), "gelu_tanh"; as ``fxfuse::gated_mlp_act``."""
    return forward_only("gated_mlp_act", _launch_gated, gate, up, act)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of ``x``: "none" (erf), "tanh" or "sigmoid" (quick GELU); as ``fxfuse::gelu``."""
    return forward_only("gelu", _launch_gelu, x, approximate)
