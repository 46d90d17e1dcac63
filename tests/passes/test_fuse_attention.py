"""fuse-attention: the eager and SDPA spellings become one fxfuse.attention, GQA without copies."""

from __future__ import annotations

import math

import pytest
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
    q, k, v, mask, scale, causal = node.args
    assert scale == pytest.approx(1 / math.sqrt(8))
    assert mask.op == "placeholder" and causal is False


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
    assert why.rule == "eager_attention" and "used by other nodes" in why.reason


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
