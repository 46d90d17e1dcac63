"""fuse-mlp: SwiGLU/GeGLU gates and GELU in its erf, tanh and hand-written spellings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import FileCheck

from fxfuse.passes import PASSES
from tests.helpers import captured, count, run_pipeline

ops = torch.ops.fxfuse
aten = torch.ops.aten
PIPELINE = ["canonicalize", "dce", "fuse-mlp", "dce"]


class Gated(torch.nn.Module):
    def __init__(self, act: str, dim: int = 12, hidden: int = 20) -> None:
        super().__init__()
        self.act = act
        self.gate, self.up, self.down = (torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden),
                                         torch.nn.Linear(hidden, dim))

    def forward(self, x):
        g = self.gate(x)
        a = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.act](g)
        return self.down(a * self.up(x))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gated_activation_is_fused(act):
    x = torch.randn(2, 5, 12)
    gm = captured(Gated(act), x)
    run_pipeline(gm, PIPELINE, x)
    (node,) = [n for n in gm.graph.nodes if n.target is ops.gated_mlp_act.default]
    assert node.args[2] == act
    assert count(gm, aten.silu.default) + count(gm, aten.gelu.default) + count(gm, aten.mul.Tensor) == 0


class NewGELU(torch.nn.Module):
    """GPT-2's hand-written tanh GELU."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class ErfGELU(torch.nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class BloomGELU(torch.nn.Module):
    """BLOOM's tanh GELU: another association, a rounded constant."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class QuickGELU(torch.nn.Module):
    """CLIP's activation."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize("module,approximate", [(NewGELU(), "tanh"), (ErfGELU(), "none"), (BloomGELU(), "tanh"),
                                                (QuickGELU(), "sigmoid")])
def test_hand_written_gelu_is_fused(module, approximate):
    x = torch.randn(3, 7) * 3
    gm = captured(module, x)
    run_pipeline(gm, PIPELINE, x)
    (node,) = [n for n in gm.graph.nodes if n.target is ops.gelu.default]
    assert node.args[1] == approximate
    assert count(gm, aten.tanh.default) + count(gm, aten.erf.default) + count(gm, aten.sigmoid.default) == 0
    assert count(gm, aten.mul.Tensor) == 0
    FileCheck().check("fxfuse.gelu.default").run(gm.code)


def test_a_wrong_constant_is_not_taken_for_gelu():
    class Almost(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(0.79 * (x + 0.044715 * torch.pow(x, 3.0))))

    x = torch.randn(3, 7)
    gm = captured(Almost(), x)
    run_pipeline(gm, PIPELINE, x)
    assert count(gm, ops.gelu.default) == 0 and count(gm, aten.tanh.default) == 1


def test_other_activations_are_not_taken_for_gelu():
    class Silu(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x) + 0.5 * x * (1.0 + torch.erf(x))  # sigmoid-SiLU plus an unscaled erf

    x = torch.randn(3, 7)
    gm = captured(Silu(), x)
    run_pipeline(gm, PIPELINE, x)
    assert count(gm, ops.gelu.default) == 0


def test_activation_used_twice_is_not_fused_into_the_gate():
    class Twice(Gated):
        def forward(self, x):
            a = F.silu(self.gate(x))
            return self.down(a * self.up(x)) + a.sum(-1, keepdim=True)

    x = torch.randn(2, 5, 12)
    gm = captured(Twice("silu"), x)
    result = PASSES["fuse-mlp"](gm)
    assert count(gm, ops.gated_mlp_act.default) == 0 and not result.changed
    assert "used by other nodes" in result.rejections[0].reason


def test_second_run_changes_nothing():
    x = torch.randn(2, 5, 12)
    gm = captured(Gated("silu"), x)
    run_pipeline(gm, PIPELINE, x)
    assert not any(r.changed for r in run_pipeline(gm, PIPELINE, x))
