"""Structural rewrites: branches found from the fused graph, exact removals, closed-form repair, the budget."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxfuse
from fxfuse.compress import batches, drop_branches, find_branches, find_layers
from fxfuse.compress.api import kv_bytes_per_token, parameter_count
from fxfuse.compress.calibrate import observe, stream_statistics
from fxfuse.compress.repair import cross_validated_ridge, repair_gap
from fxfuse.compress.structure import tag_branches
from fxfuse.errors import InputError
from tests.helpers import count
from tests.zoo.models import LAYERS, ZOO

ATTENTION = torch.ops.fxfuse.attention.default


def _zoo(name):
    return next(m for m in ZOO if m.name == name)


def _optimized(name, impl="sdpa"):
    zoo = _zoo(name)
    model = zoo.build(impl)
    return zoo, model, fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert", "t5", "gemma2", "olmo2", "vit"])
def test_every_layer_is_found_from_the_fused_graph(name):
    _, _, opt = _optimized(name, _zoo(name).impls[0])
    branches = find_branches(opt.graph_module.graph)
    kinds = [b.kind for b in branches]
    assert kinds == ["attention", "mlp"] * LAYERS
    for b in branches:
        attention_ops = [n for n in b.nodes if n.target is ATTENTION]
        assert len(attention_ops) == (1 if b.kind == "attention" else 0)
        assert b.parameters, f"{b.name} owns no weights"
    assert [layer.name for layer in find_layers(branches)] == [f"attention[{i}]+mlp[{i}]" for i in range(LAYERS)]


def _zero_branch_output(model, name, layer):
    """Zero the weights (and bias) of the projection that ends a branch: the branch adds nothing."""
    if name == "llama":
        block = model.layers[layer]
        ends = block.self_attn.o_proj, block.mlp.down_proj
    elif name == "bert":
        block = model.encoder.layer[layer]
        ends = block.attention.output.dense, block.output.dense
    else:
        block = model.h[layer]
        ends = block.attn.c_proj, block.mlp.c_proj
    with torch.no_grad():
        for linear in ends:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_a_layer_that_adds_nothing_is_removed_exactly(name):
    zoo = _zoo(name)
    model = zoo.build("sdpa")
    _zero_branch_output(model, name, 1)
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    gm = opt.graph_module
    tag_branches(find_branches(gm.graph))
    dropped = drop_branches(gm, {"attention[1]", "mlp[1]"})
    assert count(dropped, ATTENTION) == LAYERS - 1
    assert count(gm, ATTENTION) == LAYERS  # the input graph is not changed
    assert parameter_count(dropped) < parameter_count(gm)
    assert kv_bytes_per_token(dropped) == kv_bytes_per_token(gm) * (LAYERS - 1) // LAYERS
    for inputs in (zoo.inputs(2, 9), zoo.inputs(3, 17, seed=1)):  # padded rows, another shape
        with torch.no_grad():
            expected, got = model(**inputs), dropped(**inputs, **opt.fixed_kwargs)
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_removing_a_layer_that_adds_something_changes_the_output():
    zoo, model, opt = _optimized("llama")
    gm = opt.graph_module
    tag_branches(find_branches(gm.graph))
    inputs = zoo.inputs(2, 9)
    with torch.no_grad():
        full = gm(**inputs, **opt.fixed_kwargs).last_hidden_state
        without = drop_branches(gm, {"mlp[0]"})(**inputs, **opt.fixed_kwargs).last_hidden_state
    assert (full - without).abs().max() > 1e-3


def test_dropping_an_unknown_branch_names_the_known_ones():
    _, _, opt = _optimized("llama")
    tag_branches(find_branches(opt.graph_module.graph))
    with pytest.raises(KeyError, match="attention\\[0\\]"):
        drop_branches(opt.graph_module, {"attention[7]"})


def _deep_llama(layers=4, hidden=32):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _token_data(n, batch=4, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, seq), generator=g)} for _ in range(n)]


def test_repair_solves_the_least_squares_fit_and_folds_it_into_the_projection():
    """After the refit, the stream after the gap, Y + z·(W + D)ᵀ, leaves a residual orthogonal to z, the
    projection's input (the normal equations of the fit), on the calibration tokens; D transposed, or
    written into the wrong weight, leaves one as large as before."""
    model = _deep_llama()
    cal = [{**b, "use_cache": False} for b in _token_data(8)]
    opt = fxfuse.optimize(model, example_kwargs=_token_data(1)[0], backend="eager")
    gm = opt.graph_module
    tag_branches(find_branches(gm.graph))
    cut = drop_branches(gm, {"attention[2]", "mlp[2]"})
    repaired, note = repair_gap(gm, drop_branches(gm, {"attention[2]", "mlp[2]"}), "mlp[1]", "mlp[2]", cal,
                                ridge=1e-9)
    assert repaired is not None and "model.layers.1.mlp.down_proj.weight" in note

    def read(module, name):
        branch = {b.name: b for b in find_branches(module.graph)}[name]
        out = []
        observe(module, {"y": branch.stream, "f": branch.output, "z": branch.projection.args[0]}, cal,
                lambda i, v, b: out.append(v))
        return out

    target = [v["y"] + v["f"] for v in read(gm, "mlp[2]")]
    before, after = read(cut, "mlp[1]"), read(repaired, "mlp[1]")
    z = torch.cat([v["z"].flatten(0, 1) for v in before]).double()

    def normal_residual(values):
        r = torch.cat([(v["y"] + v["f"] - t).flatten(0, 1) for v, t in zip(values, target)]).double()
        return float((z.T @ r).norm()), float(r.norm())

    (ortho_before, err_before), (ortho_after, err_after) = normal_residual(before), normal_residual(after)
    assert ortho_after < 1e-3 * ortho_before
    assert err_after < err_before
    # The repair wrote new weights into the repaired copy only.
    assert not torch.equal(repaired.get_parameter("model.layers.1.mlp.down_proj.weight"),
                           model.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(gm.get_parameter("model.layers.1.mlp.down_proj.weight"),
                       model.model.layers[1].mlp.down_proj.weight)


def test_post_norm_models_are_not_repaired_and_say_why():
    zoo, _, opt = _optimized("bert")
    gm = opt.graph_module
    tag_branches(find_branches(gm.graph))
    data = [{**zoo.inputs(2, 9), **opt.fixed_kwargs}]
    repaired, note = repair_gap(gm, drop_branches(gm, {"attention[1]"}), "mlp[0]", "attention[1]", data)
    assert repaired is None and "post-norm" in note


def test_similarity_statistics_are_cached_on_disk_by_weights_and_data(tmp_path):
    zoo, model, opt = _optimized("llama")
    gm = opt.graph_module
    branches = find_branches(gm.graph)
    data = [{**zoo.inputs(2, 9), **opt.fixed_kwargs}]
    first = stream_statistics(gm, branches, find_layers(branches), data, cache_dir=str(tmp_path))
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1
    assert set(first) == {"attention[0]", "mlp[0]", "attention[1]", "mlp[1]", "attention[0]+mlp[0]",
                          "attention[1]+mlp[1]"}
    assert all(0 < v < 2 for v in first.values())
    again = stream_statistics(gm, branches, find_layers(branches), data, cache_dir=str(tmp_path))
    assert again == first and len(list(tmp_path.rglob("*.pt"))) == 1
    other = [{**zoo.inputs(2, 9, seed=3), **opt.fixed_kwargs}]
    stream_statistics(gm, branches, find_layers(branches), other, cache_dir=str(tmp_path))
    assert len(list(tmp_path.rglob("*.pt"))) == 2  # other data, another entry


def test_compress_removes_layers_and_keeps_the_model_interface():
    model = _deep_llama()
    cal, held = _token_data(4), _token_data(2, seed=1)
    compressed = fxfuse.compress(model, cal, held_out=held, layers=2, scorer="loss", cache_dir="")
    report = compressed.compress_report
    assert len(report.steps) == 2 and all(s.accepted for s in report.steps)
    assert count(compressed.graph_module, ATTENTION) == 2
    if compressed.report.lowered:  # oneDNN builds: the lowering counts are the compressed program's
        assert compressed.report.lowered["gated_linear(silu)"] == 2
    assert report.steps[-1].parameters < report.original_parameters
    assert report.steps[-1].kv_bytes_per_token == report.original_kv_bytes_per_token // 2
    out = compressed(**held[0])
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), held[0]["input_ids"][:, 1:].flatten())
    # The report's last held-out perplexity is that of the returned module (first batch checked here).
    assert abs(float(nll.exp()) / report.steps[-1].quality.value - 1) < 0.25
    assert "attention[" in str(report) and "perplexity" in str(report)
    # each step is timed as it will run (lowered), next to the original
    assert report.original_latency_ms > 0 and all(s.latency_ms > 0 for s in report.steps)
    assert f"{report.steps[-1].latency_ms:.3g}" in str(report).splitlines()[-2]


def test_the_budget_refuses_a_step_that_would_break_it():
    model = _deep_llama()
    cal, held = _token_data(4), _token_data(2, seed=1)
    first = fxfuse.compress(model, cal, held_out=held, attention_sublayers=1, scorer="similarity", cache_dir="")
    loss = first.compress_report.steps[0].quality_loss
    budget = loss - 1e-6  # just below what the first removal costs
    refused = fxfuse.compress(model, cal, held_out=held, attention_sublayers=3, scorer="similarity",
                              max_quality_loss=budget, cache_dir="")
    report = refused.compress_report
    assert report.accepted == []
    assert len(report.steps) == 1 and not report.steps[0].accepted
    assert count(refused.graph_module, ATTENTION) == 4  # nothing removed
    assert "allowed 0 of the 3" in str(report) and "REFUSED" in str(report)
    loose = fxfuse.compress(model, cal, held_out=held, attention_sublayers=2, scorer="similarity",
                            max_quality_loss=abs(loss) + 1.0, cache_dir="")
    assert all(s.quality_loss <= abs(loss) + 1.0 for s in loose.compress_report.accepted)


def test_compress_explains_bad_requests():
    model = _deep_llama(layers=2)
    cal = _token_data(2)
    with pytest.raises(InputError, match="one kind of removal"):
        fxfuse.compress(model, cal, layers=1, attention_sublayers=1)
    with pytest.raises(InputError, match="has 2"):
        fxfuse.compress(model, cal, layers=3, cache_dir="")
    with pytest.raises(InputError, match="scorer"):
        fxfuse.compress(model, cal, layers=1, scorer="magic")
    with pytest.raises(InputError, match="held_out"):
        fxfuse.compress(model, cal[:1], layers=1)
    with pytest.raises(InputError, match="dicts"):
        fxfuse.compress(model, [torch.zeros(2, 3)], layers=1)


def test_size_targets_remove_until_met_and_no_further():
    model = _deep_llama()
    cal, held = _token_data(3), _token_data(1, seed=1)
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    fraction = (total - 1.5 * per_layer) / total  # one layer is not enough, two are
    compressed = fxfuse.compress(model, cal, held_out=held, params=fraction, scorer="similarity", cache_dir="")
    report = compressed.compress_report
    assert report.unit == "layers" and len(report.steps) == 2
    assert report.steps[0].parameters > fraction * total >= report.steps[1].parameters
    by_kv = fxfuse.compress(model, cal, held_out=held, kv_bytes=0.5, unit="attention_sublayers",
                            scorer="similarity", cache_dir="")
    steps = by_kv.compress_report.steps
    assert [s.removed[0].split("[")[0] for s in steps] == ["attention", "attention"]  # a quarter of the KV each
    assert steps[-1].kv_bytes_per_token == by_kv.compress_report.original_kv_bytes_per_token // 2
    budgeted = fxfuse.compress(model, cal, held_out=held, params=fraction, scorer="similarity",
                               max_quality_loss=0.0, cache_dir="")
    assert "toward params=" in str(budgeted.compress_report)
    for bad, match in [(dict(params=1.5), "between 0 and 1"), (dict(params=0.5, layers=1), "not several"),
                       (dict(params=0.5, kv_bytes=0.5), "not several"),
                       (dict(kv_bytes=0.5, unit="mlp_sublayers"), "removes one of"),
                       (dict(layers=1, unit="layers"), "unit= chooses")]:
        with pytest.raises(InputError, match=match):
            fxfuse.compress(model, cal, held_out=held, **bad)


class _WordTokenizer:
    """Splits on spaces; each word's id is its length (enough to check the cutting into rows)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(w) for w in text.split()]}


