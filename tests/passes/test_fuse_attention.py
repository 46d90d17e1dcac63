"""fuse-attention: the eager and SDPA spellings become one fxfuse.attention, GQA without copies."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch.testing import FileCheck

from fxfuse.ir.numerics import compare
from fxfuse.passes import PASSES
from tests.helpers import captured as capture_any, count, run_pipeline

aten = torch.ops.aten
ATTN = torch.ops.fxfuse.attention.default
PIPELINE = ["remove-dropout", "canonicalize", "dce", "cse", "fuse-attention", "dce"]


def captured(module, *args):
    """Capture with batch and sequence dynamic: dims 0 and 2 of (B, H, S, D) tensors, 0, 2, 3 of masks."""
    auto = torch.export.Dim.AUTO
    names = ["q", "k", "v", "mask"][: len(args)]
    shapes = {n: {0: auto, 2: auto, **({3: auto} if n == "mask" else {})} for n in names}
    return capture_any(module, *args, dynamic_shapes=shapes)


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Eager(torch.nn.Module):
    """Attention as BERT/LLaMA spell it: matmul, scale, additive mask, softmax, dropout, matmul."""

    def __init__(self, scale_by: str = "mul", groups: int = 1, return_probs: bool = False) -> None:
        super().__init__()
        self.scale_by, self.groups, self.return_probs = scale_by, groups, return_probs

    def forward(self, q, k, v, mask):
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if self.scale_by == "mul":
            scores = scores * (1 / math.sqrt(q.shape[-1]))
        else:
            scores = scores / math.sqrt(q.shape[-1])
        probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=0.1, training=self.training)
        out = torch.matmul(probs, v)
        return (out, probs) if self.return_probs else out


def inputs(groups=1, b=2, h=4, s=6, d=8):
    torch.manual_seed(0)
    q = torch.randn(b, h, s, d)
    k, v = torch.randn(b, h // groups, s, d), torch.randn(b, h // groups, s, d)
    mask = torch.zeros(b, 1, s, s)
    mask[1, ..., -2:] = torch.finfo(torch.float32).min
    return q, k, v, mask


@pytest.mark.parametrize("scale_by", ["mul", "div"])
def test_eager_attention_is_fused(scale_by):
    args = inputs()
    gm = captured(Eager(scale_by), *args)
    results = run_pipeline(gm, PIPELINE, *args)
    fuse = next(r for r in results if r.name == "fuse-attention")
    assert fuse.rewrites["eager_attention"] == 1
    assert count(gm, ATTN) == 1
    assert count(gm, aten.softmax.int) == 0 and count(gm, aten.matmul.default) == 0
    FileCheck().check("torch.ops.fxfuse.attention.default(").check_not("softmax").run(gm.code)


def test_fused_op_carries_the_scale_and_mask():
    args = inputs()
    gm = captured(Eager(), *args)
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    q, k, v, mask, scale, causal, softcap = node.args
    assert scale == pytest.approx(1 / math.sqrt(8))
    assert mask.op == "placeholder" and causal is False and softcap is None


def test_repeat_kv_is_folded_into_the_op():
    args = inputs(groups=2)
    gm = captured(Eager(groups=2), *args)
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[1].meta["val"].shape[1] == 2  # two key/value heads read by four query heads
    assert count(gm, aten.expand.default) == 0


def test_sdpa_call_is_fused():
    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask > -1)

    args = inputs(groups=2)
    gm = captured(Sdpa(), *args)
    run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ATTN) == 1 and count(gm, aten.scaled_dot_product_attention.default) == 0


def test_causal_sdpa_keeps_causal_flag():
    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    args = inputs()[:3]
    gm = captured(Causal(), *args)
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[5] is True


def test_attention_whose_probabilities_are_returned_is_not_fused():
    args = inputs()
    gm = captured(Eager(return_probs=True), *args)
    results = run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ATTN) == 0
    fuse = next(r for r in results if r.name == "fuse-attention")
    assert not fuse.changed
    (why,) = fuse.rejections
    assert why.rule == "eager_attention" and "also read by" in why.reason


def test_active_attention_dropout_is_not_fused():
    class Train(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    args = inputs()[:3]
    gm = captured(Train(), *args)
    result = PASSES["fuse-attention"](gm)
    assert count(gm, ATTN) == 0 and not result.changed
    assert "dropout is active" in result.rejections[0].reason


def test_second_run_changes_nothing():
    args = inputs(groups=2)
    gm = captured(Eager(groups=2), *args)
    run_pipeline(gm, PIPELINE, *args)
    again = run_pipeline(gm, PIPELINE, *args)
    assert not any(r.changed for r in again)


def test_fused_graph_runs_at_other_shapes():
    args = inputs()
    model = Eager()
    gm = captured(model, *args)
    run_pipeline(gm, PIPELINE, *args)
    other = inputs(b=3, s=9)
    with torch.no_grad():
        assert compare(model(*other), gm(*other)).ok


# -- spellings of the score chain ------------------------------------------------------------------------------


class Variant(torch.nn.Module):
    """One attention spelling of many, selected by name; inputs (q, k, v, pad) with pad a (B, Sk) 0/1 tensor."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, pad):
        d = q.shape[-1]
        keep = pad[:, None, None, :].bool()  # (B, 1, 1, Sk)
        kind = self.kind
        if kind == "masked_fill":  # BERT-style boolean mask, filled with the dtype's min
            s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        elif kind == "where_inf":  # boolean keep mask, -inf fill: SDPA's boolean semantics
            s = torch.where(keep, (q @ k.transpose(-1, -2)) * d**-0.5, float("-inf"))
        elif kind == "triu_causal":  # causal mask built from triu, plus padding
            sq, sk = q.shape[-2], k.shape[-2]
            future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
            s = (q @ k.transpose(-1, -2)) * d**-0.5
            s = s.masked_fill(future, float("-inf")) + (1.0 - pad[:, None, None, :]) * -1e9
        elif kind == "arange_causal":
            i = torch.arange(q.shape[-2])[:, None]
            j = torch.arange(k.shape[-2])[None, :]
            s = torch.where(j <= i, (q * d**-0.5) @ k.transpose(-1, -2), torch.finfo(q.dtype).min)
        elif kind == "scale_in_k":  # DeBERTa: the scale divides kᵀ
            s = q @ (k.transpose(-1, -2) / math.sqrt(d))
            s = s + (1.0 - pad[:, None, None, :]) * -1e4
        elif kind == "softcap":  # Gemma 2
            s = (q @ k.transpose(-1, -2)) * d**-0.5
            s = torch.tanh(s / 5.0) * 5.0
            s = s + (1.0 - pad[:, None, None, :]) * -1e4
        elif kind == "two_biases":  # T5: relative position bias, then the padding mask, no scale
            pos = torch.arange(k.shape[-2])[None, :] - torch.arange(q.shape[-2])[:, None]
            s = q @ k.transpose(-1, -2) + pos.float().abs().neg()[None, None] * 0.1
            s = s + (1.0 - pad[:, None, None, :]) * torch.finfo(q.dtype).min
        elif kind == "fp32_upcast":  # half-precision models: softmax in fp32, cast back
            s = ((q @ k.transpose(-1, -2)) * d**-0.5).float() + (1.0 - pad[:, None, None, :]) * -1e4
        elif kind == "bool_add":  # arithmetic on a boolean: +1 where True, +0 where False (not a keep-mask)
            s = (q @ k.transpose(-1, -2)) * d**-0.5 + keep
        elif kind == "int_add":  # arithmetic on an integer mask
            s = (q @ k.transpose(-1, -2)) * d**-0.5 + pad[:, None, None, :].long() * 3
        elif kind == "number_bias":  # a Python number added, then a -inf boolean fill
            s = ((q @ k.transpose(-1, -2)) * d**-0.5 + 0.5).masked_fill(~keep, float("-inf"))
        elif kind == "sub_bias":  # the mask subtracted
            s = (q @ k.transpose(-1, -2)) * d**-0.5 - (1.0 - pad[:, None, None, :]) * 1e4
        elif kind == "expand_as":  # the scores' shape read by the mask: not a second use of their values
            s = (q @ k.transpose(-1, -2)) * d**-0.5
            s = s.masked_fill(~keep.expand_as(s), torch.finfo(s.dtype).min) + s.new_zeros(s.shape[-1])
        elif kind == "softmax_dtype":  # softmax with a dtype argument, then a clone of the probabilities
            s = (q @ k.transpose(-1, -2)) * d**-0.5 + (1.0 - pad[:, None, None, :]) * -1e4
            return torch.softmax(s, dim=-1, dtype=torch.float32).clone().to(v.dtype) @ v
        elif kind == "safe_softmax":
            s = ((q @ k.transpose(-1, -2)) * d**-0.5).masked_fill(~keep, float("-inf"))
            return torch.ops.aten._safe_softmax(s, -1).to(v.dtype) @ v
        else:
            raise ValueError(kind)
        return torch.softmax(s, dim=-1).to(v.dtype) @ v


