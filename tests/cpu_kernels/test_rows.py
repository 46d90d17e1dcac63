"""fxfuse's decode-sized row ops (RMSNorm, add + RMSNorm, rotary embedding) against the dialect's references."""

from __future__ import annotations

import pytest
import torch

from fxfuse.cpu_kernels import build, rows
from fxfuse.ir.dialect import REFERENCE

pytestmark = pytest.mark.skipif(not build.available(), reason="fxfuse's CPU kernels could not be built here")


@pytest.mark.parametrize("shape", [(1, 1, 577), (3, 2, 64), (5, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_and_add_rms_norm_match_the_reference(shape, weighted):
    g = torch.Generator().manual_seed(sum(shape))
    x, residual = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
    w = torch.randn(shape[-1], generator=g) if weighted else None
    torch.testing.assert_close(rows.rms_norm(x, w, 1e-6), REFERENCE["rms_norm"](x, w, 1e-6), rtol=2e-6, atol=1e-6)
    (normed, total), (ref_normed, ref_total) = rows.add_rms_norm(x, residual, w, 1e-5), \
        REFERENCE["add_rms_norm"](x, residual, w, 1e-5)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(normed, ref_normed, rtol=2e-6, atol=1e-6)


def test_rms_norm_eps_matters():
    x = torch.full((1, 4), 1e-3)
    assert not torch.allclose(rows.rms_norm(x, None, 1e-6), rows.rms_norm(x, None, 1e-2))
    torch.testing.assert_close(rows.rms_norm(x, None, 1e-2), REFERENCE["rms_norm"](x, None, 1e-2))


@pytest.mark.parametrize("rot_dim", [64, 32])  # full and partial rotary
def test_rope_matches_the_reference_in_any_layout(rot_dim):
    g = torch.Generator().manual_seed(rot_dim)
    # A decode step's q: (B, S, H, D) projections viewed as (B, H, S, D); k laid out (B, H, S, D).
    q = torch.randn(2, 1, 9, 64, generator=g).permute(0, 2, 1, 3)
    k = torch.randn(2, 3, 1, 64, generator=g)
    cos, sin = torch.randn(2, 1, 1, rot_dim, generator=g), torch.randn(2, 1, 1, rot_dim, generator=g)
    (gq, gk), (rq, rk) = rows.rope(q, k, cos, sin), REFERENCE["rope"](q, k, cos, sin, False)
    assert rows.rope(q, k, torch.randn(3, 1, 1, rot_dim), torch.randn(3, 1, 1, rot_dim)) is None  # past q
    torch.testing.assert_close(gq, rq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gk, rk, rtol=1e-6, atol=1e-6)
    assert torch.equal(gq[..., rot_dim:], q[..., rot_dim:])  # the pass-through dims are copied


def test_rope_rejects_mismatched_cos_and_sin():
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(RuntimeError, match="one shape"):
        rows.rope(q, q, torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 4))
    with pytest.raises(RuntimeError, match="float32"):
        rows.rms_norm(q.double(), None, 1e-6)


def test_eligibility():
    assert rows.eligible(torch.randn(64, 8), torch.randn(8))
    assert not rows.eligible(torch.randn(65, 8))  # a prefill: the ATen forms use every thread
    assert not rows.eligible(torch.randn(2, 8).bfloat16())
