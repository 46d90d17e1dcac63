"""The fxfuse dialect ops against independent plain-torch references.

Every reference below is written from the op's docstring alone; none of them
calls a helper of ``fxfuse.ir.dialect`` (nor ``F.scaled_dot_product_attention``,
``F.layer_norm`` or ``F.gelu``, which the dialect itself is built on).
References are computed in float64 (or float32 where the docstring says the op
computes in float32) and cast to the op's result dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import fxfuse.ir.dialect as dialect  # noqa: F401  (registers torch.ops.fxfuse.*)
from tests.kernels.refs import ref_rotate

ops = torch.ops.fxfuse

HYP = settings(max_examples=25, deadline=None)

# Tolerances for a float32 result against a float64 reference.
F32 = dict(rtol=1e-5, atol=1e-5)
# One-rounding tolerances for half-precision results against a reference cast to that dtype.
LOW = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------


def ref_attention(q, k, v, mask=None, scale=None, causal=False, softcap=None):
    """softmax(cap(q @ k^T * scale) + mask) @ v with explicit GQA head repeat, in float64."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    kk = k.double().repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    vv = v.double().repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scores = (q.double() @ kk.transpose(-2, -1)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    if causal:
        above = torch.ones(Sq, Sk, dtype=torch.bool).triu(diagonal=1)  # key j > query i
        scores = scores.masked_fill(above, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vv).to(q.dtype)


def ref_rms_fp32(x, weight, eps):
    """The docstring's RMSNorm: normalize in float32, cast to x.dtype, then scale by weight."""
    xf = x.to(torch.float32)
    y = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    y = y.to(x.dtype)
    return y if weight is None else weight * y


def ref_layer_norm(x, weight, bias, eps):
    xd = x.double()
    mean = xd.sum(-1, keepdim=True) / xd.shape[-1]
    var = ((xd - mean) ** 2).sum(-1, keepdim=True) / xd.shape[-1]  # biased
    y = (xd - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def ref_gelu_erf(x):
    xd = x.double()
    return (0.5 * xd * (1.0 + torch.erf(xd / math.sqrt(2.0)))).to(x.dtype)


def ref_gelu_tanh(x):
    xd = x.double()
    return (0.5 * xd * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd**3)))).to(x.dtype)


def ref_quick_gelu(x):
    xd = x.double()
    return (xd / (1.0 + torch.exp(-1.702 * xd))).to(x.dtype)


def ref_silu(x):
    xd = x.double()
    return (xd / (1.0 + torch.exp(-xd))).to(x.dtype)


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def _qkv(B, Hq, Hkv, Sq, Sk, D, Dv=None, seed=0, dtype=torch.float32):
    Dv = D if Dv is None else Dv
    return (
        rand(B, Hq, Sq, D, seed=seed, dtype=dtype),
        rand(B, Hkv, Sk, D, seed=seed + 1, dtype=dtype),
        rand(B, Hkv, Sk, Dv, seed=seed + 2, dtype=dtype),
    )


def _bool_mask(shape, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) > 0.4
    m[..., 0] = True  # no fully masked row (its softmax is undefined)
    return m


@pytest.mark.parametrize("Hq,Hkv", [(1, 1), (3, 3), (6, 2), (6, 3), (6, 1)])
@pytest.mark.parametrize("Sq,Sk", [(7, 7), (3, 7), (7, 4), (1, 5)])
def test_attention_no_mask_gqa_odd_sizes(Hq, Hkv, Sq, Sk):
    q, k, v = _qkv(2, Hq, Hkv, Sq, Sk, 5)
    out = ops.attention(q, k, v)
    assert out.shape == (2, Hq, Sq, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_attention(q, k, v), **F32)


def test_attention_gqa_head_mapping():
    """Query head h must read kv head h // group (repeat_interleave), not h % Hkv (repeat)."""
    q, k, v = _qkv(1, 6, 2, 4, 5, 3)
    out = ops.attention(q, k, v)
    wrong = ref_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1))
    assert not torch.allclose(out, wrong, atol=1e-3)
    torch.testing.assert_close(out, ref_attention(q, k, v), **F32)


def test_attention_value_dim_differs():
    q, k, v = _qkv(2, 6, 3, 7, 4, 5, Dv=3)
    out = ops.attention(q, k, v)
    assert out.shape == (2, 6, 7, 3)
    torch.testing.assert_close(out, ref_attention(q, k, v), **F32)


@pytest.mark.parametrize("scale", [None, 0.37, 1.0])
def test_attention_scale(scale):
    q, k, v = _qkv(1, 2, 2, 3, 6, 5)
    out = ops.attention(q, k, v, None, scale)
    torch.testing.assert_close(out, ref_attention(q, k, v, scale=scale), **F32)
    if scale is None:
        torch.testing.assert_close(out, ref_attention(q, k, v, scale=1 / math.sqrt(5)), **F32)
        assert not torch.allclose(out, ref_attention(q, k, v, scale=1.0), atol=1e-4)


