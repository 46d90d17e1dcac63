"""fxfuse's skinny GEMM kernel against F.linear: odd sizes, epilogues, strided weights, threads, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxfuse.cpu_kernels import build, skinny_gemm

pytestmark = pytest.mark.skipif(not build.available(), reason="fxfuse's CPU kernels could not be built here")

ACTS = {"none": lambda y: y, "relu": F.relu, "silu": F.silu, "gelu": F.gelu,
        "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


def _within_rounding(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` equals ``exact`` (a float64 result) to float32 rounding of a K-term dot product: the error is
    at most a few ulps of sum |x_i w_i| (the bound of a reordered float32 sum)."""
    scale = (x.double().abs() @ w.double().abs().T) + exact.abs()
    error = (got.double() - exact).abs()
    assert (error <= 4 * x.shape[-1] ** 0.5 * 2**-23 * scale + 1e-30).all(), float((error / scale).max())


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 5), (33, 67), (577, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64_at_odd_sizes(rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = skinny_gemm.linear(x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    _within_rounding(got, x, w, exact)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_epilogue_activations_and_residual(act):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 1, 45, generator=g), torch.randn(29, 45, generator=g), torch.randn(29, generator=g)
    residual = torch.randn(2, 1, 29, generator=g)
    expected = ACTS[act](F.linear(x, w, b))
    torch.testing.assert_close(skinny_gemm.linear(x, w, b, act), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skinny_gemm.linear(x, w, b, act, residual), expected + residual, rtol=1e-5, atol=1e-5)
    assert skinny_gemm.linear(x, w, b, act).shape == (2, 1, 29)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_streams_gate_and_up_together(act, bias):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 51, generator=g)
    wg, wu = torch.randn(37, 51, generator=g), torch.randn(37, 51, generator=g)
    bg, bu = (torch.randn(37, generator=g), torch.randn(37, generator=g)) if bias else (None, None)
    expected = ACTS[act](F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    torch.testing.assert_close(skinny_gemm.gated(x, wg, bg, wu, bu, act), expected, rtol=1e-5, atol=1e-5)


def test_strided_weight_and_input_views():
    """A weight that is a column slice of a wider matrix (row stride > in-features), a transposed input."""
    g = torch.Generator().manual_seed(3)
    wide, xt = torch.randn(40, 100, generator=g), torch.randn(33, 2, generator=g)
    w, x = wide[:, 10:43], xt.t()
    assert w.stride() == (100, 1) and not x.is_contiguous()
    torch.testing.assert_close(skinny_gemm.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_one_and_two_threads_agree():
    """Output rows are split over the threads; every output is one thread's dot product: bit-identical."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(1, 300, generator=g), torch.randn(1000, 300, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = skinny_gemm.linear(x, w)
        torch.set_num_threads(2)
        two = skinny_gemm.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_operands_raise_saying_what_is_wrong():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="float32 only"):
        skinny_gemm.linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match="does not match the weight's in-features"):
        skinny_gemm.linear(torch.randn(1, 9), w)
    with pytest.raises(RuntimeError, match="unit stride"):
        skinny_gemm.linear(x, torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match="bias must be"):
        skinny_gemm.linear(x, w, torch.randn(5))
    with pytest.raises(RuntimeError, match="residual must be"):
        skinny_gemm.linear(x, w, None, "none", torch.randn(1, 5))
    with pytest.raises(RuntimeError, match="out-features"):
        skinny_gemm.gated(x, w, None, torch.randn(5, 8), None, "silu")


def test_eligibility():
    x, w = torch.randn(16, 8), torch.randn(4, 8)
    assert skinny_gemm.eligible(x, w) and skinny_gemm.eligible(x[:1], w, torch.randn(4))
    assert not skinny_gemm.eligible(torch.randn(17, 8), w)  # more rows than MAX_ROWS: a BLAS kernel's job
    assert not skinny_gemm.eligible(x.half(), w.half())
    assert not skinny_gemm.eligible(x, torch.randn(8, 4).t())  # (in, out) storage
    assert not skinny_gemm.eligible(x, w, torch.randn(8)[::2])  # strided bias
    assert not skinny_gemm.eligible(x, w.requires_grad_())
    with torch.no_grad():
        assert skinny_gemm.eligible(x, w)
