"""fxfuse.kernels.latent_attention against a float64 reference and the dialect op, on small odd shapes.

Under the interpreter (no GPU) the kernel runs with 16-row and 16-key blocks,
so these shapes cross several row blocks (query rows × heads of a group) and
key blocks; the whole file takes about half a minute on 2 cores.
"""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch
import triton

from fxfuse.kernels.latent_attention import latent_attention, prune, prune_reason
from tests.kernels.refs import DEVICE, DTYPES, ON_GPU, TOL, assert_close, rand

ops = torch.ops.fxfuse
kmod = importlib.import_module("fxfuse.kernels.latent_attention")  # the package's name is the function


def inputs(B, H, G, Sq, Sk, R, Dr, dtype=torch.float32, seed=0):
    return (rand(B, H, Sq, R, seed=seed, dtype=dtype), rand(B, H, Sq, Dr, seed=seed + 1, dtype=dtype),
            rand(B, G, Sk, R, seed=seed + 2, dtype=dtype), rand(B, G, Sk, Dr, seed=seed + 3, dtype=dtype))


def ref_latent(q_latent, q_rope, latent, k_rope, mask=None, scale=None, causal=False):
    """The docstring's formula in float64 with the latent repeated per head; rows with no key → 0."""
    H, G = q_latent.shape[1], latent.shape[1]
    Sq, Sk = q_latent.shape[2], latent.shape[2]
    scale = 1.0 / math.sqrt(q_latent.shape[-1] + q_rope.shape[-1]) if scale is None else scale
    lat = latent.double().repeat_interleave(H // G, 1)
    kr = k_rope.double().repeat_interleave(H // G, 1)
    s = (q_latent.double() @ lat.transpose(-1, -2) + q_rope.double() @ kr.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ lat).to(q_latent.dtype)


# (B, H, G, Sq, Sk, R, Dr): packed rows (Sq · H/G) crossing 16-row blocks with a head boundary inside a
# block, G = 1 and G = 2, Sq ≠ Sk both ways, R and Dr not powers of two, Dr = 0.
SHAPES = [
    (2, 4, 2, 5, 19, 24, 8),
    (1, 3, 1, 7, 23, 32, 16),
    (1, 2, 2, 19, 17, 16, 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(shape, dtype, causal):
    B, H, G, Sq, Sk, R, Dr = shape
    args = inputs(*shape, dtype=dtype)
    out = latent_attention(*args, is_causal=causal)
    assert out.shape == (B, H, Sq, R) and out.dtype == dtype
    assert_close(out, ref_latent(*args, causal=causal))
    expected = ops.latent_attention(*args, None, None, causal)
    assert_close(out, expected)
    assert out.stride() == expected.stride()  # (B, Sq, H, R) in memory, as the dialect op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_one_query_long_cache(dtype, G, splits):
    """A decoding step: one query row, 150 cached tokens, the second sequence padded; split-KV and not."""
    args = inputs(2, 4, G, 1, 150, 32, 16, dtype=dtype, seed=4)
    mask = torch.zeros(2, 1, 1, 150, dtype=dtype, device=DEVICE)
    mask[1, ..., 130:] = float("-inf")
    out = latent_attention(*args, attn_mask=mask, num_splits=splits)
    assert_close(out, ref_latent(*args, mask))
    assert_close(out, ops.latent_attention(*args, mask))


def test_split_kv_with_causal_rows_and_a_bool_mask():
    """Causal rows reach keys 0-2 only, so two of the three splits are empty; a row the mask empties gives 0."""
    args = inputs(1, 4, 2, 3, 50, 16, 8, seed=14)
    keep = torch.ones(1, 1, 3, 50, dtype=torch.bool, device=DEVICE)
    keep[..., 2, :] = False
    out = latent_attention(*args, attn_mask=keep, is_causal=True, num_splits=3)
    assert (out[:, :, 2] == 0).all()
    assert_close(out, ref_latent(*args, keep, causal=True))


def test_deepseek_dims_r512_dr64():
    """R = 512 and Dr = 64 (DeepSeek-V2/V3's cache entry), 8 heads over one latent, decoding."""
    args = inputs(1, 8, 1, 1, 40, 512, 64, dtype=torch.bfloat16, seed=5)
    assert_close(latent_attention(*args, scale=0.1), ref_latent(*args, scale=0.1))


MASK_SHAPES = {"B11K": (2, 1, 1, 21), "B1QK": (2, 1, 6, 21), "1HQK": (1, 4, 6, 21), "QK": (6, 21),
               "BHQK": (2, 4, 6, 21)}


@pytest.mark.parametrize("mshape", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_masks_broadcast(mshape, kind):
    args = inputs(2, 4, 2, 6, 21, 16, 8, seed=6)
    shape = MASK_SHAPES[mshape]
    if kind == "float":
        mask = rand(*shape, seed=7, scale=2.0)
        mask[..., 3] = float("-inf")
    else:
        mask = (torch.rand(*shape, generator=torch.Generator().manual_seed(8)) > 0.4).to(DEVICE)
        mask[..., 0] = True
    out = latent_attention(*args, attn_mask=mask, is_causal=True)
    assert_close(out, ref_latent(*args, mask, causal=True))


@pytest.mark.parametrize("splits", [1, 2])
def test_fully_masked_rows_give_zeros_and_finfo_min_rows_stay_uniform(splits):
    args = inputs(1, 4, 1, 3, 20, 16, 8, seed=9)
    keep = torch.ones(1, 1, 3, 20, dtype=torch.bool, device=DEVICE)
    keep[..., 1, :] = False
    out = latent_attention(*args, attn_mask=keep, num_splits=splits)
    assert not out.isnan().any() and (out[:, :, 1] == 0).all()
    assert_close(out, ref_latent(*args, keep))
    lowest = torch.zeros(1, 1, 3, 20, device=DEVICE)
    lowest[..., 1, :] = torch.finfo(torch.float32).min  # HF's padding value: a uniform row, not a zero one
    out = latent_attention(*args, attn_mask=lowest, num_splits=splits)
    assert_close(out[:, :, 1], args[2].mean(2).expand(1, 4, 16))


def test_group_mapping_is_h_div_group():
    ql, qr, lat, kr = inputs(1, 4, 2, 3, 9, 16, 8, seed=10)
    out = latent_attention(ql, qr, lat, kr)
    wrong = ref_latent(ql, qr, lat.repeat(1, 2, 1, 1), kr.repeat(1, 2, 1, 1))
    assert not torch.allclose(out, wrong, atol=1e-3)
    assert_close(out, ref_latent(ql, qr, lat, kr))


def test_non_contiguous_inputs():
    """Views of (B, S, H, R + Dr) projections and of a (B, S, R + Dr) cache, as an MLA layer slices them."""
    q = rand(2, 7, 4, 24, seed=11).transpose(1, 2)
    cache = rand(2, 13, 24, seed=12)[:, None]
    args = (q[..., :16], q[..., 16:], cache[..., :16], cache[..., 16:])
    assert_close(latent_attention(*args, is_causal=True), ref_latent(*args, causal=True))


def test_the_kernel_loads_each_latent_tile_once():
    """The latent is the keys and the values: one load per key block feeds both dots."""
    source = inspect.getsource(kmod._latent_attn_kernel.fn)
    assert source.count("tl.load(L_base") == 1
    assert "tl.trans(lat)" in source and "_dot(p.to(lat.dtype), lat" in source


def test_empty_and_keyless():
    assert latent_attention(*inputs(1, 2, 1, 0, 5, 16, 4)).shape == (1, 2, 0, 16)
    assert (latent_attention(*inputs(1, 2, 1, 3, 0, 16, 4)) == 0).all()


def test_errors():
    ql, qr, lat, kr = inputs(1, 4, 1, 3, 5, 16, 4)
    with pytest.raises(ValueError, match="do not fit"):
        latent_attention(ql, qr, lat[..., :8], kr)
    with pytest.raises(ValueError, match="do not fit"):
        latent_attention(ql, qr, lat.expand(1, 3, 5, 16), kr.expand(1, 3, 5, 4))
    with pytest.raises(ValueError, match="latent dim 520 above 512"):
        latent_attention(*inputs(1, 1, 1, 1, 2, 520, 4))
    with pytest.raises(ValueError, match="dtype"):
        latent_attention(ql.double(), qr.double(), lat.double(), kr.double())


def test_backward_raises_clearly():
    ql, qr, lat, kr = inputs(1, 2, 1, 4, 4, 16, 4)
    ql.requires_grad_(True)
    out = latent_attention(ql, qr, lat, kr)
    with pytest.raises(NotImplementedError, match="forward pass only"):
        out.sum().backward()


def test_pruning_fits_deepseek_decoding_and_drops_what_does_not_fit():
    """On H100 limits, bfloat16 R = 512 + Dr = 64 keeps the 32-row configs and drops 64 rows for registers;
    float32 at that width fits nothing and keeps the cheapest config so the launch still runs."""
    named = {"QL": torch.empty(0, dtype=torch.bfloat16), "Mask": None}
    dims = {"BLOCK_R": 512, "BLOCK_DR": 64, "HAS_ROPE": True}
    configs = kmod._configs()
    kept, reasons = prune(configs, named, dims, 90, 227 * 1024)
    assert {(c.kwargs["BLOCK_M"], c.num_warps) for c in kept} >= {(32, 8)}
    big = next(r for c, r in zip(configs, reasons) if c.kwargs["BLOCK_M"] == 64)
    assert big.startswith("registers")
    kept, reasons = prune(configs, {**named, "QL": torch.empty(0)}, dims, 90, 227 * 1024)
    assert len(kept) == 1 and all(r is not None for r in reasons)
    wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    assert prune_reason(wide, block_r=512, block_dr=64, elem_bytes=2, capability=80,
                        max_shared=163 * 1024).startswith("shared memory")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("Sq,causal", [(1, False), (4, True), (300, True)])
def test_gpu_deepseek_shapes(Sq, causal):
    args = inputs(2, 128 if Sq < 300 else 16, 1, Sq, 2049, 512, 64, dtype=torch.bfloat16, seed=13)
    out = latent_attention(*args, is_causal=causal, scale=0.07)
    torch.testing.assert_close(out.float(), ref_latent(*args, scale=0.07, causal=causal).float(),
                               **TOL[torch.bfloat16])
