"""rope kernel: q and k in one launch, any layout, partial and interleaved rotary, in place."""

from __future__ import annotations

import pytest
import torch

import fxfuse  # noqa: F401
from fxfuse.kernels import rope
from tests.kernels.refs import DTYPES, ON_GPU, assert_close, rand, ref_rotate

ops = torch.ops.fxfuse


def cos_sin(*shape, seed=0, dtype=torch.float32):
    angle = rand(*shape, seed=seed, dtype=torch.float64) * 3
    return angle.cos().to(dtype), angle.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", ["full", "partial"])
def test_bhsd_gqa(dtype, interleaved, rot):
    B, Hq, Hkv, S, D = 2, 6, 2, 11, 20
    R = D if rot == "full" else 12
    q, k = rand(B, Hq, S, D, seed=1, dtype=dtype), rand(B, Hkv, S, D, seed=2, dtype=dtype)
    cos, sin = cos_sin(B, 1, S, R, seed=3, dtype=dtype)
    q2, k2 = rope(q, k, cos, sin, interleaved)
    assert_close(q2, ref_rotate(q, cos, sin, interleaved))
    assert_close(k2, ref_rotate(k, cos, sin, interleaved))
    rq, rk = ops.rope(q, k, cos, sin, interleaved)
    assert_close(q2, rq)
    assert_close(k2, rk)


def test_bshd_layout_and_float32_tables():
    """GPT-J's (B, S, H, D) layout, cos/sin (B, S, 1, R) in float32 on bfloat16 q/k: result in float32."""
    q, k = rand(2, 9, 4, 16, seed=4, dtype=torch.bfloat16), rand(2, 9, 4, 16, seed=5, dtype=torch.bfloat16)
    cos, sin = cos_sin(2, 9, 1, 16, seed=6)
    q2, k2 = rope(q, k, cos, sin, True)
    assert q2.dtype == torch.float32
    rq, rk = ops.rope(q, k, cos, sin, True)
    assert_close(q2, rq)
    assert_close(k2, rk)


def test_non_contiguous_q_from_a_projection():
    x = rand(2, 7, 4 * 16, seed=7)
    q = x.view(2, 7, 4, 16).transpose(1, 2)  # (B, H, S, D) view of (B, S, H·D)
    k = rand(2, 4, 7, 16, seed=8)
    cos, sin = cos_sin(7, 16, seed=9)
    q2, k2 = rope(q, k, cos, sin)
    rq, rk = ops.rope(q, k, cos, sin)
    assert_close(q2, rq)
    assert_close(k2, rk)


@pytest.mark.parametrize("rot", [16, 8])
def test_inplace(rot):
    q, k = rand(1, 4, 5, 16, seed=10), rand(1, 2, 5, 16, seed=11)
    cos, sin = cos_sin(1, 1, 5, rot, seed=12)
    rq, rk = ops.rope(q, k, cos, sin)
    q_ptr = q.data_ptr()
    q2, k2 = rope(q, k, cos, sin, inplace=True)
    assert q2.data_ptr() == q_ptr
    assert_close(q, rq)
    assert_close(k, rk)


def test_inplace_needs_matching_shape_and_dtype():
    q, k = rand(1, 2, 5, 8, dtype=torch.float16), rand(1, 2, 5, 8, dtype=torch.float16)
    cos, sin = cos_sin(1, 1, 5, 8)  # float32 tables: float32 results
    with pytest.raises(ValueError, match="inplace"):
        rope(q, k, cos, sin, inplace=True)


def test_errors_and_backward():
    q = rand(1, 2, 3, 8)
    with pytest.raises(ValueError, match="rotary dim"):
        rope(q, q.clone(), *cos_sin(3, 5))
    out, _ = rope(q.clone().requires_grad_(True), q.clone(), *cos_sin(3, 8))
    with pytest.raises(NotImplementedError, match="rope has a forward pass only"):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_llama_shapes():
    q, k = rand(4, 32, 2048, 128, dtype=torch.bfloat16), rand(4, 8, 2048, 128, seed=1, dtype=torch.bfloat16)
    cos, sin = cos_sin(4, 1, 2048, 128, seed=2, dtype=torch.bfloat16)
    q2, k2 = rope(q, k, cos, sin)
    rq, rk = ops.rope(q, k, cos, sin)
    assert_close(q2, rq)
    assert_close(k2, rk)
