"""prune-heads: heads found from the fused graph, exact removals, GQA rules, scores, refit, the API."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxfuse
from fxfuse.compress.api import kv_bytes_per_token, parameter_count
from fxfuse.compress.heads import (Unprunable, check_keep, choose_heads, find_heads, head_scores, prune_heads,
                                   refit_outputs)
from fxfuse.compress.calibrate import observe
from fxfuse.compress.quality import Judge
from fxfuse.errors import InputError
from tests.compress.test_compress import _deep_llama, _optimized, _token_data
from tests.helpers import count
from tests.zoo.models import HEADS, LAYERS

ATTENTION = torch.ops.fxfuse.attention.default


def _o_proj(model, name, layer):
    if name == "bert":
        return model.encoder.layer[layer].attention.output.dense, HEADS
    attn = model.layers[layer].self_attn
    return attn.o_proj, model.config.num_attention_heads


def _silence(model, name, layer, heads):
    """Zero the output-projection columns of query ``heads`` of ``layer``: those heads add nothing."""
    o_proj, n = _o_proj(model, name, layer)
    d = o_proj.weight.shape[1] // n
    with torch.no_grad():
        for h in heads:
            o_proj.weight[:, h * d:(h + 1) * d] = 0


@pytest.mark.parametrize("name,kv", [("llama", 2), ("qwen2", 2), ("bert", HEADS)])
def test_heads_and_their_projections_are_found_from_the_fused_graph(name, kv):
    _, _, opt = _optimized(name)
    found = find_heads(opt.graph_module)
    assert [h.name for h in found] == [f"heads[{i}]" for i in range(LAYERS)]
    for h in found:
        assert (h.q_heads, h.kv_heads) == (HEADS, kv)
        assert {n.args[1].target.rsplit(".", 2)[-2] for n in (h.q, h.k, h.v, h.out)} == (
            {"query", "key", "value", "dense"} if name == "bert" else {"q_proj", "k_proj", "v_proj", "o_proj"})


@pytest.mark.parametrize("name,silenced,keep", [
    ("llama", [0, 2], [1, 3]),  # one query head from each KV group: the KV heads stay
    ("llama", [2, 3], [0, 1]),  # a whole KV group: its KV head goes too
    ("qwen2", [1, 3], [0, 2]),  # q/k/v biases sliced with the weights
    ("bert", [1], [0, 2, 3]),
])
def test_heads_that_add_nothing_are_removed_exactly(name, silenced, keep):
    zoo, model, _ = _optimized(name)
    _silence(model, name, 1, silenced)
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    gm = opt.graph_module
    pruned = prune_heads(gm, {"heads[1]": keep})
    assert count(pruned, ATTENTION) == LAYERS  # still fused, and verified by prune_heads
    after = find_heads(pruned)[1]
    assert after.q_heads == len(keep) and after.kv_heads == len(check_keep(find_heads(gm)[1], keep))
    removed_kv = find_heads(gm)[1].kv_heads - after.kv_heads
    per_layer = kv_bytes_per_token(gm) // LAYERS
    assert kv_bytes_per_token(pruned) == kv_bytes_per_token(gm) - removed_kv * per_layer // find_heads(gm)[1].kv_heads
    assert parameter_count(pruned) < parameter_count(gm)
    assert find_heads(gm)[1].q_heads == HEADS  # the input graph is not changed
    for inputs in (zoo.inputs(2, 9), zoo.inputs(3, 17, seed=1)):  # padded rows, another shape
        with torch.no_grad():
            expected, got = model(**inputs), pruned(**inputs, **opt.fixed_kwargs)
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    wrong = prune_heads(gm, {"heads[1]": sorted(silenced + keep[:len(keep) - len(silenced)])})
    with torch.no_grad():  # keeping a silent head instead of a live one does change the output
        assert not torch.allclose(wrong(**zoo.inputs(2, 9), **opt.fixed_kwargs).last_hidden_state,
                                  model(**zoo.inputs(2, 9)).last_hidden_state, atol=1e-4)


def test_grouped_query_attention_keeps_groups_uniform():
    _, _, opt = _optimized("llama")
    heads = find_heads(opt.graph_module)[0]
    assert check_keep(heads, [0, 1, 2, 3]) == [0, 1] and check_keep(heads, [1, 2]) == [0, 1]
    with pytest.raises(InputError, match="same number of query heads"):
        prune_heads(opt.graph_module, {"heads[0]": [0, 1, 2]})
    with pytest.raises(InputError, match="keep 1 to 4"):
        prune_heads(opt.graph_module, {"heads[0]": []})
    with pytest.raises(InputError, match="no attention op named"):
        prune_heads(opt.graph_module, {"heads[9]": [0]})


def test_a_fused_qkv_projection_is_refused_with_the_node_named():
    _, _, opt = _optimized("gpt2")
    with pytest.raises(Unprunable, match="not by a linear through views"):
        find_heads(opt.graph_module)


def test_silent_heads_score_zero_and_the_choice_removes_them_first():
    model = _deep_llama(layers=2)
    _silence(model.model, "llama", 1, [1, 3])
    opt = fxfuse.optimize(model, example_kwargs=_token_data(1)[0], backend="eager")
    found = find_heads(opt.graph_module)
    data = [{**b, **opt.fixed_kwargs} for b in _token_data(2)]
    judge = Judge(opt.graph_module, data)
    for scorer in ("activation", "gradient", "loss"):
        scores = head_scores(opt.graph_module, found, data, scorer, judge)
        assert scores["heads[1]"][[1, 3]].abs().max() == 0  # removing a silent head changes nothing
        assert scores["heads[1]"][[0, 2]].abs().min() > 0 and scores["heads[0]"].abs().min() > 0
        if scorer != "loss":  # (a loss can be negative: removing a head of a random model may help)
            # GQA: one head from each group per unit; the silent pair (one per group) goes first
            assert choose_heads(found, scores, 2) == {"heads[0]": [0, 1, 2, 3], "heads[1]": [0, 2]}
    uniform = choose_heads(found, scores, 4, uniform=True)
    assert [len(k) for k in uniform.values()] == [2, 2]
    with pytest.raises(InputError, match="rounds of 4"):  # one head per KV group in every op is the smallest step
        choose_heads(found, scores, 1, uniform=True)
    with pytest.raises(InputError, match="only 4 query heads can be removed"):
        choose_heads(found, scores, 5)


def test_a_declared_tensor_parallel_degree_keeps_head_counts_divisible():
    _, _, bert = _optimized("bert")  # multi-head: 4 heads per op
    found = find_heads(bert.graph_module)
    scores = {h.name: torch.tensor([0.4, 0.1, 0.3, 0.2]) + i for i, h in enumerate(found)}
    assert choose_heads(found, scores, 1) == {"heads[0]": [0, 2, 3], "heads[1]": [0, 1, 2, 3]}
    # two heads at a time, the two lowest of the cheapest op, so each of 2 ranks keeps one
    assert choose_heads(found, scores, 1, tp_degree=2) == {"heads[0]": [0, 2], "heads[1]": [0, 1, 2, 3]}
    assert [len(k) for k in choose_heads(found, scores, 3, tp_degree=2).values()] == [2, 2]
    with pytest.raises(InputError, match="only 4 query heads can be removed"):  # each op keeps 2 (one per rank)
        choose_heads(found, scores, 5, tp_degree=2)
    with pytest.raises(InputError, match="do not split evenly over tp_degree=3"):
        choose_heads(found, scores, 1, tp_degree=3)
    with pytest.raises(InputError, match="positive whole number"):
        choose_heads(found, scores, 1, tp_degree=0)
    _, _, llama = _optimized("llama")  # 4 query heads over 2 KV heads: divisible by 2, not by 4
    found = find_heads(llama.graph_module)
    scores = {h.name: torch.arange(4.0) for h in found}
    assert [len(k) for k in choose_heads(found, scores, 2, tp_degree=2).values()] == [2, 4]
    with pytest.raises(InputError, match="2 key/value heads"):
        choose_heads(found, scores, 2, tp_degree=4)


def test_refit_reduces_the_output_projection_error_on_calibration_tokens():
    model = _deep_llama(layers=2)
    opt = fxfuse.optimize(model, example_kwargs=_token_data(1)[0], backend="eager")
    gm, data = opt.graph_module, [{**b, **opt.fixed_kwargs} for b in _token_data(3)]
    pruned = prune_heads(gm, {"heads[0]": [0, 2], "heads[1]": [1, 3]})

    def error(candidate):
        out_before = {h.name: h.out for h in find_heads(gm)}
        out_after = {h.name: h.out for h in find_heads(candidate)}
        ys, zs = [], []
        observe(gm, {"y": out_before["heads[1]"]}, data, lambda i, v, b: ys.append(v["y"]))
        observe(candidate, {"y": out_after["heads[1]"]}, data, lambda i, v, b: zs.append(v["y"]))
        return sum(float((y - z).square().sum()) for y, z in zip(ys, zs))

    before = error(pruned)
    notes = refit_outputs(gm, pruned, ["heads[0]", "heads[1]"], data, ridge=1e-4)
    assert len(notes) == 2 and all("refit" in n for n in notes)
    assert error(pruned) < 0.9 * before
    assert torch.equal(gm.get_parameter("model.layers.1.self_attn.o_proj.weight"),
                       model.model.layers[1].self_attn.o_proj.weight)  # the source keeps its weights


def test_compress_heads_keeps_the_interface_and_reports_each_step():
    model = _deep_llama(layers=2)
    cal, held = _token_data(3), _token_data(2, seed=1)
    compressed = fxfuse.compress(model, cal, held_out=held, heads=0.25, cache_dir="")
    report = compressed.compress_report
    assert report.unit == "heads" and report.scorer == "gradient" and len(report.steps) == 1
    assert sum(h.q_heads for h in find_heads(compressed.graph_module)) == 2 * HEADS - 2
    assert report.steps[0].parameters < report.original_parameters
    out = compressed(**held[0])
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert "heads[" in str(report) and "refit" in str(report)
    budgeted = fxfuse.compress(model, cal, held_out=held, heads=4, max_quality_loss=0.0, cache_dir="")
    steps = budgeted.compress_report.steps
    assert [s.accepted for s in steps] == [True] * (len(steps) - 1) + [False]  # stops at the first refusal
    assert all(s.quality_loss <= 0 for s in steps[:-1]) and steps[-1].quality_loss > 0
    kept = sum(h.q_heads for h in find_heads(budgeted.graph_module))
    assert f"allowed {2 * HEADS - kept} of the 4 query heads" in str(budgeted.compress_report)
    with pytest.raises(InputError, match="scorer for heads"):
        fxfuse.compress(model, cal, heads=0.25, scorer="similarity")
    with pytest.raises(InputError, match="a fraction below 1"):
        fxfuse.compress(model, cal, heads=1.5)
    with pytest.raises(InputError, match="tp_degree=3"):  # the zoo model's heads do not split in three
        fxfuse.compress(model, cal, held_out=held, heads=0.25, tp_degree=3)


def test_uniformly_pruned_heads_save_a_checkpoint_that_reloads(tmp_path):
    model = _deep_llama(layers=2)
    cal, held = _token_data(3), _token_data(1, seed=1)
    compressed = fxfuse.compress(model, cal, held_out=held, heads=4, uniform=True, scorer="activation", cache_dir="")
    compressed.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 2)
    assert reloaded.config.head_dim == model.config.head_dim
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**held[0]).logits, compressed(**held[0]).logits, rtol=1e-4, atol=1e-4)
    # 2 heads: one from each KV group of a single layer, so the layers differ
    chosen = fxfuse.compress(model, cal, held_out=held, heads=2, scorer="activation", repair=False, cache_dir="")
    assert sorted(h.q_heads for h in find_heads(chosen.graph_module)) == [2, 4]
    with pytest.raises(InputError, match="uniform=True"):
        chosen.save_pretrained(tmp_path / "other")


def test_bert_heads_cannot_be_written_to_its_config(tmp_path):
    zoo, model, opt = _optimized("bert")
    data = [zoo.inputs(2, 9, seed=s) for s in range(3)]
    compressed = fxfuse.compress(model, data, held_out=[zoo.inputs(2, 9, seed=7)], heads=2, uniform=True,
                                 cache_dir="")
    assert compressed.compress_report.scorer == "activation"
    with pytest.raises(InputError, match="derives the head size"):
        compressed.save_pretrained(tmp_path)


def test_greedy_loss_scores_rank_the_chosen_heads_first_in_order():
    model = _deep_llama(layers=2)
    opt = fxfuse.optimize(model, example_kwargs=_token_data(1)[0], backend="eager")
    found = find_heads(opt.graph_module)
    data = [{**b, **opt.fixed_kwargs} for b in _token_data(2)]
    judge = Judge(opt.graph_module, data)
    single = head_scores(opt.graph_module, found, data, "loss", judge)
    one = head_scores(opt.graph_module, found, data, "greedy", judge, greedy=1)
    flat = [(float(s[i]), n, i) for n, s in single.items() for i in range(len(s))]
    _, name, head = min(flat)
    assert float(one[name][head]) < min(v for v, _, _ in flat)  # the one-shot argmin is chosen first
    for n, s in single.items():  # every other head keeps its one-shot loss
        others = [i for i in range(len(s)) if (n, i) != (name, head)]
        torch.testing.assert_close(one[n][others], s[others])
    two = head_scores(opt.graph_module, found, data, "greedy", judge, greedy=2)
    ranked = sorted((float(s[i]), n, i) for n, s in two.items() for i in range(len(s)))
    assert (ranked[0][1], ranked[0][2]) == (name, head) and ranked[1][0] == ranked[0][0] + 1