@pytest.mark.parametrize("mshape", ["B11K", "B1QK", "11QK", "QK", "BHQK"])
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (6, 3), (2, 2)])
def test_attention_float_mask_broadcast(mshape, Hq, Hkv):
    B, Sq, Sk = 2, 7, 5
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 5, seed=3)
    shape = {
        "B11K": (B, 1, 1, Sk), "B1QK": (B, 1, Sq, Sk), "11QK": (1, 1, Sq, Sk), "QK": (Sq, Sk), "BHQK": (B, Hq, Sq, Sk),
    }[mshape]
    mask = rand(*shape, seed=9, scale=3.0)
    mask[..., 1] = float("-inf")  # a fully excluded key
    out = ops.attention(q, k, v, mask)
    torch.testing.assert_close(out, ref_attention(q, k, v, mask), **F32)
    # the float mask is added, not ignored
    assert not torch.allclose(out, ref_attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("mshape", ["B11K", "B1QK"])
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (6, 3), (2, 2)])
def test_attention_bool_mask_broadcast(mshape, Hq, Hkv):
    B, Sq, Sk = 2, 7, 6
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 5, seed=4)
    shape = {"B11K": (B, 1, 1, Sk), "B1QK": (B, 1, Sq, Sk)}[mshape]
    mask = _bool_mask(shape, seed=11)
    out = ops.attention(q, k, v, mask)
    torch.testing.assert_close(out, ref_attention(q, k, v, mask), **F32)
    # True keeps: the result equals the float mask 0 / -inf
    fmask = torch.zeros(shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, ops.attention(q, k, v, fmask), **F32)
    # ... and is not the inverted reading (True masks out)
    assert not torch.allclose(out, ref_attention(q, k, v, ~mask | (torch.arange(Sk) == 0)), atol=1e-3)


@pytest.mark.parametrize("Sq,Sk", [(7, 7), (4, 7), (7, 4), (1, 3)])
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (2, 2)])
def test_attention_causal_top_left(Sq, Sk, Hq, Hkv):
    q, k, v = _qkv(2, Hq, Hkv, Sq, Sk, 5, seed=5)
    out = ops.attention(q, k, v, None, None, True)
    torch.testing.assert_close(out, ref_attention(q, k, v, causal=True), **F32)
    # query 0 sees key 0 only
    torch.testing.assert_close(out[:, :, 0], v.repeat_interleave(Hq // Hkv, 1)[:, :, 0], **F32)


@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (2, 2)])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_attention_causal_with_mask(Hq, Hkv, kind):
    B, Sq, Sk = 2, 5, 7
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 4, seed=6)
    mask = rand(B, 1, Sq, Sk, seed=2) if kind == "float" else _bool_mask((B, 1, Sq, Sk), seed=2)
    out = ops.attention(q, k, v, mask, None, True)
    torch.testing.assert_close(out, ref_attention(q, k, v, mask, causal=True), **F32)


