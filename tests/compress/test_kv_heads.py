"""merge-kv-heads: exact merges of identical and rotated heads, grouping, the API, checkpoints, the cache."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import fxfuse
from fxfuse.compress.api import kv_bytes_per_token
from fxfuse.compress.heads import find_heads
from fxfuse.compress.kv_heads import merge_kv_heads
from fxfuse.errors import InputError
from tests.compress.test_compress import _token_data, _zoo
from tests.helpers import count

ATTENTION = torch.ops.fxfuse.attention.default
D = 8  # the zoo's head dim (hidden 32 over 4 heads)


def _rope_rotation(g: torch.Generator) -> torch.Tensor:
    """A random rotation of each rotate_half frequency pair (j, j + D/2): it commutes with RoPE."""
    r = torch.zeros(D, D)
    for j in range(D // 2):
        t = float(torch.rand(1, generator=g)) * 2 * math.pi
        a, b = j, j + D // 2
        r[a, a], r[a, b], r[b, a], r[b, b] = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
    return r


def _orthogonal(g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(D, D, generator=g))[0]


def _mha(name: str) -> tuple:
    """A zoo model with 4 key/value heads (LLaMA made MHA; BERT is) and its (q, k, v, o) linears per layer."""
    zoo = _zoo(name)
    if name == "llama":
        config = zoo.config()
        config.num_key_value_heads = 4
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()
        return zoo, model, [(a.k_proj, a.v_proj) for a in (layer.self_attn for layer in model.layers)]
    model = zoo.build("sdpa")
    return zoo, model, [(a.key, a.value) for a in (layer.attention.self for layer in model.encoder.layer)]


def _copy_heads(linears, pairs, rotate: bool, rope: bool) -> None:
    """Make KV head ``dst`` a copy of ``src`` for each pair: the same, or rotated (keys by a transform that
    commutes with RoPE where there is RoPE, values by any orthogonal one). The model changes; the copies
    span one head's dims, so they can be merged exactly."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in linears:
            for src, dst in pairs:
                key_map = (_rope_rotation(g) if rope else _orthogonal(g)) if rotate else torch.eye(D)
                value_map = _orthogonal(g) if rotate else torch.eye(D)
                for linear, m in ((k, key_map), (v, value_map)):
                    linear.weight[dst * D:(dst + 1) * D] = m.T @ linear.weight[src * D:(src + 1) * D]
                    if linear.bias is not None:
                        linear.bias[dst * D:(dst + 1) * D] = m.T @ linear.bias[src * D:(src + 1) * D]


def _max_error(zoo, model, merged, fixed) -> float:
    errors = []
    for inputs in (zoo.inputs(2, 9), zoo.inputs(3, 17, seed=1)):  # padded rows, another shape
        with torch.no_grad():
            expected, got = model(**inputs).last_hidden_state, merged(**inputs, **fixed).last_hidden_state
        errors.append(float((expected - got).abs().max()))
    return max(errors)


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("rotate", [False, True], ids=["identical", "rotated"])
def test_heads_that_span_one_head_merge_exactly(name, rotate):
    zoo, model, linears = _mha(name)
    _copy_heads(linears, [(0, 1), (2, 3)], rotate, rope=name == "llama")
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    data = [{**zoo.inputs(2, 9), **opt.fixed_kwargs}, {**zoo.inputs(3, 17, seed=2), **opt.fixed_kwargs}]
    for method in ("aligned", "mean"):
        merged, notes = merge_kv_heads(opt.graph_module, 2, data, method, "neighbours")
        assert count(merged, ATTENTION) == 2 and [h.kv_heads for h in find_heads(merged)] == [2, 2]
        assert kv_bytes_per_token(merged) == kv_bytes_per_token(opt.graph_module) // 2
        assert "[[0, 1], [2, 3]]" in notes[0]
        error = _max_error(zoo, model, merged, opt.fixed_kwargs)
        if method == "aligned" or not rotate:
            assert error < 1e-5, (method, error)
        else:  # mean-pooling averages rotated copies into something else
            assert error > 1e-3
    assert find_heads(opt.graph_module)[0].kv_heads == 4  # the input graph is not changed


