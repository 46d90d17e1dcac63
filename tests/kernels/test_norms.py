"""rms_norm / layer_norm kernels (with and without the fused residual) against references and the dialect ops."""

from __future__ import annotations

import pytest
import torch

import fxfuse  # noqa: F401
from fxfuse.kernels import layer_norm, rms_norm
from tests.kernels.refs import DEVICE, DTYPES, ON_GPU, assert_close, rand

ops = torch.ops.fxfuse
SHAPES = [(7,), (3, 5), (2, 3, 37), (5, 130), (1, 2, 1000)]


def ref_rms(x, w, eps):
    xd = x.double()
    y = (xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else (w.double() * y.double()).to(torch.promote_types(w.dtype, x.dtype))


def ref_ln(x, w, b, eps):
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    y = (xd - mean) / torch.sqrt(((xd - mean) ** 2).mean(-1, keepdim=True) + eps)
    y = y * (1 if w is None else w.double()) + (0 if b is None else b.double())
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_weight", [False, True])
def test_rms_norm(shape, dtype, with_weight):
    x = rand(*shape, seed=1, dtype=dtype, scale=2.0)
    w = rand(shape[-1], seed=2, dtype=dtype) if with_weight else None
    out = rms_norm(x, w, 1e-6)
    assert_close(out, ref_rms(x, w, 1e-6))
    assert_close(out, ops.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=str)
def test_add_rms_norm_returns_normed_and_sum(shape, dtype):
    x = rand(*shape, seed=3, dtype=dtype)
    r = rand(*shape, seed=4, dtype=dtype, scale=3.0)
    w = rand(shape[-1], seed=5, dtype=dtype)
    normed, s = rms_norm(x, w, 1e-5, residual=r)
    ref_normed, ref_s = ops.add_rms_norm(x, r, w, 1e-5)
    assert_close(s, ref_s)
    assert_close(normed, ref_normed)
    assert_close(normed, ref_rms(ref_s, w, 1e-5))


def test_rms_norm_weight_promotion_and_no_half_overflow():
    x = (rand(4, 9, seed=6).abs() + 1).to(torch.float16) * 1000  # x² overflows float16
    w = rand(9, seed=7)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ops.rms_norm(x, w, 1e-6), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_layer_norm(shape, dtype, affine):
    x = rand(*shape, seed=8, dtype=dtype, scale=3.0) + 2
    w = rand(shape[-1], seed=9, dtype=dtype) if affine != "none" else None
    b = rand(shape[-1], seed=10, dtype=dtype) if affine == "both" else None
    out = layer_norm(x, w, b, 1e-5)
    assert_close(out, ref_ln(x, w, b, 1e-5))
    assert_close(out, ops.layer_norm(x, w, b, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm(dtype):
    x, r = rand(3, 7, 50, seed=11, dtype=dtype), rand(3, 7, 50, seed=12, dtype=dtype)
    w, b = rand(50, seed=13, dtype=dtype), rand(50, seed=14, dtype=dtype)
    normed, s = layer_norm(x, w, b, 1e-5, residual=r)
    ref_normed, ref_s = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert_close(s, ref_s)
    assert_close(normed, ref_normed)


def test_non_contiguous_rows():
    x = rand(6, 40, seed=15).t().contiguous().t()[:, :33]  # strided rows
    assert_close(rms_norm(x, None, 1e-6), ref_rms(x, None, 1e-6))
    assert_close(layer_norm(x, None, None, 1e-6), ref_ln(x, None, None, 1e-6))


def test_empty_and_errors():
    assert rms_norm(torch.empty(0, 8, device=DEVICE), None, 1e-6).shape == (0, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(rand(2, 8), rand(4), 1e-6)
    with pytest.raises(TypeError, match="float64"):
        layer_norm(rand(2, 8, dtype=torch.float64), None, None, 1e-5)
    # rows longer than 32K elements spill registers on A100/H100 (gpu-readiness.md): refused before launch
    with pytest.raises(ValueError, match=r"row length 32769 \(1\.\.32768 supported\)"):
        rms_norm(torch.empty(1, 32769, device=DEVICE), None, 1e-6)


def test_backward_raises_clearly():
    x = rand(2, 8).requires_grad_(True)
    out, _ = rms_norm(x, None, 1e-6, residual=rand(2, 8))
    with pytest.raises(NotImplementedError, match="rms_norm has a forward pass only"):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [2048, 4096, 8191])
def test_gpu_llama_rows(n):
    x, r, w = rand(4096, n, dtype=torch.bfloat16), rand(4096, n, seed=1, dtype=torch.bfloat16), rand(n, seed=2)
    normed, s = rms_norm(x, w.bfloat16(), 1e-6, residual=r)
    ref_normed, ref_s = ops.add_rms_norm(x, r, w.bfloat16(), 1e-6)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)  # rounded to nearest once, as torch
    assert_close(normed, ref_normed)