@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("layout", ["value_dim_differs", "noncontiguous_q"])
def test_attention_causal_with_mask_math_fallback(kind, layout):
    B, Sq, Sk = 1, 3, 5
    Dv = 7 if layout == "value_dim_differs" else 4
    q, k, v = _qkv(B, 2, 2, Sq, Sk, 4, Dv=Dv, seed=6)
    if layout == "noncontiguous_q":
        q = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, last-dim stride != 1
    mask = rand(B, 1, Sq, Sk, seed=2) if kind == "float" else _bool_mask((B, 1, Sq, Sk), seed=2)
    out = ops.attention(q, k, v, mask, None, True)
    torch.testing.assert_close(out, ref_attention(q, k, v, mask, causal=True), **F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Dv", [5, 3])
def test_attention_low_precision(dtype, Dv):
    q, k, v = _qkv(2, 6, 2, 7, 9, 5, Dv=Dv, seed=7, dtype=dtype)
    mask = rand(2, 1, 1, 9, seed=8, dtype=dtype)
    out = ops.attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == (2, 6, 7, Dv)
    torch.testing.assert_close(out, ref_attention(q, k, v, mask), **LOW[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_softcap(dtype, causal):
    q, k, v = _qkv(2, 4, 2, 5, 7, 6, seed=11, dtype=dtype)
    q = q * 4  # large scores, so the cap bites
    mask = rand(2, 1, 5, 7, seed=12, dtype=dtype)
    out = ops.attention(q, k, v, mask, 0.5, causal, 3.0)
    expected = ref_attention(q, k, v, mask, scale=0.5, causal=causal, softcap=3.0)
    torch.testing.assert_close(out, expected, **(F32 if dtype == torch.float32 else LOW[dtype]))
    uncapped = ref_attention(q, k, v, mask, scale=0.5, causal=causal)
    assert not torch.allclose(out.float(), uncapped.float(), atol=1e-2)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_attention_fully_masked_row_is_zero(softcap):
    q, k, v = _qkv(1, 2, 2, 3, 4, 5, seed=13)
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    keep[..., 1, :] = False
    out = ops.attention(q, k, v, keep, None, False, softcap)
    assert not out.isnan().any() and (out[:, :, 1] == 0).all()
    torch.testing.assert_close(out[:, :, [0, 2]], ref_attention(q, k, v, keep, softcap=softcap)[:, :, [0, 2]], **F32)


@pytest.mark.parametrize("Hq,Hkv", [(5, 2), (4, 3), (2, 4)])
def test_attention_mismatched_heads(Hq, Hkv):
    q, k, v = _qkv(1, Hq, Hkv, 3, 3, 4)
    with pytest.raises(ValueError, match="heads"):
        ops.attention(q, k, v)
    mode = FakeTensorMode()
    fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
    with mode, pytest.raises(ValueError, match="heads"):
        ops.attention(fq, fk, fv)


def test_attention_k_v_heads_differ():
    q = rand(1, 4, 3, 4)
    k = rand(1, 2, 3, 4)
    v = rand(1, 4, 3, 4)
    with pytest.raises(ValueError, match="heads"):
        ops.attention(q, k, v)


@HYP
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    Sq=st.integers(1, 7),
    Sk=st.integers(1, 7),
    D=st.integers(1, 9),
    Dv=st.integers(1, 9),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "float_key", "float_full", "bool_key", "bool_full"]),
    scale=st.one_of(st.none(), st.floats(0.05, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_attention_property(B, Hkv, group, Sq, Sk, D, Dv, causal, mask_kind, scale, seed):
    Hq = Hkv * group
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, Dv=Dv, seed=seed)
    shape = (B, 1, 1, Sk) if mask_kind.endswith("key") else (B, 1, Sq, Sk)
    if mask_kind == "none":
        mask = None
    elif mask_kind.startswith("float"):
        mask = rand(*shape, seed=seed + 3)
    else:
        mask = _bool_mask(shape, seed=seed + 3)
    out = ops.attention(q, k, v, mask, scale, causal)
    assert out.shape == (B, Hq, Sq, Dv) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref_attention(q, k, v, mask, scale, causal), **F32)


# --------------------------------------------------------------------------
# latent_attention
# --------------------------------------------------------------------------


def ref_latent_attention(q_latent, q_rope, latent, k_rope, mask=None, scale=None, causal=False):
    """The docstring's per-head formula in float64, one head at a time; rows with no key → 0."""
    B, H, Sq, R = q_latent.shape
    G, Sk, Dr = latent.shape[1], latent.shape[2], q_rope.shape[-1]
    scale = 1.0 / math.sqrt(R + Dr) if scale is None else scale
    out = torch.zeros(B, H, Sq, R, dtype=torch.float64)
    for h in range(H):
        g = h // (H // G)
        lat = latent[:, g].double()
        rot = q_rope[:, h].double() @ k_rope[:, g].double().transpose(-1, -2)
        s = (q_latent[:, h].double() @ lat.transpose(-1, -2) + rot) * scale
        if mask is not None:
            m = mask.expand(B, H, Sq, Sk)[:, h]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
        if causal:
            s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[:, h] = p @ lat
    return out.to(q_latent.dtype)


def _latent(B, H, G, Sq, Sk, R, Dr, seed=0, dtype=torch.float32):
    return (rand(B, H, Sq, R, seed=seed, dtype=dtype), rand(B, H, Sq, Dr, seed=seed + 1, dtype=dtype),
            rand(B, G, Sk, R, seed=seed + 2, dtype=dtype), rand(B, G, Sk, Dr, seed=seed + 3, dtype=dtype))


@pytest.mark.parametrize("H,G", [(1, 1), (4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("Sq,Sk,R,Dr", [(5, 7, 6, 3), (1, 9, 8, 0), (7, 4, 5, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_latent_attention_is_attention_on_the_concatenation(H, G, Sq, Sk, R, Dr, causal):
    """The core identity: keys cat(latent, k_rope), values the latent itself, scale 1/sqrt(R + Dr)."""
    ql, qr, lat, kr = _latent(2, H, G, Sq, Sk, R, Dr)
    mask = rand(2, 1, Sq, Sk, seed=9)
    out = ops.latent_attention(ql, qr, lat, kr, mask, None, causal)
    assert out.shape == (2, H, Sq, R) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_latent_attention(ql, qr, lat, kr, mask, causal=causal), **F32)
    joined = ops.attention(torch.cat([ql, qr], -1), torch.cat([lat, kr], -1), lat, mask, 1 / math.sqrt(R + Dr), causal)
    torch.testing.assert_close(out, joined, **F32)


def test_latent_attention_group_mapping_and_rope_part_count():
    """Head h reads group h // (H // G), not h % G; and the rotary scores are added, not ignored."""
    ql, qr, lat, kr = _latent(1, 4, 2, 3, 6, 8, 4, seed=1)
    out = ops.latent_attention(ql, qr, lat, kr)
    torch.testing.assert_close(out, ref_latent_attention(ql, qr, lat, kr), **F32)
    wrong_groups = ref_latent_attention(ql, qr, lat.repeat(1, 2, 1, 1), kr.repeat(1, 2, 1, 1))
    assert not torch.allclose(out, wrong_groups, atol=1e-3)
    no_rope = ref_latent_attention(ql, qr[..., :0], lat, kr[..., :0], scale=1 / math.sqrt(12))
    assert not torch.allclose(out, no_rope, atol=1e-3)


@pytest.mark.parametrize("scale", [None, 0.1, 1.0])
def test_latent_attention_scale(scale):
    ql, qr, lat, kr = _latent(1, 2, 1, 4, 5, 6, 2, seed=2)
    out = ops.latent_attention(ql, qr, lat, kr, None, scale)
    torch.testing.assert_close(out, ref_latent_attention(ql, qr, lat, kr, scale=scale), **F32)
    if scale is None:  # over R + Dr, not R alone
        assert not torch.allclose(out, ref_latent_attention(ql, qr, lat, kr, scale=1 / math.sqrt(6)), atol=1e-4)


@pytest.mark.parametrize("mshape", [(2, 1, 1, 6), (2, 4, 5, 6), (5, 6)])
def test_latent_attention_masks_and_fully_masked_rows(mshape):
    ql, qr, lat, kr = _latent(2, 4, 2, 5, 6, 8, 4, seed=3)
    keep = _bool_mask(mshape, seed=4)
    out = ops.latent_attention(ql, qr, lat, kr, keep)
    torch.testing.assert_close(out, ref_latent_attention(ql, qr, lat, kr, keep), **F32)
    fmask = torch.zeros(mshape).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(ops.latent_attention(ql, qr, lat, kr, fmask), out, **F32)
    keep = keep.expand(*mshape[:-2], 5, 6).clone()
    keep[..., -1, :] = False  # the last query row (of every batch / head) reaches no key
    out = ops.latent_attention(ql, qr, lat, kr, keep, None, True)
    assert not out.isnan().any() and (out[:, :, -1] == 0).all() and (out[:, :, 0] != 0).any()
    torch.testing.assert_close(out, ref_latent_attention(ql, qr, lat, kr, keep, causal=True), **F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_latent_attention_low_precision(dtype):
    ql, qr, lat, kr = _latent(2, 4, 1, 3, 9, 16, 4, seed=5, dtype=dtype)
    mask = rand(2, 1, 1, 9, seed=6, dtype=dtype)
    out = ops.latent_attention(ql, qr, lat, kr, mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_latent_attention(ql, qr, lat, kr, mask), **LOW[dtype])


def test_latent_attention_without_keys_gives_zeros_and_without_queries_nothing():
    ql, qr, lat, kr = _latent(1, 2, 1, 3, 0, 4, 2)
    assert torch.equal(ops.latent_attention(ql, qr, lat, kr), torch.zeros(1, 2, 3, 4))
    assert ops.latent_attention(*_latent(1, 2, 1, 0, 5, 4, 2)).shape == (1, 2, 0, 4)


LATENT_ERRORS = {
    "R mismatch": ((1, 4, 3, 8), (1, 4, 3, 2), (1, 1, 5, 6), (1, 1, 5, 2), r"latent dim R of q_latent \(8\) and latent \(6\)"),
    "Dr mismatch": ((1, 4, 3, 8), (1, 4, 3, 2), (1, 1, 5, 8), (1, 1, 5, 3), r"rotary dim Dr of q_rope \(2\) and k_rope \(3\)"),
    "heads not a multiple": ((1, 4, 3, 8), (1, 4, 3, 2), (1, 3, 5, 8), (1, 3, 5, 2), r"query heads \(4\) .* latent groups \(3\)"),
    "3-D": ((4, 3, 8), (4, 3, 2), (1, 5, 8), (1, 5, 2), "4-D"),
    "q_rope rows": ((1, 4, 3, 8), (1, 4, 2, 2), (1, 1, 5, 8), (1, 1, 5, 2), "q_rope.*query length"),
    "k_rope keys": ((1, 4, 3, 8), (1, 4, 3, 2), (1, 1, 5, 8), (1, 1, 4, 2), "k_rope.*key length"),
    "batch": ((2, 4, 3, 8), (2, 4, 3, 2), (1, 1, 5, 8), (1, 1, 5, 2), "batch sizes differ"),
}


@pytest.mark.parametrize("case", list(LATENT_ERRORS))
def test_latent_attention_shape_errors_name_the_op(case):
    *shapes, match = LATENT_ERRORS[case]
    args = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    with pytest.raises(ValueError, match="fxfuse.latent_attention") as info:
        ops.latent_attention(*args)
    assert info.match(match)
    mode = FakeTensorMode()
    fargs = [mode.from_tensor(a) for a in args]
    with mode, pytest.raises(ValueError, match=match):
        ops.latent_attention(*fargs)


# --------------------------------------------------------------------------
# rms_norm / add_rms_norm
# --------------------------------------------------------------------------


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 13)])
def test_rms_norm_float32(shape, with_weight):
    x = rand(*shape, seed=1, scale=2.0)
    w = rand(shape[-1], seed=2) if with_weight else None
    out = ops.rms_norm(x, w, 1e-6)
    # float64 textbook formula
    xd = x.double()
    expect = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    if w is not None:
        expect = expect * w.double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expect.float(), **F32)


def test_rms_norm_eps_is_used():
    x = torch.full((2, 4), 1e-3)
    small = ops.rms_norm(x, None, 1e-12)
    big = ops.rms_norm(x, None, 1.0)
    torch.testing.assert_close(small, torch.ones(2, 4), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(big, x / math.sqrt(1e-6 + 1.0), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [False, True])
def test_rms_norm_low_precision_computes_in_float32(dtype, with_weight):
    x = rand(3, 4, 17, seed=3, dtype=dtype, scale=3.0)
    w = rand(17, seed=4, dtype=dtype) if with_weight else None
    out = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_rms_fp32(x, w, 1e-5), **LOW[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_large_values_no_half_overflow(dtype):
    """x² overflows float16 for |x| > 256; computing in float32 must not."""
    x = (rand(2, 8, seed=5).abs() + 1.0).to(dtype) * 1000.0
    out = ops.rms_norm(x, None, 1e-5)
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0.1  # a half-precision x² would give inf -> zeros
    torch.testing.assert_close(out, ref_rms_fp32(x, None, 1e-5), **LOW[dtype])


def test_rms_norm_weight_dtype_promotion():
    """weight * y with y cast to x.dtype first: float32 weight on a float16 x gives float32."""
    x = rand(4, 9, seed=6, dtype=torch.float16)
    w = rand(9, seed=7, dtype=torch.float32)
    out = ops.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    expect = w * ref_rms_fp32(x, None, 1e-6).float()  # cast to float16 happens before the weight
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)


@HYP
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n=st.integers(1, 33),
    with_weight=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_property(lead, n, with_weight, eps, seed):
    x = rand(*lead, n, seed=seed, scale=2.0)
    w = rand(n, seed=seed + 1) if with_weight else None
    out = ops.rms_norm(x, w, eps)
    assert out.shape == x.shape
    xd = x.double()
    expect = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)
    if w is not None:
        expect = expect * w.double()
    torch.testing.assert_close(out, expect.float(), **F32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [False, True])
def test_add_rms_norm_returns_normed_then_sum(dtype, with_weight):
    x = rand(2, 3, 11, seed=8, dtype=dtype)
    r = rand(2, 3, 11, seed=9, dtype=dtype, scale=4.0)
    w = rand(11, seed=10, dtype=dtype) if with_weight else None
    out = ops.add_rms_norm(x, r, w, 1e-6)
    assert isinstance(out, tuple) and len(out) == 2
    normed, s = out
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    tol = F32 if dtype == torch.float32 else LOW[dtype]
    torch.testing.assert_close(normed, ref_rms_fp32(x + r, w, 1e-6), **tol)
    # the sum is not normalized, the normed output is
    assert not torch.allclose(normed.float(), s.float(), atol=1e-2)


# --------------------------------------------------------------------------
# layer_norm / add_layer_norm
# --------------------------------------------------------------------------


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 13)])
def test_layer_norm(shape, with_weight, with_bias):
    x = rand(*shape, seed=11, scale=3.0) + 2.0
    w = rand(shape[-1], seed=12) if with_weight else None
    b = rand(shape[-1], seed=13) if with_bias else None
    out = ops.layer_norm(x, w, b, 1e-5)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, ref_layer_norm(x, w, b, 1e-5), **F32)


