"""Blocks the differential fuzzer found wrong or unfused, each shrunk to its minimal Spec and kept as a test."""

from __future__ import annotations

from tests.fuzz.grammar import Spec
from tests.fuzz.test_fuzz import check_block

BASE = dict(heads=2, kv_heads=1, head_dim=4, attention="eager", layout="4d", repeat="expand", scale="mul",
            mask_input="none", mask_steps=(), softmax="F", copies=False, clone_probs=False, return_probs=False,
            softcap=False, pre_norm="none", post_norm="none", mlp="gelu", dtype="float32", all_true_example=False,
            batch=1, seq=1)


def test_a_four_d_additive_mask_from_a_one_by_one_example_runs_at_other_lengths():
    """The (batch, 1, query, key) mask's query and key dims stayed static: InputError at another length."""
    check_block(Spec(**{**BASE, "attention": "sdpa", "mask_input": "additive"}))


def test_layer_norm_over_the_read_hidden_size_fuses():
    """F.layer_norm(x, (x.shape[-1],)) normalized over a symbolic size when every dim was made dynamic."""
    check_block(Spec(**{**BASE, "pre_norm": "layer_norm_fn", "return_probs": True}))


def test_a_mild_where_fill_with_a_causal_mask_is_refused_not_fused_wrong():
    """where(keep, s, -1e4) then a causal fill: left padding masks whole rows, which the model makes uniform;
    the fused op added -1e4 instead and differed there (relative error 2.7e-3)."""
    check_block(Spec(**{**BASE, "mask_input": "additive", "mask_steps": ("where_mild", "causal_triu")}))


def test_a_causal_minus_inf_stays_minus_inf_when_a_float32_mask_is_cast_to_bfloat16():
    """where(causal, s, -inf) + finfo.min padding in bf16: the float32 mask was clamped to the bf16 range, turning
    -inf into finfo.min, so a left-padded query row spread over its future keys too (relative error 7.6e-2)."""
    check_block(Spec(**{**BASE, "mask_input": "additive", "mask_steps": ("causal_arange", "additive"),
                        "clone_probs": True, "dtype": "bfloat16"}))


def test_scores_added_to_in_place_through_a_view_fuse():
    """bmm scores viewed as 4-D, then ``s += mask``: the in-place add on a view was not made functional, so the
    score chain stopped at ``add_`` and the attention was left unfused."""
    check_block(Spec(**{**BASE, "kv_heads": 2, "layout": "bmm3d", "mask_input": "bool",
                        "mask_steps": ("additive_inplace",)}))
