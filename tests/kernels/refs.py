"""float64 references for the kernel and dialect tests, written from the dialect docstrings, and tolerances."""

from __future__ import annotations

import math

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Kernel result vs a float64 reference cast to the result dtype: fp32 sums in another
# order (~1e-6 relative; 1e-4 leaves room for exp/rsqrt approximations on a GPU), one or
# two roundings of half precision. Under the CPU interpreter a bfloat16 cast truncates
# instead of rounding to nearest, one more ulp (2^-8 relative) that 3e-2 covers.
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def ref_attention(q, k, v, mask=None, scale=None, causal=False, softcap=None, window=None, slopes=None):
    """softmax(cap(q·kᵀ·scale) + alibi + mask) · v in float64, rows with no key → 0."""
    Hq, Hkv = q.shape[1], k.shape[1]
    Sq, Sk = q.shape[2], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    vv = v.double().repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    if slopes is not None:
        s = s + slopes.double()[None, :, None, None] * (j - i).double()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    if window is not None:
        s = s.masked_fill(j <= i - window, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = p.masked_fill(torch.isneginf(s).all(-1, keepdim=True), 0.0)
    return (p @ vv).to(q.dtype)


def assert_close(actual, expected, dtype=None):
    dtype = dtype or expected.dtype
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def ref_rotate(x, cos, sin, interleaved):
    """x' = x*cos + rot(x)*sin on the first R dims; the rest pass through."""
    R = cos.shape[-1]
    xd = x.double()
    xr = xd[..., :R]
    rot = torch.empty_like(xr)
    if interleaved:
        rot[..., 0::2] = -xr[..., 1::2]
        rot[..., 1::2] = xr[..., 0::2]
    else:
        h = R // 2
        rot[..., :h] = -xr[..., h:]
        rot[..., h:] = xr[..., :h]
    out = xr * cos.double() + rot * sin.double()
    out = torch.cat([out, xd[..., R:].expand(*out.shape[:-1], -1)], dim=-1)
    return out.to(torch.promote_types(x.dtype, cos.dtype))