class Bmm3d(torch.nn.Module):
    """3-D (batch·heads) attention: bmm; BLOOM's baddbmm with an ALiBi bias and a 4-D view for the mask; or
    bmm scores viewed as 4-D for the mask and back to 3-D for the softmax (the round trip)."""

    def __init__(self, alibi: bool, round_trip: bool = False) -> None:
        super().__init__()
        self.alibi, self.round_trip = alibi, round_trip

    def forward(self, q, k, v, pad):
        b, h, s, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
        if self.round_trip:
            scores = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, s, -1) * d**-0.5
            scores = scores + (1.0 - pad[:, None, None, :]) * -1e4
            probs = torch.softmax(scores.view(b * h, s, -1), dim=-1)
        elif self.alibi:
            slopes = 2.0 ** (-torch.arange(1, h + 1, dtype=q.dtype))
            bias = (slopes[:, None] * torch.arange(k.shape[2], dtype=q.dtype)[None, :])  # (h, Sk)
            bias = bias[None].expand(b, h, -1).reshape(b * h, 1, -1)
            scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=1.0, alpha=d**-0.5)
            scores = scores.view(b, h, s, -1).masked_fill(~pad[:, None, None, :].bool(), torch.finfo(q.dtype).min)
            probs = torch.softmax(scores, dim=-1).view(b * h, s, -1)
        else:
            scores = torch.bmm(q3, k3.transpose(1, 2)) * d**-0.5
            probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v3).view(b, h, s, d)


