"""gated_mlp_act and gelu kernels against float64 references and the dialect ops."""

from __future__ import annotations

import math

import pytest
import torch

import fxfuse  # noqa: F401
from fxfuse.kernels import gated_mlp_act, gelu
from tests.kernels.refs import DTYPES, ON_GPU, assert_close, rand

ops = torch.ops.fxfuse
# the interpreter evaluates σ(x) = 1/(1 + exp(-x)) in numpy, which warns when exp overflows to inf (the result is right)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

ACTS = {
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}
GELUS = {"none": ACTS["gelu"], "tanh": ACTS["gelu_tanh"], "sigmoid": lambda x: x / (1 + torch.exp(-1.702 * x))}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 1029)], ids=str)
def test_gated_mlp_act(act, dtype, shape):
    gate = rand(*shape, seed=1, dtype=dtype, scale=3.0)
    up = rand(*shape, seed=2, dtype=dtype)
    out = gated_mlp_act(gate, up, act)
    assert_close(out, (ACTS[act](gate.double()).to(dtype).double() * up.double()).to(dtype))
    assert_close(out, ops.gated_mlp_act(gate, up, act))


@pytest.mark.parametrize("up_shape", [(11,), (3, 1, 11), (1, 5, 11)], ids=str)
def test_gated_mlp_act_broadcast(up_shape):
    gate = rand(3, 5, 11, seed=3)
    up = rand(*up_shape, seed=4)
    assert_close(gated_mlp_act(gate, up, "silu"), ops.gated_mlp_act(gate, up, "silu"))


def test_gated_mlp_act_strided_halves():
    """gate and up as the two halves of one fused projection (Phi-3's gate_up_proj)."""
    both = rand(4, 6, 2 * 13, seed=5)
    gate, up = both[..., :13], both[..., 13:]
    assert_close(gated_mlp_act(gate, up, "gelu"), ops.gated_mlp_act(gate, up, "gelu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", list(GELUS))
def test_gelu(approximate, dtype):
    x = rand(3, 7, 13, seed=6, dtype=dtype, scale=4.0)
    out = gelu(x, approximate)
    assert_close(out, GELUS[approximate](x.double()).to(dtype))
    assert_close(out, ops.gelu(x, approximate))


def test_gelu_tails_do_not_overflow():
    x = torch.tensor([-1e4, -80.0, -20.0, 0.0, 20.0, 80.0, 1e4], device=rand(1).device)
    for approximate in GELUS:
        out = gelu(x, approximate)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ops.gelu(x, approximate), rtol=1e-5, atol=1e-5)


def test_errors_and_backward():
    with pytest.raises(ValueError, match="act"):
        gated_mlp_act(rand(4), rand(4), "relu")
    with pytest.raises(ValueError, match="approximate"):
        gelu(rand(4), "erf")
    out = gelu(rand(4).requires_grad_(True))
    with pytest.raises(NotImplementedError, match="gelu has a forward pass only"):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_large():
    gate, up = rand(8192, 8192, dtype=torch.bfloat16), rand(8192, 8192, seed=1, dtype=torch.bfloat16)
    assert_close(gated_mlp_act(gate, up, "silu"), ops.gated_mlp_act(gate, up, "silu"))