def test_activation_grouping_finds_copies_that_are_not_neighbours():
    zoo, model, linears = _mha("llama")
    _copy_heads(linears, [(0, 2), (1, 3)], rotate=True, rope=True)
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    data = [{**zoo.inputs(2, 9), **opt.fixed_kwargs}, {**zoo.inputs(3, 17, seed=2), **opt.fixed_kwargs}]
    merged, notes = merge_kv_heads(opt.graph_module, 2, data, "aligned", "activation")
    assert all("[[0, 2], [1, 3]]" in note for note in notes)
    assert _max_error(zoo, model, merged, opt.fixed_kwargs) < 1e-5  # query heads reordered to their groups
    neighbours, _ = merge_kv_heads(opt.graph_module, 2, data, "aligned", "neighbours")
    assert _max_error(zoo, model, neighbours, opt.fixed_kwargs) > 1e-3


def _decoder(kv_heads=4):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_compress_merges_kv_heads_and_writes_a_gqa_checkpoint(tmp_path):
    model = _decoder()
    cal, held = _token_data(4), _token_data(2, seed=1)
    losses = {}
    for merge in ("mean", "aligned"):
        compressed = fxfuse.compress(model, cal, held_out=held, kv_heads=1, merge=merge, repair=False)
        report = compressed.compress_report
        (step,) = report.steps
        assert step.kv_bytes_per_token == report.original_kv_bytes_per_token // 4
        assert f"{merge} merge" in str(report)
        losses[merge] = step.quality_loss
    # the aligned merge keeps more of a random model than mean-pooling (on held-out tokens)
    assert losses["aligned"] < 0.8 * losses["mean"], losses
    repaired = fxfuse.compress(model, cal, held_out=held, kv_heads=2)
    assert repaired.compress_report.steps[0].quality_loss < 1.0
    assert any("refit" in note for note in repaired.compress_report.steps[0].repairs)
    repaired.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (4, 2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**held[0]).logits, repaired(**held[0]).logits, rtol=1e-4, atol=1e-4)


def test_generation_keeps_the_merged_cache_and_the_compressed_tokens():
    """``to_transformers().generate()`` holds 1 KV head per layer in its cache (measured on the cache tensors),
    and its greedy tokens are those of a no-cache greedy loop over the compressed module."""
    model = _decoder()
    cal = _token_data(4)
    compressed = fxfuse.compress(model, cal, held_out=_token_data(2, seed=1), kv_heads=1)
    rebuilt = compressed.to_transformers()
    prompt = 1 + _token_data(1, batch=2, seq=12, seed=3)[0]["input_ids"] % 127  # no pad token (0) in it
    rebuilt.generation_config.eos_token_id = None  # 8 tokens in every row: no early stop
    with torch.no_grad():
        out = rebuilt.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                               return_dict_in_generate=True, pad_token_id=0)
        ids = prompt
        for _ in range(8):
            logits = compressed(input_ids=ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, ids)
    cache = out.past_key_values
    tokens = cache.get_seq_length()
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 2 * tokens * compressed.compress_report.steps[0].kv_bytes_per_token  # batch of 2
    assert held * 4 == 2 * tokens * compressed.compress_report.original_kv_bytes_per_token


def test_kv_head_merging_explains_bad_requests():
    cal = _token_data(2)
    model = fxfuse.optimize(_decoder(), example_kwargs=cal[0], backend="eager")  # captured once for every call
    with pytest.raises(InputError, match="divide them"):
        fxfuse.compress(model, cal, kv_heads=3)
    with pytest.raises(InputError, match="must be fewer"):
        fxfuse.compress(model, cal, kv_heads=4)
    with pytest.raises(InputError, match="one kind of removal"):
        fxfuse.compress(model, cal, kv_heads=2, layers=1)
    with pytest.raises(InputError, match="merge method"):
        fxfuse.compress(model, cal, kv_heads=2, merge="median")
    with pytest.raises(InputError, match="grouping"):
        fxfuse.compress(model, cal, kv_heads=2, grouping="random")
    with pytest.raises(InputError, match="tp_degree"):
        fxfuse.compress(model, cal, kv_heads=1, tp_degree=2)
    with pytest.raises(InputError, match="scorer"):
        fxfuse.compress(model, cal, kv_heads=2, scorer="loss")


def test_bert_merged_heads_stay_in_process(tmp_path):
    zoo = _zoo("bert")
    model = zoo.build("sdpa")
    data = [zoo.inputs(2, 9, seed=s) for s in range(3)]
    compressed = fxfuse.compress(model, data, held_out=[zoo.inputs(2, 9, seed=7)], kv_heads=2)
    assert [h.kv_heads for h in find_heads(compressed.graph_module)] == [2, 2]
    with pytest.raises(InputError, match="num_key_value_heads"):
        compressed.save_pretrained(tmp_path)