def variant_inputs(b=2, h=4, sq=6, sk=6, d=8, hkv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, hkv or h, sk, d, generator=gen).to(dtype) for _ in range(2))
    pad = torch.ones(b, sk)
    pad[-1, -min(2, sk - 1):] = 0  # padding, but never a whole row: that is NaN in eager, 0 in SDPA
    return q, k, v, pad


def _capture_variant(model, args):
    auto = torch.export.Dim.AUTO
    return capture_any(model, *args, dynamic_shapes={"q": {0: auto, 2: auto}, "k": {0: auto, 2: auto},
                                                     "v": {0: auto, 2: auto}, "pad": {0: auto, 1: auto}})


def assert_same_outputs(model, gm, args) -> None:
    with torch.no_grad():
        outcome = compare(model(*args), gm(*args))
    assert outcome.ok, outcome.detail


VARIANTS = ["masked_fill", "where_inf", "triu_causal", "arange_causal", "scale_in_k", "softcap", "two_biases",
            "fp32_upcast", "bool_add", "int_add", "number_bias", "sub_bias", "expand_as", "softmax_dtype",
            "safe_softmax"]


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_score_spelling_is_fused(kind):
    args = variant_inputs()
    model = Variant(kind)
    gm = _capture_variant(model, args)
    run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ATTN) == 1
    assert count(gm, aten.softmax.int) + count(gm, aten._safe_softmax.default) + count(gm, aten.matmul.default) \
        + count(gm, aten.tanh.default) == 0
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    scale, softcap = node.args[4], node.args[6]
    expected_scale = 1.0 if kind == "two_biases" else 8**-0.5
    assert scale == pytest.approx(expected_scale) and softcap == (5.0 if kind == "softcap" else None)
    assert_same_outputs(model, gm, variant_inputs(b=3, sq=9, sk=9, seed=1))


def test_a_lone_minus_inf_keep_mask_stays_boolean():
    args = variant_inputs()
    gm = _capture_variant(Variant("where_inf"), args)
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[3].meta["val"].dtype == torch.bool


def test_fully_masked_rows_keep_the_models_values():
    """A finite fill makes a fully masked row uniform, not NaN; the fused mask must keep that."""
    args = variant_inputs()
    model = Variant("masked_fill")
    gm = _capture_variant(model, args)
    run_pipeline(gm, PIPELINE, *args)
    q, k, v, pad = variant_inputs(seed=2)
    pad[0] = 0
    with torch.no_grad():
        ref, out = model(q, k, v, pad), gm(q, k, v, pad)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("alibi,round_trip", [(False, False), (True, False), (False, True)],
                         ids=["bmm", "baddbmm_alibi", "view_round_trip"])