def test_layer_norm_variance_is_biased():
    x = torch.tensor([[1.0, 3.0]])  # mean 2, biased var 1, unbiased var 2
    out = ops.layer_norm(x, None, None, 0.0)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_low_precision(dtype):
    x = rand(3, 19, seed=14, dtype=dtype)
    w = rand(19, seed=15, dtype=dtype)
    b = rand(19, seed=16, dtype=dtype)
    out = ops.layer_norm(x, w, b, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_layer_norm(x, w, b, 1e-5), **LOW[dtype])


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_add_layer_norm_returns_normed_then_sum(with_weight, with_bias):
    x = rand(2, 5, 9, seed=17)
    r = rand(2, 5, 9, seed=18, scale=3.0)
    w = rand(9, seed=19) if with_weight else None
    b = rand(9, seed=20) if with_bias else None
    out = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert isinstance(out, tuple) and len(out) == 2
    normed, s = out
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(normed, ref_layer_norm(x + r, w, b, 1e-5), **F32)


# --------------------------------------------------------------------------
# gated_mlp_act / gelu
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation,act", [("silu", ref_silu), ("gelu", ref_gelu_erf), ("gelu_tanh", ref_gelu_tanh)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_act(activation, act, dtype):
    gate = rand(3, 7, 11, seed=21, dtype=dtype, scale=3.0)
    up = rand(3, 7, 11, seed=22, dtype=dtype)
    out = ops.gated_mlp_act(gate, up, activation)
    assert out.dtype == dtype and out.shape == gate.shape
    expect = (act(gate.double()) * up.double()).to(dtype)
    torch.testing.assert_close(out, expect, **(F32 if dtype == torch.float32 else LOW[dtype]))


