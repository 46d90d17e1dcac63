"""The IR verifier catches broken graphs and accepts good ones."""

from __future__ import annotations

import pytest
import torch

from fxfuse.ir.verify import VerificationError, verify
from tests.helpers import captured, run_pipeline


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def fused():
    args = [torch.randn(2, 2, 5, 4) for _ in range(3)]
    auto = torch.export.Dim.AUTO
    gm = captured(Attn(), *args, dynamic_shapes={n: {0: auto, 2: auto} for n in "qkv"})
    run_pipeline(gm, ["fuse-attention", "dce"], *args)
    return gm


def attention_node(gm):
    return next(n for n in gm.graph.nodes if n.target is torch.ops.fxfuse.attention.default)


def test_a_good_graph_verifies():
    verify(fused())


def test_missing_fake_value_is_caught():
    gm = fused()
    del attention_node(gm).meta["val"]
    with pytest.raises(VerificationError, match="has no meta"):
        verify(gm)


def test_a_dialect_op_fed_the_wrong_tensor_is_caught():
    gm = fused()
    node = attention_node(gm)
    q = node.args[0]
    with gm.graph.inserting_before(node):
        wrong = gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (q, [1]))
    wrong.meta["val"] = q.meta["val"].sum(1)
    node.args = (wrong, *node.args[1:])
    with pytest.raises(VerificationError, match="rejects its inputs"):
        verify(gm)


def test_use_before_definition_is_caught():
    gm = fused()
    node = attention_node(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        late = gm.graph.call_function(torch.ops.aten.neg.default, (node,))
    late.meta["val"] = node.meta["val"]
    node.args = (late, *node.args[1:])
    with pytest.raises(VerificationError, match="lint"):
        verify(gm)


def test_overload_packets_are_rejected():
    gm = fused()
    node = attention_node(gm)
    node.target = torch.ops.fxfuse.attention
    with pytest.raises(VerificationError, match="overload packet"):
        verify(gm)
