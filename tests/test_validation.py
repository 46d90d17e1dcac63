"""Validation that a benign example cannot fool: probes with padded masks and other shapes, size-1 examples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.errors import InputError
from fxfuse.ir.numerics import compare
from fxfuse.passes import PASSES, PassResult
from tests.zoo.models import ZOO

LLAMA = next(m for m in ZOO if m.name == "llama")


class BoolMaskAdded(nn.Module):
    """Adds a boolean mask to the scores: arithmetic (+1 where True), which SDPA's keep-mask is not."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8) + mask[:, None, None, :]
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, 16)


def test_a_boolean_mask_added_to_the_scores_with_an_all_true_example_stays_exact():
    model = BoolMaskAdded().eval()
    opt = fxfuse.optimize(model, (torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)))
    assert opt.report.ops == {"attention": 1}
    for batch, seq in [(2, 8), (3, 5)]:
        x, mask = torch.randn(batch, seq, 16), torch.rand(batch, seq) > 0.4
        with torch.no_grad():
            outcome = compare(model(x, mask), opt(x, mask))
        assert outcome.ok, outcome.detail


class Gated(nn.Module):
    def forward(self, x, keep):
        return (x * keep[..., None]).sum(1)


def drops_the_mask(gm):
    """A wrong rewrite that is right on an all-ones mask: x * keep → x."""
    result = PassResult("")
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.mul.Tensor and isinstance(node.args[1], torch.fx.Node):
            node.replace_all_uses_with(node.args[0])
            result.changed = True
    gm.graph.eliminate_dead_code()
    return result


def test_a_rewrite_right_only_on_the_example_is_refused(monkeypatch):
    monkeypatch.setitem(PASSES, "drops-the-mask", drops_the_mask)
    model, example = Gated().eval(), (torch.randn(2, 6, 4), torch.ones(2, 6))
    with pytest.raises(fxfuse.NumericsError, match="on the padded/rescaled input"):
        fxfuse.optimize(model, example, passes=["drops-the-mask"])
    opt = fxfuse.optimize(model, example, passes=["drops-the-mask"], on_failure="skip")
    assert opt.report.skipped[0].name == "drops-the-mask"
    x, keep = torch.randn(3, 5, 4), (torch.rand(3, 5) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(opt(x, keep), model(x, keep))


def test_the_report_names_the_inputs_each_pass_was_validated_on():
    model = LLAMA.build("eager")
    opt = fxfuse.optimize(model, example_kwargs=LLAMA.inputs(2, 8))
    expected = ["example", "padded/rescaled", "padded/rescaled at 2×8 → 3×11"]
    assert opt.report.validated_on == expected
    fused = next(p for p in opt.report.passes if p.name == "fuse-attention")
    assert fused.validated_on == expected
    assert "validated on: example; padded/rescaled; padded/rescaled at 2×8 → 3×11" in str(opt.report)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_batch_one_sequence_one_example_gives_a_dynamic_module(impl):
    model = LLAMA.build(impl)
    opt = fxfuse.optimize(model, example_kwargs=LLAMA.inputs(1, 1))
    assert opt.report.notes == [] and opt.report.ops["attention"] == LLAMA.attention
    for batch, seq in [(1, 1), (2, 5), (3, 9)]:
        inputs = LLAMA.inputs(batch, seq, seed=batch)
        with torch.no_grad():
            outcome = compare(model(**inputs, use_cache=False), opt(**inputs))
        assert outcome.ok, (batch, seq, outcome.detail)


class FixedLength(nn.Module):
    """A model that fixes the sequence length (a learned table of 6 positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return x + self.pos


def test_an_input_of_a_size_the_graph_does_not_take_gets_an_fxfuse_error():
    opt = fxfuse.optimize(FixedLength().eval(), (torch.randn(2, 6, 4),))
    assert opt(torch.randn(5, 6, 4)).shape == (5, 6, 4)
    with pytest.raises(InputError, match=r"input args\[0\] has size 7 in dim 1, but the optimized graph only takes "
                                         r"size 6 there.*Optimize again"):
        opt(torch.randn(2, 7, 4))