def test_gated_mlp_act_activations_differ():
    """The three activations are really different functions (so the parametrized test can fail)."""
    gate = rand(50, seed=23, scale=3.0)
    up = torch.ones(50)
    outs = [ops.gated_mlp_act(gate, up, a) for a in ("silu", "gelu", "gelu_tanh")]
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)
    assert not torch.allclose(outs[1], outs[2], atol=1e-6)


def test_gated_mlp_act_broadcast_up():
    gate = rand(2, 3, 6, seed=24)
    up = rand(6, seed=25)
    out = ops.gated_mlp_act(gate, up, "silu")
    torch.testing.assert_close(out, (ref_silu(gate.double()) * up.double()).float(), **F32)


@pytest.mark.parametrize("bad", ["relu", "gelu_erf", "SiLU", ""])
def test_gated_mlp_act_unknown_activation(bad):
    gate, up = rand(2, 4), rand(2, 4, seed=1)
    with pytest.raises(ValueError, match=r"activation must be one of .*silu.*gelu.*gelu_tanh") as info:
        ops.gated_mlp_act(gate, up, bad)
    assert repr(bad) in str(info.value)
    mode = FakeTensorMode()
    with mode, pytest.raises(ValueError, match="activation"):
        ops.gated_mlp_act(mode.from_tensor(gate), mode.from_tensor(up), bad)