def test_texts_are_cut_into_full_rows():
    out = batches((_WordTokenizer(), ["a bb ccc", "dddd eeeee", "ffffff g"]), seq_len=3, batch_size=1)
    assert [b["input_ids"].tolist() for b in out] == [[[1, 2, 3]], [[4, 5, 6]]]  # the 7th token is dropped
    assert all(b["attention_mask"].sum() == 3 for b in out)
    with pytest.raises(InputError, match="fewer than one row"):
        batches((_WordTokenizer(), ["a"]), seq_len=3)


def _folds(signal: float, batches_: int = 6, tokens: int = 40, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    true_delta = torch.randn(d, d, generator=g, dtype=torch.float64)
    folds = []
    for _ in range(batches_):
        m = torch.randn(tokens, d, generator=g, dtype=torch.float64)
        r = signal * m @ true_delta + torch.randn(tokens, d, generator=g, dtype=torch.float64)
        folds.append((m.T @ m, m.T @ r, float((r * r).sum())))
    return folds


def test_the_ridge_is_chosen_on_left_out_batches_and_no_repair_wins_over_noise():
    ridge, gain = cross_validated_ridge(_folds(signal=3.0))
    assert ridge is not None and ridge <= 1e-1 and gain < 0.2  # a real linear relation: fitted, error down 5x
    ridge, gain = cross_validated_ridge(_folds(signal=0.0, tokens=10))  # noise, few tokens per weight
    assert ridge is None and gain == 1.0
    assert cross_validated_ridge(_folds(signal=3.0)[:1]) == (None, 1.0)  # one batch: nothing to check on


def test_a_compressed_checkpoint_reloads_with_transformers(tmp_path):
    model = _deep_llama()
    with torch.no_grad():  # layer 0 matters most, so a later one goes and the layer before it is refitted
        model.model.layers[0].mlp.down_proj.weight.mul_(30.0)
    cal, held = _token_data(4), _token_data(2, seed=1)
    compressed = fxfuse.compress(model, cal, held_out=held, layers=2, scorer="similarity", ridge=1e-2, cache_dir="")
    assert any("refit" in note for s in compressed.compress_report.steps for note in s.repairs)  # weights changed
    compressed.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    for batch in (held[0], _token_data(1, batch=1, seq=11, seed=5)[0]):
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, compressed(**batch).logits, rtol=1e-4, atol=1e-4)