def test_three_dimensional_attention_is_fused(alibi, round_trip):
    args = variant_inputs()
    model = Bmm3d(alibi, round_trip)
    gm = _capture_variant(model, args)
    run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ATTN) == 1
    assert count(gm, aten.bmm.default) + count(gm, aten.baddbmm.default) + count(gm, aten.softmax.int) == 0
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    q = node.args[0].meta["val"]
    # the 4-D view gives the heads; plain bmm has none
    assert q.dim() == 4 and q.shape[1] == (4 if alibi or round_trip else 1)
    assert_same_outputs(model, gm, variant_inputs(b=3, sq=7, sk=7, seed=3))


@pytest.mark.parametrize("d", [12, 80])
def test_cross_attention_and_odd_head_dims(d):
    """Queries and keys of different lengths (cross-attention), head dims that are not powers of two."""
    args = variant_inputs(sq=5, sk=7, d=d)
    model = Variant("masked_fill")
    gm = _capture_variant(model, args)
    run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ATTN) == 1
    assert_same_outputs(model, gm, variant_inputs(b=1, sq=3, sk=10, d=d, seed=4))


def test_scores_scaled_by_a_tensor_are_rejected_with_the_reason():
    class TensorScale(torch.nn.Module):
        def forward(self, q, k, v, temperature):
            return torch.softmax((q @ k.transpose(-1, -2)) * temperature, dim=-1) @ v

    q, k, v, _ = variant_inputs()
    temperature = torch.rand(1, 4, 1, 1)
    gm = capture_any(TensorScale(), q, k, v, temperature)
    result = PASSES["fuse-attention"](gm)
    assert count(gm, ATTN) == 0 and not result.changed
    (why,) = result.rejections
    assert why.rule == "eager_attention" and "multiplied by a tensor" in why.reason


def test_softcap_after_the_mask_is_rejected():
    """cap(s + mask) is not cap(s) + mask: the op cannot express it, so it must not fuse."""
    class CapAfterMask(torch.nn.Module):
        def forward(self, q, k, v, bias):
            s = q @ k.transpose(-1, -2) + bias
            return torch.softmax(torch.tanh(s / 5.0) * 5.0, dim=-1) @ v

    q, k, v, _ = variant_inputs()
    bias = torch.randn(2, 1, 6, 6)
    gm = capture_any(CapAfterMask(), q, k, v, bias)
    results = run_pipeline(gm, PIPELINE, q, k, v, bias)
    assert count(gm, ATTN) == 0
    (why,) = next(r for r in results if r.name == "fuse-attention").rejections
    assert "soft-capped after a bias" in why.reason


