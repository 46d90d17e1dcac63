"""The attention template: every generated variant against the float64 reference; source text and cache."""

from __future__ import annotations

import ast
import itertools

import pytest
import torch

from fxfuse.kernels import AttentionVariant, attention, alibi_slopes, get_kernel, render
from fxfuse.kernels import _template
from tests.kernels.refs import DEVICE, assert_close, rand, ref_attention

VARIANTS = list(itertools.product([False, True], ["none", "bool", "float"], [None, 2.5], [False, True],
                                  [False, True]))


def _ids(v):
    causal, mask, softcap, window, alibi = v
    return "-".join(filter(None, ["causal" if causal else "full", mask, softcap and "cap", window and "win",
                                  alibi and "alibi"]))


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_every_variant_matches_reference(variant):
    causal, mask_kind, softcap, window, alibi = variant
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 2, 18, 21, 16
    q = rand(B, Hq, Sq, D, seed=1, scale=2.0)
    k, v = rand(B, Hkv, Sk, D, seed=2), rand(B, Hkv, Sk, D, seed=3)
    mask = None
    if mask_kind == "float":
        mask = rand(B, 1, Sq, Sk, seed=4)
    elif mask_kind == "bool":
        g = torch.Generator().manual_seed(5)
        mask = (torch.rand(B, 1, Sq, Sk, generator=g) > 0.3).to(DEVICE)
    slopes = alibi_slopes(Hq, DEVICE) if alibi else None
    win = 6 if window else None
    expected = ref_attention(q, k, v, mask, 0.3, causal, softcap, win, slopes)
    for splits in (1, 3):  # the blocked prefill loop, and split-KV with its reduction
        out = attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True, softcap=softcap,
                        window=win, alibi_slopes=slopes, num_splits=splits)
        assert not out.isnan().any()
        assert_close(out, expected)
    # decoding shape (packed GQA rows)
    out = attention(q[:, :, :1], k, v, attn_mask=None if mask is None else mask[:, :, :1], is_causal=causal,
                    scale=0.3, enable_gqa=True, softcap=softcap, window=win, alibi_slopes=slopes)
    assert_close(out, ref_attention(q[:, :, :1], k, v, None if mask is None else mask[:, :, :1], 0.3, causal,
                                    softcap, win, slopes))


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_generated_source_has_only_what_the_variant_uses(variant):
    causal, mask, softcap, window, alibi = variant
    v = AttentionVariant(scale=0.125, causal=causal, softcap=softcap, mask=mask, window=window, alibi=alibi)
    src = render(v)
    ast.parse(src)
    assert "#if" not in src and "#endif" not in src and "$" not in src
    body = src.split('"""', 2)[2]  # after the module docstring
    assert ("tl.sigmoid" in body) == (softcap is not None)
    assert ("<= qi[:, None]" in body) == causal
    assert ("- WINDOW" in body) == window
    assert ("Slopes + head" in body) == alibi
    assert ("keep != 0" in body) == (mask == "bool")
    assert ("M_rows[:, None]" in body) == (mask != "none")
    assert ("tl.math.exp2" in body) == (mask != "float")
    assert _template.kernel_name(v) in src


def test_scale_and_cap_are_literals():
    src = render(AttentionVariant(scale=0.25, softcap=30.0, mask="float"))
    assert "0.25" in src and "30.0" in src
    src = render(AttentionVariant(scale=0.25))
    assert repr(0.25 * _template.LOG2E) in src


def test_compiled_once_written_and_cached(tmp_path):
    _template.set_source_dir(tmp_path)
    try:
        v = AttentionVariant(scale=0.0987654321, causal=True, mask="bool")
        first = get_kernel(v)
        assert get_kernel(v) is first
        assert first.path.parent == tmp_path and first.path.read_text() == first.source
        assert first.kernel.__name__ == first.name
        assert any(g is first for g in _template.compiled_variants())
    finally:
        _template.set_source_dir(None)


def test_variant_validation():
    with pytest.raises(ValueError, match="mask kind"):
        AttentionVariant(scale=1.0, mask="int")
    with pytest.raises(ValueError, match="softcap"):
        AttentionVariant(scale=1.0, softcap=0.0)
    a, b = AttentionVariant(scale=0.5, causal=True), AttentionVariant(scale=0.5, causal=True)
    assert a == b and hash(a) == hash(b) and _template.kernel_name(a) == _template.kernel_name(b)
    assert _template.kernel_name(AttentionVariant(scale=0.5)) != _template.kernel_name(AttentionVariant(scale=0.25))