@pytest.mark.parametrize("approximate,ref", [("none", ref_gelu_erf), ("tanh", ref_gelu_tanh), ("sigmoid", ref_quick_gelu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu(approximate, ref, dtype):
    x = rand(5, 13, seed=26, dtype=dtype, scale=3.0)
    out = ops.gelu(x, approximate)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref(x), **(F32 if dtype == torch.float32 else LOW[dtype]))


def test_gelu_default_is_erf():
    x = rand(40, seed=27, scale=3.0)
    torch.testing.assert_close(ops.gelu(x), ref_gelu_erf(x), **F32)
    assert not torch.allclose(ops.gelu(x), ref_gelu_tanh(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", ["erf", "exact", "TANH", ""])
def test_gelu_bad_approximate(bad):
    with pytest.raises(ValueError, match=r"approximate must be one of") as info:
        ops.gelu(rand(3), bad)
    assert repr(bad) in str(info.value)


def test_gelu_bad_approximate_fake():
    mode = FakeTensorMode()
    with mode, pytest.raises(ValueError, match="approximate"):
        ops.gelu(mode.from_tensor(rand(3)), "bad")


# --------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------


def _cos_sin(shape, seed, interleaved):
    """Angles as models build them (one angle per rotated pair), laid out for the given pairing."""
    *lead, R = shape
    theta = rand(*lead, R // 2, seed=seed, scale=2.0)
    if interleaved:
        theta = theta.repeat_interleave(2, dim=-1)  # dims 2i, 2i+1 share an angle
    else:
        theta = torch.cat([theta, theta], dim=-1)  # dims i, i + R/2 share an angle
    return theta.cos(), theta.sin()


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(6, 6), (10, 4), (9, 6), (8, 2)])
@pytest.mark.parametrize("cs_shape", ["B1SR", "SR", "11SR"])
def test_rope(interleaved, D, R, cs_shape):
    B, H, Hk, S = 2, 3, 1, 7
    q = rand(B, H, S, D, seed=30)
    k = rand(B, Hk, S, D, seed=31)
    shape = {"B1SR": (B, 1, S, R), "SR": (S, R), "11SR": (1, 1, S, R)}[cs_shape]
    # arbitrary cos/sin (not a pure rotation) check the formula elementwise
    cos, sin = rand(*shape, seed=32), rand(*shape, seed=33)
    q2, k2 = ops.rope(q, k, cos, sin, interleaved)
    assert q2.shape == q.shape and k2.shape == k.shape
    torch.testing.assert_close(q2, ref_rotate(q, cos, sin, interleaved), **F32)
    torch.testing.assert_close(k2, ref_rotate(k, cos, sin, interleaved), **F32)
    # pass-through dims are untouched, bit for bit
    assert torch.equal(q2[..., R:], q[..., R:])
    assert torch.equal(k2[..., R:], k[..., R:])


def test_rope_interleaved_differs_from_rotate_half():
    q = rand(1, 2, 3, 8, seed=34)
    cos, sin = rand(1, 1, 3, 8, seed=35), rand(1, 1, 3, 8, seed=36)
    a, _ = ops.rope(q, q, cos, sin, False)
    b, _ = ops.rope(q, q, cos, sin, True)
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_is_a_rotation(interleaved):
    """With real angles, rope preserves the norm and rotating by -theta undoes it."""
    q = rand(2, 4, 5, 10, seed=37)
    k = rand(2, 2, 5, 10, seed=38)
    cos, sin = _cos_sin((2, 1, 5, 6), seed=39, interleaved=interleaved)
    q2, k2 = ops.rope(q, k, cos, sin, interleaved)
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1), **F32)
    q3, k3 = ops.rope(q2, k2, cos, -sin, interleaved)
    torch.testing.assert_close(q3, q, **F32)
    torch.testing.assert_close(k3, k, **F32)


def test_rope_explicit_values():
    """A 90-degree turn on a 4-dim head with R = 4: rotate_half maps (a, b, c, d) -> (-c, -d, a, b)."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 1, 1, 5)
    cos = torch.zeros(1, 1, 1, 4)
    sin = torch.ones(1, 1, 1, 4)
    half, _ = ops.rope(x, x, cos, sin, False)
    torch.testing.assert_close(half.flatten(), torch.tensor([-3.0, -4.0, 1.0, 2.0, 5.0]))
    inter, _ = ops.rope(x, x, cos, sin, True)
    torch.testing.assert_close(inter.flatten(), torch.tensor([-2.0, 1.0, -4.0, 3.0, 5.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_low_precision(dtype):
    q = rand(1, 2, 4, 6, seed=40, dtype=dtype)
    k = rand(1, 2, 4, 6, seed=41, dtype=dtype)
    cos, sin = (t.to(dtype) for t in _cos_sin((1, 1, 4, 4), seed=42, interleaved=False))
    q2, k2 = ops.rope(q, k, cos, sin, False)
    assert q2.dtype == dtype and k2.dtype == dtype
    torch.testing.assert_close(q2, ref_rotate(q, cos, sin, False), **LOW[dtype])
    assert torch.equal(q2[..., 4:], q[..., 4:])


@pytest.mark.parametrize(
    "cos_shape,sin_shape,match",
    [((1, 1, 4, 5), (1, 1, 4, 5), "even"), ((1, 1, 4, 8), (1, 1, 4, 8), "head dim"), ((1, 1, 4, 4), (1, 1, 4, 2), "one shape")],
)
def test_rope_bad_rotary_dim(cos_shape, sin_shape, match):
    q = rand(1, 2, 4, 6)
    with pytest.raises(ValueError, match=match):
        ops.rope(q, q, torch.ones(cos_shape), torch.ones(sin_shape), False)


# --------------------------------------------------------------------------
# fake implementations: same shapes and dtypes as the real run
# --------------------------------------------------------------------------

f16, bf16 = torch.float16, torch.bfloat16

FAKE_CASES = {
    "attention-mha": ("attention", lambda: _qkv(2, 3, 3, 7, 7, 5)),
    "attention-gqa-dv-mask": ("attention", lambda: (*_qkv(2, 6, 2, 3, 7, 5, Dv=4), rand(2, 1, 1, 7), None, False)),
    "attention-gqa3-causal-bool": (
        "attention",
        lambda: (*_qkv(1, 6, 3, 5, 4, 5), _bool_mask((1, 1, 5, 4), 0), 0.5, True),
    ),
    "attention-f16": ("attention", lambda: _qkv(1, 4, 2, 3, 6, 8, Dv=5, dtype=f16)),
    "latent_attention-g2-mask": ("latent_attention", lambda: (*_latent(2, 4, 2, 3, 7, 8, 4), rand(2, 1, 1, 7), None, True)),
    "latent_attention-dr0-bf16": ("latent_attention", lambda: _latent(1, 3, 1, 1, 6, 8, 0, dtype=bf16)),
    "rms_norm": ("rms_norm", lambda: (rand(2, 3, 7), rand(7, seed=1), 1e-6)),
    "rms_norm-noweight-bf16": ("rms_norm", lambda: (rand(2, 7, dtype=bf16), None, 1e-6)),
    "rms_norm-f16x-f32w": ("rms_norm", lambda: (rand(2, 7, dtype=f16), rand(7, seed=1), 1e-6)),
    "rms_norm-f32x-f16w": ("rms_norm", lambda: (rand(2, 7), rand(7, seed=1, dtype=f16), 1e-6)),
    "add_rms_norm": ("add_rms_norm", lambda: (rand(2, 3, 7), rand(2, 3, 7, seed=1), rand(7, seed=2), 1e-6)),
    "add_rms_norm-f16-bcast": ("add_rms_norm", lambda: (rand(2, 3, 7, dtype=f16), rand(7, seed=1, dtype=f16), None, 1e-6)),
    "add_rms_norm-mixed": ("add_rms_norm", lambda: (rand(3, 7, dtype=bf16), rand(3, 7, seed=1), rand(7, seed=2, dtype=bf16), 1e-6)),
    "layer_norm": ("layer_norm", lambda: (rand(2, 3, 9), rand(9, seed=1), rand(9, seed=2), 1e-5)),
    "layer_norm-none-f16": ("layer_norm", lambda: (rand(4, 9, dtype=f16), None, None, 1e-5)),
    "layer_norm-f16x-f32wb": ("layer_norm", lambda: (rand(4, 9, dtype=f16), rand(9, seed=1), rand(9, seed=2), 1e-5)),
    "add_layer_norm": ("add_layer_norm", lambda: (rand(2, 9), rand(2, 9, seed=1), rand(9, seed=2), None, 1e-5)),
    "add_layer_norm-bf16": ("add_layer_norm", lambda: (rand(2, 9, dtype=bf16), rand(2, 9, seed=1, dtype=bf16), None, rand(9, seed=2, dtype=bf16), 1e-5)),
    "gated_mlp_act": ("gated_mlp_act", lambda: (rand(3, 11), rand(3, 11, seed=1), "silu")),
    "gated_mlp_act-mixed": ("gated_mlp_act", lambda: (rand(3, 11, dtype=f16), rand(11, seed=1), "gelu_tanh")),
    "gelu": ("gelu", lambda: (rand(3, 11), "none")),
    "gelu-tanh-bf16": ("gelu", lambda: (rand(3, 11, dtype=bf16), "tanh")),
    "rope-partial": ("rope", lambda: (rand(2, 4, 5, 10), rand(2, 2, 5, 10, seed=1), rand(2, 1, 5, 6, seed=2), rand(2, 1, 5, 6, seed=3), False)),
    "rope-interleaved-SR": ("rope", lambda: (rand(1, 3, 5, 8), rand(1, 3, 5, 8, seed=1), rand(5, 8, seed=2), rand(5, 8, seed=3), True)),
    "rope-f16-f32cos": ("rope", lambda: (rand(1, 3, 5, 8, dtype=f16), rand(1, 1, 5, 8, seed=1, dtype=f16), rand(1, 1, 5, 4, seed=2), rand(1, 1, 5, 4, seed=3), False)),
}


def test_fake_cases_cover_every_op():
    assert {name for name, _ in FAKE_CASES.values()} == set(dialect.OPS)


@pytest.mark.parametrize("case", sorted(FAKE_CASES))
def test_fake_matches_real(case):
    name, make = FAKE_CASES[case]
    op = dialect.OPS[name]
    args = make()
    real = op(*args)
    mode = FakeTensorMode()
    fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = op(*fargs)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(fake) == len(real)
    for r, f in zip(real, fake):
        assert isinstance(f, torch._subclasses.fake_tensor.FakeTensor)
        assert (tuple(f.shape), f.stride(), f.dtype) == (tuple(r.shape), r.stride(), r.dtype), case


def test_ops_registry_is_the_torch_ops():
    for name, op in dialect.OPS.items():
        assert op is getattr(torch.ops.fxfuse, name).default
        assert dialect.is_dialect_op(op)
    assert not dialect.is_dialect_op(torch.ops.aten.add.Tensor)
    assert not dialect.is_dialect_op("fxfuse::attention")


def test_trivial_masks_are_handed_to_sdpa_as_its_fast_paths():
    """All-keep → no mask; exactly causal (bool, or float with -inf/min fill) → causal; anything else untouched."""
    from fxfuse.ir.dialect import _simplify_mask

    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    assert _simplify_mask(torch.ones(2, 1, 5, 5, dtype=torch.bool), False, 5, 5) == (None, False)
    assert _simplify_mask(tril.expand(2, 1, 5, 5), False, 5, 5) == (None, True)
    float_causal = torch.zeros(5, 5).masked_fill(~tril, torch.finfo(torch.float32).min)
    assert _simplify_mask(float_causal, False, 5, 5) == (None, True)
    padded = tril.expand(2, 1, 5, 5).clone()
    padded[1, ..., -1] = False
    assert _simplify_mask(padded, False, 5, 5)[0] is padded
    alibi = torch.zeros(5, 5).masked_fill(~tril, float("-inf")) - torch.arange(5.0)
    assert _simplify_mask(alibi, False, 5, 5)[0] is alibi
    assert _simplify_mask(tril[:4], False, 4, 5)[0] is not None  # not square: not SDPA's top-left causal


def test_attention_runs_under_inference_mode_and_sees_in_place_mask_changes():
    """Inference tensors have no version counter: the mask is analysed on every call instead of cached."""
    with torch.inference_mode():
        q = torch.randn(1, 2, 4, 8)
        mask = torch.zeros(1, 1, 4, 4)
        no_mask = torch.ops.fxfuse.attention(q, q, q, mask)
        torch.testing.assert_close(no_mask, torch.ops.fxfuse.attention(q, q, q))
        mask[..., -1] = float("-inf")  # in place: same tensor, now hides the last key
        hidden = torch.ops.fxfuse.attention(q, q, q, mask)
        expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        torch.testing.assert_close(hidden, expected)
        assert not torch.allclose(hidden, no_mask)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_sinks_add_to_each_rows_denominator(softcap, causal):
    """softmax over [scores, sinks], the sink columns dropped: as GPT-OSS computes it, in float64."""
    q, k, v = _qkv(2, 4, 2, 5, 6, 3, seed=21)
    mask = rand(2, 1, 5, 6, seed=22)
    sinks = torch.randn(4) * 2
    out = ops.attention(q, k, v, mask, 0.5, causal, softcap, sinks.reshape(1, 4, 1, 1))
    kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    scores = q.double() @ kk.transpose(-1, -2) * 0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + mask.double()
    if causal:
        scores = scores.masked_fill(torch.ones(5, 6, dtype=torch.bool).triu(1), float("-inf"))
    joined = torch.cat([scores, sinks.double().reshape(1, 4, 1, 1).expand(2, 4, 5, 1)], -1)
    expected = (torch.softmax(joined, -1)[..., :6] @ vv).float()
    torch.testing.assert_close(out, expected, **F32)
    without = ops.attention(q, k, v, mask, 0.5, causal, softcap)
    assert not torch.allclose(out, without, atol=1e-3)


@pytest.mark.parametrize("case", ["keep-all", "causal-mask", "padded-bool", "causal-only", "softcap", "sinks"])
def test_traceable_attention_computes_what_attention_does(case):
    """The form Inductor traces: the same numbers as the op on every kind of mask, under make_fx (no value
    read), with SDPA in the trace where the op would run it and no mask analysis."""
    from torch.fx.experimental.proxy_tensor import make_fx

    B, Sq, Sk = 2, 5, 5
    q, k, v = _qkv(B, 6, 2, Sq, Sk, 4, seed=21)
    mask, causal, softcap, sinks = None, False, None, None
    if case == "keep-all":
        mask = torch.zeros(B, 1, Sq, Sk)
    elif case == "causal-mask":
        mask, causal = rand(B, 1, Sq, Sk, seed=22), True
    elif case == "padded-bool":
        mask = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
        mask[0, ..., :2] = False
    elif case == "causal-only":
        causal = True
    elif case == "softcap":
        softcap = 2.0
    else:
        sinks = rand(1, 6, 1, 1, seed=23)
    args = (q, k, v, mask, None, causal, softcap, sinks)
    expected = ops.attention(*args)
    traced = make_fx(dialect.traceable_attention, tracing_mode="fake")(*args)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert any("scaled_dot_product" in str(t) for t in targets) == (case not in ("softcap", "sinks"))
    assert torch.ops.aten.all.default not in targets and torch.ops.aten.equal.default not in targets
    torch.testing.assert_close(traced(*args), expected, **F32)
