"""fxfuse.kernels.attention against float64 references and the dialect op, on odd shapes and every dtype."""

from __future__ import annotations

import math

import pytest
import torch

import fxfuse  # noqa: F401  (registers torch.ops.fxfuse)
from fxfuse.kernels import alibi_slopes, attention
from tests.kernels.refs import DEVICE, DTYPES, ON_GPU, TOL, assert_close, rand, ref_attention

ops = torch.ops.fxfuse


def qkv(B, Hq, Hkv, Sq, Sk, D, Dv=None, dtype=torch.float32, seed=0):
    Dv = D if Dv is None else Dv
    return (rand(B, Hq, Sq, D, seed=seed, dtype=dtype), rand(B, Hkv, Sk, D, seed=seed + 1, dtype=dtype),
            rand(B, Hkv, Sk, Dv, seed=seed + 2, dtype=dtype))


# (B, Hq, Hkv, Sq, Sk, D, Dv): odd lengths crossing 16-row blocks, Sq ≠ Sk both ways,
# head dims that are not powers of two (80, 96, 24 with Dv 20) and below the 16 of a dot.
SHAPES = [
    (2, 4, 2, 19, 19, 32, 32),
    (1, 3, 3, 37, 21, 80, 80),
    (2, 6, 2, 17, 40, 96, 96),
    (1, 2, 1, 9, 33, 24, 20),
    (1, 2, 2, 5, 7, 5, 5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(shape, dtype, causal):
    B, Hq, Hkv, Sq, Sk, D, Dv = shape
    q, k, v = qkv(B, Hq, Hkv, Sq, Sk, D, Dv, dtype=dtype)
    out = attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert out.shape == (B, Hq, Sq, Dv) and out.dtype == dtype
    assert_close(out, ref_attention(q, k, v, causal=causal))
    assert_close(out, ops.attention(q, k, v, None, None, causal))


@pytest.mark.parametrize("D", [32, 64, 128, 256])
def test_head_dims_up_to_256(D):
    q, k, v = qkv(1, 2, 1, 5, 18, D, dtype=torch.bfloat16, seed=3)
    assert_close(attention(q, k, v, enable_gqa=True, is_causal=True), ref_attention(q, k, v, causal=True))


MASK_SHAPES = {"B11K": (2, 1, 1, 23), "B1QK": (2, 1, 18, 23), "1HQK": (1, 4, 18, 23), "QK": (18, 23),
               "BHQK": (2, 4, 18, 23)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mshape", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_masks_broadcast(mshape, kind, dtype):
    q, k, v = qkv(2, 4, 2, 18, 23, 16, dtype=dtype, seed=5)
    shape = MASK_SHAPES[mshape]
    if kind == "float":
        mask = rand(*shape, seed=6, scale=2.0, dtype=dtype)
        mask[..., 3] = float("-inf")
    else:
        g = torch.Generator().manual_seed(7)
        mask = (torch.rand(*shape, generator=g) > 0.4).to(DEVICE)
        mask[..., 0] = True
    out = attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(out, ref_attention(q, k, v, mask))
    assert_close(out, ops.attention(q, k, v, mask))


def test_mask_is_read_through_zero_strides():
    """A (1, H, Sq, Sk) bias broadcast over the batch is not copied: same result as the expanded copy."""
    q, k, v = qkv(3, 2, 2, 6, 9, 16, seed=8)
    bias = rand(1, 2, 6, 9, seed=9)
    expanded = bias.expand(3, 2, 6, 9).contiguous()
    torch.testing.assert_close(attention(q, k, v, attn_mask=bias), attention(q, k, v, attn_mask=expanded))


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_causal_with_mask(kind):
    q, k, v = qkv(2, 4, 2, 20, 26, 16, seed=10)
    if kind == "float":
        mask = rand(2, 1, 1, 26, seed=11)
    else:
        mask = torch.ones(2, 1, 1, 26, dtype=torch.bool, device=DEVICE)
        mask[1, ..., :3] = False  # left padding
        mask[1, ..., 0] = False
    out = attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    assert_close(out, ref_attention(q, k, v, mask, causal=True))
    assert_close(out, ops.attention(q, k, v, mask, None, True))


def test_fully_masked_rows_give_zeros():
    q, k, v = qkv(1, 2, 2, 20, 20, 16, seed=12)
    keep = torch.ones(1, 1, 20, 20, dtype=torch.bool, device=DEVICE)
    keep[..., 4, :] = False
    keep[..., 17, :] = False
    out = attention(q, k, v, attn_mask=keep)
    assert not out.isnan().any()
    assert (out[:, :, [4, 17]] == 0).all()
    assert_close(out, ref_attention(q, k, v, keep))
    fmask = torch.zeros(1, 1, 20, 20, device=DEVICE).masked_fill(~keep, float("-inf"))
    assert_close(attention(q, k, v, attn_mask=fmask), ops.attention(q, k, v, fmask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_finfo_min_mask_rows_stay_uniform(dtype):
    """HF fills masks with finfo.min: a row masked everywhere that way is uniform (softmax), not zero."""
    q, k, v = qkv(1, 2, 2, 6, 20, 16, dtype=dtype, seed=13)
    mask = torch.zeros(1, 1, 6, 20, dtype=dtype, device=DEVICE)
    mask[..., 2, :] = torch.finfo(dtype).min
    mask[..., 4, 5:] = torch.finfo(dtype).min
    out = attention(q, k, v, attn_mask=mask)
    assert_close(out, ops.attention(q, k, v, mask))
    assert_close(out[:, :, 2], v.float().mean(2).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(dtype, causal):
    q, k, v = qkv(2, 4, 2, 17, 21, 16, dtype=dtype, seed=14)
    q = q * 4
    mask = rand(2, 1, 17, 21, seed=15, dtype=dtype)
    out = attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.5, softcap=3.0, enable_gqa=True)
    assert_close(out, ref_attention(q, k, v, mask, 0.5, causal, softcap=3.0))
    assert_close(out, ops.attention(q, k, v, mask, 0.5, causal, 3.0))


@pytest.mark.parametrize("window", [1, 5, 16, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window(window, causal):
    q, k, v = qkv(1, 4, 2, 35, 35, 16, seed=16)
    out = attention(q, k, v, is_causal=causal, window=window, enable_gqa=True)
    assert_close(out, ref_attention(q, k, v, causal=causal, window=window))


@pytest.mark.parametrize("heads", [4, 6])
def test_alibi(heads):
    q, k, v = qkv(2, heads, heads, 18, 18, 16, seed=17)
    slopes = alibi_slopes(heads, DEVICE)
    out = attention(q, k, v, is_causal=True, alibi_slopes=slopes)
    assert_close(out, ref_attention(q, k, v, causal=True, slopes=slopes))
    # ALiBi as an explicit additive bias through the dialect op
    j = torch.arange(18, device=DEVICE)
    bias = slopes[:, None, None] * (j[None, :] - j[:, None])[None].float()
    assert_close(out, ops.attention(q, k, v, bias[None], None, True))


def test_alibi_slopes_values():
    s = alibi_slopes(8)
    torch.testing.assert_close(s, torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    assert alibi_slopes(6).shape == (6,) and (alibi_slopes(6) > 0).all()


# decoding: one query row (or a few), long keys, grouped heads; split-KV with a reduction
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Sq,splits", [(1, 1), (1, 3), (1, None), (3, 2)])
def test_decode_split_kv(dtype, Sq, splits):
    q, k, v = qkv(2, 8, 2, Sq, 77, 32, dtype=dtype, seed=18)
    mask = torch.zeros(2, 1, Sq, 77, dtype=dtype, device=DEVICE)
    mask[0, ..., 70:] = float("-inf")  # padding of the shorter sequence
    out = attention(q, k, v, attn_mask=mask, enable_gqa=True, num_splits=splits)
    assert_close(out, ref_attention(q, k, v, mask))
    assert_close(out, ops.attention(q, k, v, mask))


@pytest.mark.parametrize("variant", ["causal", "bool_fully_masked", "softcap_window"])
def test_decode_split_kv_variants(variant):
    q, k, v = qkv(1, 4, 1, 2, 50, 16, seed=19)
    kw, ref = {}, {}
    if variant == "causal":
        kw, ref = {"is_causal": True}, {"causal": True}
    elif variant == "bool_fully_masked":
        keep = torch.ones(1, 1, 2, 50, dtype=torch.bool, device=DEVICE)
        keep[..., 1, :] = False
        kw, ref = {"attn_mask": keep}, {"mask": keep}
    else:
        kw, ref = {"softcap": 2.0, "window": 7}, {"softcap": 2.0, "window": 7}
    out = attention(q, k, v, enable_gqa=True, num_splits=4, **kw)
    assert not out.isnan().any()
    assert_close(out, ref_attention(q, k, v, **ref))


def test_gqa_head_mapping_is_h_div_group():
    q, k, v = qkv(1, 6, 2, 4, 9, 16, seed=20)
    out = attention(q, k, v, enable_gqa=True)
    wrong = ref_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1))
    assert not torch.allclose(out, wrong, atol=1e-3)
    assert_close(out, ref_attention(q, k, v))


def test_non_contiguous_inputs():
    """(B, S, H, D) projections viewed as (B, H, S, D), as attention layers produce them."""
    B, S, H, D = 2, 13, 4, 16
    q = rand(B, S, H, D, seed=21).transpose(1, 2)
    k = rand(B, S, H, D, seed=22).transpose(1, 2)
    v = rand(B, S, H, D, seed=23).transpose(1, 2)
    assert_close(attention(q, k, v, is_causal=True), ref_attention(q, k, v, causal=True))


def test_output_layout_makes_the_merge_of_heads_free():
    q, k, v = qkv(2, 4, 4, 6, 6, 16)
    out = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


def test_scale_default_and_explicit():
    q, k, v = qkv(1, 2, 2, 5, 8, 16, seed=24)
    assert_close(attention(q, k, v), ref_attention(q, k, v, scale=1 / math.sqrt(16)))
    assert_close(attention(q, k, v, scale=0.3), ref_attention(q, k, v, scale=0.3))


def test_empty_and_keyless():
    q, k, v = qkv(1, 2, 2, 0, 5, 16)
    assert attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = qkv(1, 2, 2, 3, 0, 16)
    assert (attention(q, k, v) == 0).all()


def test_errors():
    q, k, v = qkv(1, 4, 2, 3, 3, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="head dim"):
        attention(*qkv(1, 2, 2, 3, 3, 264))
    with pytest.raises(ValueError, match="dtype"):
        attention(*(t.double() for t in qkv(1, 2, 2, 3, 3, 16)))
    with pytest.raises(ValueError, match="window"):
        attention(*qkv(1, 2, 2, 3, 3, 16), window=0)


def test_backward_raises_clearly():
    q, k, v = qkv(1, 2, 2, 4, 4, 16)
    q.requires_grad_(True)
    out = attention(q, k, v)
    assert_close(out.detach(), ref_attention(q.detach(), k, v))
    with pytest.raises(NotImplementedError, match="forward pass only"):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_large(dtype, D, causal):
    q, k, v = qkv(2, 16, 4, 1031, 1031, D, dtype=dtype, seed=25)
    out = attention(q, k, v, is_causal=causal, enable_gqa=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True).to(dtype)
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_decode_long_cache():
    q, k, v = qkv(4, 32, 8, 1, 8191, 128, dtype=torch.bfloat16, seed=26)
    out = attention(q, k, v, enable_gqa=True)
    expected = ref_attention(q, k, v)
    torch.testing.assert_close(out.float(), expected.float(), **TOL[torch.bfloat16])
