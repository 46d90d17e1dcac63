"""merge-projections: Q/K/V and gate/up linears on one input → one linear on concatenated weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import FileCheck

import fxfuse
from fxfuse.ir.verify import verify
from fxfuse.passes import DEFAULT_PIPELINE, PASSES, default_pipeline
from tests.helpers import captured, count, run_pipeline

aten = torch.ops.aten
PASS = ["merge-projections"]


def _linears_reading(gm: torch.fx.GraphModule, name: str) -> int:
    (x,) = [n for n in gm.graph.nodes if n.name == name]
    return sum(1 for u in x.users if u.target is aten.linear.default)


def _numel(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers())


class QKV(torch.nn.Module):
    def __init__(self, dim: int = 16, bias: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim, bias=bias), torch.nn.Linear(dim, 8, bias=bias),
                                  torch.nn.Linear(dim, 8, bias=bias))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = (q[..., :8] @ k.transpose(-1, -2)).softmax(-1)
        return scores @ v + q[..., 8:]


class GateUp(torch.nn.Module):
    def __init__(self, dim: int = 12, hidden: int = 20) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(dim, hidden, bias=False)
        self.up_proj = torch.nn.Linear(dim, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_qkv_become_one_linear_on_a_merged_weight():
    x = torch.randn(2, 5, 16)
    gm = captured(QKV(), x)
    numel = _numel(gm)
    (result,) = run_pipeline(gm, PASS, x)
    assert result.changed and dict(result.rewrites) == {"group_of_3": 1}
    assert _linears_reading(gm, "x") == 1 and count(gm, aten.linear.default) == 1
    assert count(gm, aten.cat.default) == 0
    params = dict(gm.named_parameters())
    assert set(params) == {"q_k_v_weight", "q_k_v_bias"}
    assert params["q_k_v_weight"].shape == (32, 16) and _numel(gm) == numel
    FileCheck().check("aten.linear.default(x, q_k_v_weight, q_k_v_bias)").check(
        "aten.split_with_sizes.default").check_same("[16, 8, 8], -1").run(gm.code)


def test_gate_and_up_without_bias_become_one_linear():
    x = torch.randn(2, 5, 12)
    gm = captured(GateUp(), x)
    (result,) = run_pipeline(gm, PASS, x)
    assert dict(result.rewrites) == {"group_of_2": 1}
    assert count(gm, aten.linear.default) == 2 and _linears_reading(gm, "x") == 1
    (merged,) = [n for n in gm.graph.nodes if n.target is aten.linear.default and n.args[0].name == "x"]
    assert len(merged.args) == 2 and merged.args[1].target == "gate_up_proj_weight"
    assert set(dict(gm.named_parameters())) == {"gate_up_proj_weight", "down_proj.weight"}


def test_a_missing_bias_is_zero_filled():
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 3, bias=False)

        def forward(self, x):
            return self.a(x).sum(-1) * self.b(x).sum(-1)

    x = torch.randn(4, 6)
    gm = captured(Mixed(), x)
    run_pipeline(gm, PASS, x)
    assert count(gm, aten.linear.default) == 1
    assert set(dict(gm.named_parameters())) == {"a_b_weight", "a_b_bias"}
    assert torch.equal(gm.a_b_bias[4:], torch.zeros(3))


def test_linears_on_different_inputs_or_other_ops_are_not_merged():
    class Apart(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.w1, self.w2 = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8, 4))

        def forward(self, x, y):
            return self.a(x) + F.linear(y, self.b.weight * 2) + torch.cat([x @ self.w1, x @ self.w2], -1)

    x, y = torch.randn(3, 8), torch.randn(3, 8)
    gm = captured(Apart(), x, y)
    (result,) = run_pipeline(gm, PASS, x, y)
    assert not result.changed and not result.rewrites
    assert not result.rejections  # a lone linear has nothing to merge with: no news that it was not merged
    assert count(gm, aten.linear.default) == 2


def test_each_input_gets_its_own_merged_linear():
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (torch.nn.Linear(8, n) for n in (3, 4, 5, 6))

        def forward(self, x, y):
            return self.a(x).sum(-1) + self.b(y).sum(-1) + self.c(x).sum(-1) * self.d(y).sum(-1)

    x, y = torch.randn(3, 8), torch.randn(3, 8)
    gm = captured(TwoInputs(), x, y)
    (result,) = run_pipeline(gm, PASS, x, y)
    assert dict(result.rewrites) == {"group_of_2": 2}
    assert _linears_reading(gm, "x") == 1 and _linears_reading(gm, "y") == 1
    assert {"a_c_weight", "b_d_weight"} <= set(dict(gm.named_parameters()))


def test_a_computed_weight_is_left_out_of_the_merge():
    class Computed(QKV):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return self.q(x)[..., :8] * self.k(x) + F.linear(x, self.w * 2)

    x = torch.randn(2, 5, 16)
    gm = captured(Computed(), x)
    (result,) = run_pipeline(gm, PASS, x)
    assert dict(result.rewrites) == {"group_of_2": 1} and _linears_reading(gm, "x") == 2
    (rejection,) = result.rejections
    assert rejection.rule == "merge_projections" and "computed" in rejection.reason
    assert hasattr(gm, "w")


def test_a_weight_also_read_elsewhere_is_not_copied_into_a_merge():
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
            self.v, self.o = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)

        def forward(self, x, y):
            # q's weight is also applied to y (as DeBERTa applies its key projection to positions)
            return self.q(x) * self.k(x) * self.v(x) + F.linear(y, self.q.weight) + self.o(y)

    x, y = torch.randn(3, 8), torch.randn(3, 8)
    gm = captured(Shared(), x, y)
    (result,) = run_pipeline(gm, PASS, x, y)
    assert dict(result.rewrites) == {"group_of_2": 1} and not result.rejections
    assert _linears_reading(gm, "x") == 2 and _linears_reading(gm, "y") == 2
    assert set(dict(gm.named_parameters())) == {"q.weight", "k_v_weight", "o.weight"}


def test_tied_weights_are_not_stored_twice():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spare = torch.nn.Linear(8, 8, bias=False)
            self.a, self.b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
            self.c = torch.nn.Linear(8, 8)
            self.b.weight = self.spare.weight  # tied: export reads it through one of its two names
            self.c.weight = self.a.weight  # tied inside the group: merging would store it twice

        def forward(self, x):
            return self.a(x) * self.c(x) + self.b(x) + self.spare(x * 2)

    def numel(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())  # counts a tied tensor once

    x = torch.randn(3, 8)
    gm = captured(Tied(), x)
    before = numel(gm)
    (result,) = run_pipeline(gm, PASS, x)
    assert not result.changed and numel(gm) == before

    class TiedToUnused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spare = torch.nn.Linear(8, 8, bias=False)
            self.a, self.b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
            self.b.weight = self.spare.weight

        def forward(self, x):
            return self.a(x) * self.b(x)

    gm = captured(TiedToUnused(), x)
    before = numel(gm)
    (result,) = run_pipeline(gm, PASS, x)
    assert dict(result.rewrites) == {"group_of_2": 1}
    assert numel(gm) == before and set(dict(gm.named_parameters())) == {"a_b_weight"}


@pytest.mark.parametrize("flatten", [
    lambda v: v.view(v.shape[0], -1),
    lambda v: v.unsqueeze(1).view(v.shape[0], -1),
], ids=["view", "unsqueeze-view"])
def test_a_projection_viewed_across_its_last_dim_stays_separate(flatten):
    class Flattened(QKV):
        def forward(self, x):
            return self.q(x)[..., :8] * self.k(x) + flatten(self.v(x)).sum(-1)[:, None, None]

    x = torch.randn(2, 5, 16)
    gm = captured(Flattened(), x)
    (result,) = run_pipeline(gm, PASS, x)
    assert dict(result.rewrites) == {"group_of_2": 1} and _linears_reading(gm, "x") == 2
    assert "view" in result.rejections[0].reason


def test_second_run_changes_nothing():
    x = torch.randn(2, 5, 16)
    gm = captured(QKV(), x)
    run_pipeline(gm, PASS, x)
    assert not PASSES["merge-projections"](gm).changed
    (again,) = run_pipeline(gm, PASS, x)
    assert not again.changed and not again.rewrites


@pytest.mark.parametrize("module,dim", [(QKV(), 16), (GateUp(), 12)])
def test_outputs_match_at_other_batch_and_sequence_sizes(module, dim):
    x = torch.randn(2, 5, dim)
    gm = captured(module, x)
    run_pipeline(gm, PASS, x)
    verify(gm)
    other = torch.randn(3, 9, dim)
    with torch.no_grad():
        torch.testing.assert_close(gm(other), module(other))


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(cfg, attn_implementation="eager").eval()


def _inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 3] = 0
    return {"input_ids": torch.randint(0, 128, (batch, seq)), "attention_mask": mask}


def test_llama_projections_merge_and_blocks_still_fuse():
    model = _llama()
    assert "merge-projections" in default_pipeline("triton") and "merge-projections" not in DEFAULT_PIPELINE
    opt = fxfuse.optimize(model, example_kwargs=_inputs(2, 8), passes=default_pipeline("triton"))
    gm = opt.graph_module
    assert count(gm, aten.linear.default) == 2 * 4  # per layer: qkv, o, gate_up, down (was 7)
    cats = [n for n in gm.graph.nodes if n.target is aten.cat.default]  # RoPE's cat(freqs, freqs) only
    assert len(cats) == 1 and not any(a.op == "get_attr" for n in cats for a in n.all_input_nodes)
    assert {k: opt.report.ops.get(k) for k in ("attention", "gated_mlp_act", "rope")} == {
        "attention": 2, "gated_mlp_act": 2, "rope": 2}
    (merge,) = [p for p in opt.report.passes if p.name == "merge-projections"]
    assert dict(merge.rewrites) == {"group_of_3": 2, "group_of_2": 2} and not merge.skipped
    assert "group_of_2×2, group_of_3×2" in str(opt.report)
    names = dict(gm.named_parameters())
    assert "layers_0_self_attn_q_k_v_proj_weight" in names and "layers_1_mlp_gate_up_proj_weight" in names
    assert not any("q_proj" in n or "gate_proj" in n for n in names if "." in n)
    assert _numel(gm) == sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    inputs = _inputs(3, 11)
    with torch.no_grad():
        torch.testing.assert_close(opt(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_llama_merge_alone_then_fusions():
    """The merge must not hide blocks from the fusion passes run after it."""
    model = _llama()
    base = fxfuse.optimize(copy.deepcopy(model), example_kwargs=_inputs(2, 8),
                           passes=DEFAULT_PIPELINE)
    merged = fxfuse.optimize(model, example_kwargs=_inputs(2, 8), passes=default_pipeline("triton"))
    assert count(base.graph_module, aten.linear.default) == 2 * 7
    assert merged.report.ops == base.report.ops