class Generic(torch.nn.Module):
    """Eager GQA attention with a chosen mask form; the property test's subject."""

    def __init__(self, groups: int, mask_kind: str) -> None:
        super().__init__()
        self.groups, self.mask_kind = groups, mask_kind

    def forward(self, q, k, v, pad):
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        if self.mask_kind == "float":
            s = s + (1.0 - pad[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
        elif self.mask_kind == "bool":
            s = s.masked_fill(pad[:, None, None, :] == 0, float("-inf"))
        probs = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv_heads=st.integers(1, 3), groups=st.sampled_from([1, 2, 3]), sq=st.integers(2, 7), sk=st.integers(2, 7),
    d=st.sampled_from([4, 6, 16]), mask_kind=st.sampled_from(["none", "float", "bool"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_any_gqa_shape_mask_and_dtype_fuses_and_keeps_numerics(kv_heads, groups, sq, sk, d, mask_kind, dtype):
    q, k, v, pad = variant_inputs(b=2, h=kv_heads * groups, hkv=kv_heads, sq=sq, sk=sk, d=d, dtype=dtype)
    model = Generic(groups, mask_kind)
    gm = _capture_variant(model, (q, k, v, pad))
    run_pipeline(gm, PIPELINE, q, k, v, pad)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[1].meta["val"].shape[1] == kv_heads  # no materialized repeat
    assert not any(r.changed for r in run_pipeline(gm, PIPELINE, q, k, v, pad))
    other = variant_inputs(b=3, h=kv_heads * groups, hkv=kv_heads, sq=sq + 2, sk=sk + 1, d=d, dtype=dtype, seed=5)
    assert_same_outputs(model, gm, other)


@pytest.mark.parametrize("spelling", ["repeat_interleave", "repeat"])
def test_repeat_interleave_is_grouped_query_attention_but_repeat_is_not(spelling):
    class Repeated(torch.nn.Module):
        def forward(self, q, k, v, pad):
            k, v = (getattr(t, spelling)(2, dim=1) if spelling == "repeat_interleave" else t.repeat(1, 2, 1, 1)
                    for t in (k, v))
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v

    args = variant_inputs(h=4, hkv=2)
    model = Repeated()
    gm = _capture_variant(model, args)
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[1].meta["val"].shape[1] == (2 if spelling == "repeat_interleave" else 4)
    assert_same_outputs(model, gm, variant_inputs(b=3, h=4, hkv=2, sq=7, sk=7, seed=6))


@pytest.mark.parametrize("fill", [-1e4, -1e9])
def test_a_mild_fill_is_refused_because_a_fully_masked_row_would_differ(fill):
    """masked_fill(s, drop, -1e4) makes a fully masked row uniform; s + where(drop, -1e4, 0) does not."""

    class MildFill(torch.nn.Module):
        def forward(self, q, k, v, pad):
            s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            return torch.softmax(s.masked_fill(pad[:, None, None, :] == 0, fill), -1) @ v

    args = variant_inputs()
    gm = _capture_variant(MildFill(), args)
    results = run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ATTN) == 0
    (rejection,) = next(r for r in results if r.name == "fuse-attention").rejections
    assert f"replaced by {fill:g}" in rejection.reason and "finfo(float32).min" in rejection.reason


class Sinks(torch.nn.Module):
    """GPT-OSS attention: learned per-head sink logits joined to the scores, a row-max shift, then dropped."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(heads))

    def forward(self, q, k, v, pad):
        b, h, s, _ = q.shape
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + (1.0 - pad[:, None, None, :]) * -1e9
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)
        joined = torch.cat([scores, sinks], dim=-1)
        joined = joined - joined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(joined, dim=-1, dtype=joined.dtype)[..., :-1]
        return probs.to(v.dtype) @ v


def test_attention_sinks_are_fused_into_the_op():
    args = variant_inputs()
    model = Sinks().eval()
    gm = _capture_variant(model, args)
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert len(node.args) == 8 and node.args[7].meta["val"].shape[-1] == 1
    assert count(gm, aten.cat.default) + count(gm, aten.softmax.int) + count(gm, aten.max.dim) == 0
    assert_same_outputs(model, gm, variant_inputs(b=3, sq=9, sk=9, seed=4))


class SharedProbabilities(torch.nn.Module):
    """One softmax read by two value products (DiffLlama's two halves of V, once CSE merged their score chains)."""

    def forward(self, q, k, v, pad):
        probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + (1.0 - pad[:, None, None, :]) * -1e4,
                              dim=-1)
        return torch.cat([probs @ v, probs @ (2 * v)], dim=-1)


def test_probabilities_read_by_two_value_products_make_two_attentions():
    args = variant_inputs()
    model = SharedProbabilities()
    gm = _capture_variant(model, args)
    run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ATTN) == 2 and count(gm, aten.softmax.int) == 0
    assert_same_outputs(model, gm, variant_inputs(b=3, sq=7, sk=7, seed=5))


class SdpaGrouped(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)


@pytest.mark.parametrize("module,spelling", [(Eager(groups=2), aten.bmm.default),
                                             (SdpaGrouped(), aten._scaled_dot_product_flash_attention_for_cpu.default)],
                         ids=["eager", "sdpa"])
def test_attention_traced_below_autograd_is_fused_with_its_kv_heads(module, spelling):
    """The spelling of a graph traced through a tensor subclass (DTensor): matmul as expand, reshape, bmm and
    _unsafe_view, SDPA as the CPU's flash kernel. One attention op on the two K/V heads, no repeat_kv left."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args = inputs(groups=2)
    gm = make_fx(module.eval(), tracing_mode="fake")(*args)
    assert count(gm, spelling) >= 1
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[1].meta["val"].shape[1] == 2 and node.args[2].meta["val"].shape[1] == 2
    assert count(gm, aten.expand.default) == 0 and count(gm, aten.bmm.default) == 0