def test_removed_sublayers_cannot_be_saved_and_the_error_says_what_can():
    model = _deep_llama(layers=2)
    compressed = fxfuse.compress(model, _token_data(2), held_out=_token_data(1, seed=1), attention_sublayers=1,
                                 scorer="similarity", cache_dir="")
    with pytest.raises(InputError, match="Compress with layers="):
        compressed.save_pretrained("/tmp/never-written")


def test_an_encoder_is_judged_by_embedding_cosine_and_its_post_norm_gap_is_not_refitted():
    zoo = _zoo("bert")
    model = zoo.build("sdpa")
    cal = [zoo.inputs(2, 9, seed=s) for s in range(3)]
    compressed = fxfuse.compress(model, cal, held_out=[zoo.inputs(2, 9, seed=9)], mlp_sublayers=1,
                                 scorer="similarity", cache_dir="")
    report = compressed.compress_report
    assert report.original.metric == "cosine" and abs(report.original.value - 1) < 1e-6
    step = report.steps[0]
    assert 0 < step.quality_loss < 1 and step.quality.value == pytest.approx(1 - step.quality_loss)
    assert count(compressed.graph_module, ATTENTION) == LAYERS  # MLP sublayer removed, attention kept
    assert count(compressed.graph_module, torch.ops.fxfuse.gelu.default) == LAYERS - 1
    assert step.parameters < report.original_parameters
    assert any("post-norm" in note or "no branch before" in note for note in step.repairs)
    out = compressed(**zoo.inputs(3, 11, seed=4))
    assert out.last_hidden_state.shape == (3, 11, 32)
