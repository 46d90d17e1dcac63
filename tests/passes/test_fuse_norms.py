"""fuse-layer-norm and fuse-rms-norm: every norm fused, the residual add with it when there is one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import FileCheck

from fxfuse.ir.numerics import compare
from fxfuse.passes import PASSES
from tests.helpers import captured, count, run_pipeline

ops = torch.ops.fxfuse
aten = torch.ops.aten
PIPELINE = ["canonicalize", "dce", "cse", "fuse-rms-norm", "fuse-layer-norm", "dce"]


class LlamaRMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Block(torch.nn.Module):
    """Two residual adds, each followed by a norm, and a last norm with no add."""

    def __init__(self, norm: str, dim: int = 16) -> None:
        super().__init__()
        make = (lambda: torch.nn.LayerNorm(dim)) if norm == "layer" else (lambda: LlamaRMSNorm(dim))
        self.n1, self.n2, self.n3 = make(), make(), make()
        self.f1, self.f2 = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        h = x + self.f1(self.n1(x))
        h2 = h + self.f2(self.n2(h))
        return self.n3(h2), h2


@pytest.mark.parametrize("norm,op", [("layer", "layer_norm"), ("rms", "rms_norm")])
def test_norms_and_residual_adds_are_fused(norm, op):
    x = torch.randn(2, 5, 16)
    gm = captured(Block(norm), x)
    run_pipeline(gm, PIPELINE, x)
    plain, fused_add = getattr(ops, op).default, getattr(ops, f"add_{op}").default
    # n1 reads the input directly; n2 and n3 read residual sums.
    assert count(gm, plain) == 1 and count(gm, fused_add) == 2
    assert count(gm, aten.add.Tensor) == 0 and count(gm, aten.rsqrt.default) == 0
    FileCheck().check(f"fxfuse.{op}.default").check(f"fxfuse.add_{op}.default").run(gm.code)


def test_rms_norm_in_half_precision_keeps_the_fp32_upcast_semantics():
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    norm = LlamaRMSNorm(16).to(torch.bfloat16)
    gm = captured(norm, x)
    run_pipeline(gm, PIPELINE, x)
    assert count(gm, ops.rms_norm.default) == 1
    assert count(gm, aten.to.dtype) == 0 and count(gm, aten._to_copy.default) == 0


def test_aten_rms_norm_is_fused():
    norm = torch.nn.RMSNorm(16, eps=1e-5)
    x = torch.randn(3, 16)
    gm = captured(norm, x)
    run_pipeline(gm, PIPELINE, x)
    assert count(gm, ops.rms_norm.default) == 1


def test_layer_norm_over_two_dims_is_not_fused():
    norm = torch.nn.LayerNorm([4, 16])
    x = torch.randn(2, 4, 16)
    gm = captured(norm, x)
    result = PASSES["fuse-layer-norm"](gm)
    assert not result.changed and count(gm, aten.layer_norm.default) == 1
    assert "not the last dim" in result.rejections[0].reason


def test_rms_over_another_dim_is_not_fused():
    class Wrong(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6))

    x = torch.randn(2, 16, 16)
    gm = captured(Wrong(), x)
    run_pipeline(gm, PIPELINE, x)
    assert count(gm, ops.rms_norm.default) == 0


def test_broadcasting_add_is_not_taken_as_residual():
    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(16)
            self.pos = torch.nn.Parameter(torch.randn(1, 5, 16))

        def forward(self, x):
            return self.ln(x + self.pos)

    x = torch.randn(2, 5, 16)
    gm = captured(Bias(), x)
    run_pipeline(gm, PIPELINE, x)
    assert count(gm, ops.layer_norm.default) == 1 and count(gm, ops.add_layer_norm.default) == 0


def test_second_run_changes_nothing():
    x = torch.randn(2, 5, 16)
    gm = captured(Block("rms"), x)
    run_pipeline(gm, PIPELINE, x)
    assert not any(r.changed for r in run_pipeline(gm, PIPELINE, x))


def test_weighted_rms_norm_with_a_non_vector_scale_falls_back_to_the_plain_norm():
    class Matrix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.rand(5, 16))

        def forward(self, x):
            return self.scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    x = torch.randn(2, 5, 16)
    gm = captured(Matrix(), x, dynamic_shapes={"x": {0: torch.export.Dim.AUTO}})
    run_pipeline(gm, PIPELINE, x)
    assert count(gm, ops.rms_norm.default) == 1
    (node,) = [n for n in gm.graph.nodes if n.target is ops.rms_norm.default]
    assert node.args[1] is None  # the (5, 16) scale stays a separate mul


class HandLayerNorm(torch.nn.Module):
    """LayerNorm written out, as older BERT code and ConvNeXt do."""

    def __init__(self, dim: int, affine: bool = True, rsqrt: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5) if affine else None
        self.bias = torch.nn.Parameter(torch.randn(dim)) if affine else None
        self.rsqrt = rsqrt

    def forward(self, x, residual):
        x = x + residual
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        y = (x - u) * torch.rsqrt(s + 1e-5) if self.rsqrt else (x - u) / torch.sqrt(s + 1e-5)
        return y if self.weight is None else self.weight * y + self.bias


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rsqrt", [False, True])
def test_hand_written_layer_norm_is_fused_with_its_residual(affine, rsqrt):
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    model = HandLayerNorm(16, affine, rsqrt)
    gm = captured(model, x, r)
    run_pipeline(gm, PIPELINE, x, r)
    (node,) = [n for n in gm.graph.nodes if n.target is ops.add_layer_norm.default]
    assert (node.args[2] is None) is (not affine) and node.args[4] == pytest.approx(1e-5)
    assert count(gm, aten.mean.dim) + count(gm, aten.sqrt.default) + count(gm, aten.rsqrt.default) == 0
    x2, r2 = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    torch.testing.assert_close(gm(x2, r2), model(x2, r2))


def test_hand_written_norm_over_a_non_vector_scale_keeps_the_scale_outside():
    class MatrixScale(HandLayerNorm):
        def forward(self, x, residual):
            y = super().forward(x, residual)
            return y * residual  # a full tensor, not a LayerNorm weight

    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    model = MatrixScale(16, affine=False)
    gm = captured(model, x, r)
    run_pipeline(gm, PIPELINE, x, r)
    assert count(gm, ops.add_layer_norm.default) == 1 and count(gm, aten.mul.Tensor) == 1


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    norm=st.sampled_from(["layer", "rms"]), dim=st.integers(2, 40), batch=st.integers(2, 4), seq=st.integers(2, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_property_norm_blocks_fuse_at_any_size_and_dtype(norm, dim, batch, seq, dtype):
    torch.manual_seed(dim)
    model = Block(norm, dim).to(dtype)
    x = torch.randn(batch, seq, dim, dtype=dtype)
    gm = captured(model, x)
    run_pipeline(gm, PIPELINE, x)
    op = "layer_norm" if norm == "layer" else "rms_norm"
    assert count(gm, getattr(ops, op).default) == 1 and count(gm, getattr(ops, f"add_{op}").default) == 2
    assert not any(r.changed for r in run_pipeline(gm, PIPELINE, x))
    other = torch.randn(batch + 1, seq + 2, dim, dtype=dtype)
    with torch.no_grad():
        outcome = compare(model(other), gm(other))
    assert outcome.ok, outcome.detail
