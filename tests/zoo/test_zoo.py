"""Every zoo architecture: every attention block, norm, MLP activation and rotary embedding fused, outputs unchanged, dynamic shapes."""

from __future__ import annotations

import pytest
import torch

import fxfuse
from fxfuse.ir.numerics import compare
from fxfuse.passes import DEFAULT_PIPELINE, PassManager, resolve
from tests.zoo.models import CASE_IDS, CASES, LAYERS, ZOO

aten = torch.ops.aten
UNFUSED = {aten.softmax.int, aten.scaled_dot_product_attention.default, aten.layer_norm.default,
           aten.rsqrt.default, aten.rms_norm.default, aten.silu.default, aten.gelu.default}


def _near_topk(node, hops: int = 3) -> bool:
    """A ``topk`` within a few steps of ``node``, up or down the graph."""
    frontier = {node}
    for _ in range(hops):
        frontier = {m for n in frontier for m in [*n.users, *n.all_input_nodes]}
        if any(n.target is aten.topk.default for n in frontier):
            return True
    return False


def _is_router_softmax(node) -> bool:
    """A mixture-of-experts router's softmax (before or after its top-k), not attention."""
    return node.target is aten.softmax.int and _near_topk(node)


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def optimized(request):
    spec, impl = request.param
    model = spec.build(impl)
    opt = fxfuse.optimize(model, example_kwargs=spec.inputs(batch=2, seq=8))
    return spec, model, opt


def test_every_block_is_fused(optimized):
    spec, _, opt = optimized
    ops = opt.report.ops
    assert ops.get("attention", 0) == spec.attention
    fused_norms = ops.get(spec.norm_op, 0) + ops.get(f"add_{spec.norm_op}", 0)
    assert fused_norms == spec.norms
    assert ops.get(f"add_{spec.norm_op}", 0) == spec.residual_norms
    if spec.mlp_op is not None:
        assert ops.get(spec.mlp_op, 0) == LAYERS + spec.extra_mlp_ops
    assert ops.get("rope", 0) == spec.rope
    left = [n.name for n in opt.graph_module.graph.nodes
            if n.op == "call_function" and n.target in UNFUSED and not _is_router_softmax(n)]
    assert left == [], f"unfused attention/norm/MLP nodes remain: {left}"
    assert opt.report.rejections == []


def test_grouped_query_heads_are_not_materialized(optimized):
    spec, _, opt = optimized
    for node in opt.graph_module.graph.nodes:
        if node.target is torch.ops.fxfuse.attention.default:
            q, k = node.args[0].meta["val"], node.args[1].meta["val"]
            expected_kv_heads = spec.kv_heads or getattr(spec.config(), "num_key_value_heads", q.shape[1])
            assert k.shape[1] == expected_kv_heads


def test_a_second_pipeline_run_changes_nothing(optimized):
    spec, _, opt = optimized
    inputs = {**spec.inputs(2, 8), **opt.fixed_kwargs}
    with torch.no_grad():
        reference = opt.graph_module(**inputs)
    again = PassManager(resolve(DEFAULT_PIPELINE)).run(opt.graph_module, ((), inputs), reference)
    assert [r.name for r in again if r.changed] == []


@pytest.mark.parametrize("batch,seq", [(3, 11), (1, 5)])
def test_outputs_match_at_other_shapes(optimized, batch, seq):
    spec, model, opt = optimized
    inputs = spec.inputs(batch, seq, seed=1)
    with torch.no_grad():
        outcome = compare(model(**inputs, **opt.fixed_kwargs), opt(**inputs))
    assert outcome.ok, outcome.detail


def test_output_structure_is_the_models(optimized):
    spec, model, opt = optimized
    inputs = spec.inputs(2, 6, seed=2)
    with torch.no_grad():
        ref, out = model(**inputs, **opt.fixed_kwargs), opt(**inputs)
    assert type(out) is type(ref)
    assert list(out.keys()) == list(ref.keys())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_half_precision_models_fuse_fully(name, dtype):
    spec = next(m for m in ZOO if m.name == name)
    model = spec.build("eager").to(dtype)
    opt = fxfuse.optimize(model, example_kwargs=spec.inputs(2, 8))
    assert opt.report.ops.get("attention", 0) == spec.attention
    assert opt.report.ops.get(f"add_{spec.norm_op}", 0) == spec.residual_norms
    inputs = spec.inputs(3, 10, seed=3)
    with torch.no_grad():
        outcome = compare(model(**inputs, **opt.fixed_kwargs), opt(**inputs))
    assert outcome.ok, outcome.detail
