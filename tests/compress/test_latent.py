"""to-mla: the exact full-size latent form, RoRoPE on rotated copies, the API and its refusals."""

from __future__ import annotations

import pytest
import torch

import fxfuse
from fxfuse.compress.api import kv_bytes_per_token
from fxfuse.compress.calibrate import observe
from fxfuse.compress.heads import find_heads
from fxfuse.compress.latent import latent_outputs, to_latent
from fxfuse.errors import InputError
from tests.compress.test_compress import _deep_llama, _token_data, _zoo
from tests.compress.test_kv_heads import D, _copy_heads, _max_error, _mha
from tests.helpers import count

ATTENTION = torch.ops.fxfuse.latent_attention.default


def _data(zoo, opt):
    return [{**zoo.inputs(2, 9, seed=s), **opt.fixed_kwargs} for s in (0, 2)]


@pytest.mark.parametrize("name,kv_heads,rotary", [("llama", 2, D), ("bert", 4, 0)])
@pytest.mark.parametrize("fit", ["activation", "svd"])
def test_a_full_size_latent_is_exact(name, kv_heads, rotary, fit):
    """Every key component kept rotating and a latent as large as the position-free keys and the values:
    the rewritten model computes the source's function, at inputs the fit never saw."""
    zoo = _zoo(name)
    model = zoo.build("sdpa")
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    rope, latent = kv_heads * rotary, kv_heads * (D - rotary + D)
    rewritten = to_latent(opt.graph_module, _data(zoo, opt), rope, latent, fit)
    assert count(rewritten, ATTENTION) == 2 and len(latent_outputs(rewritten)) == 2
    assert kv_bytes_per_token(rewritten) == 2 * (rope + latent) * 4 == kv_bytes_per_token(opt.graph_module)
    assert _max_error(zoo, model, rewritten, opt.fixed_kwargs) < 1e-5
    # a latent below the rank of the keys and values (at most hidden + 1 = 33 here) is not free
    smaller = to_latent(opt.graph_module, _data(zoo, opt), rope // 2, latent // 4, fit)
    assert kv_bytes_per_token(smaller) == 2 * (rope // 2 + latent // 4) * 4
    assert _max_error(zoo, model, smaller, opt.fixed_kwargs) > 1e-3


def test_rotated_copies_share_one_rotary_key():
    """Four KV heads that are rotations of one (keys by RoPE-commuting rotations): each frequency's key
    pairs are one complex number up to a factor, so one rotary key of D dims and a latent of D hold them
    all, a quarter of the cache, exactly; a latent too small for the values is not exact."""
    zoo, model, linears = _mha("llama")
    _copy_heads(linears, [(0, 1), (0, 2), (0, 3)], rotate=True, rope=True)
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    data = _data(zoo, opt)
    rewritten = to_latent(opt.graph_module, data, D, D)
    assert kv_bytes_per_token(rewritten) * 4 == kv_bytes_per_token(opt.graph_module)
    assert _max_error(zoo, model, rewritten, opt.fixed_kwargs) < 1e-5
    assert _max_error(zoo, model, to_latent(opt.graph_module, data, D, D - 2), opt.fixed_kwargs) > 1e-3


def test_compress_latent_kv_reports_the_cache_and_refits():
    model = _deep_llama(layers=2)
    cal, held = _token_data(4), _token_data(2, seed=1)
    plain = fxfuse.compress(model, cal, held_out=held, latent_kv=0.5, repair=False)
    (step,) = plain.compress_report.steps
    assert step.kv_bytes_per_token * 2 == plain.compress_report.original_kv_bytes_per_token
    # the rotary key's size is the one of 1/8 to 1/2 of the 16 numbers per token with the least calibration loss
    (chosen,) = [n for n in step.repairs if n.startswith("rotary key chosen")]
    losses = {int(size): float(loss) for size, loss in (part.split(": ") for part in chosen.split(": ", 1)[1].split(", "))}
    assert sorted(losses) == [2, 4, 6, 8]
    assert f"rope_dims={min(losses, key=losses.__getitem__)}" in plain.compress_report.scorer
    repaired = fxfuse.compress(model, cal, held_out=held, latent_kv=0.5)
    assert any("refit" in n for n in repaired.compress_report.steps[0].repairs)
    # the refit brings each op's output closer to the original op's on the calibration tokens
    original = fxfuse.optimize(model, example_kwargs=cal[0], backend="eager")
    batch = {**cal[0], **original.fixed_kwargs}
    targets, errors = {}, {}
    observe(original.graph_module, {h.name: h.out for h in find_heads(original.graph_module)}, [batch],
            lambda i, v, b: targets.update(v))
    for name, m in (("plain", plain), ("repaired", repaired)):
        outs = latent_outputs(m.graph_module)
        observe(m.graph_module, {f"heads[{i}]": n for i, n in enumerate(outs)}, [batch],
                lambda i, v, b: errors.update({name: sum(float((v[k] - targets[k]).square().sum()) for k in v)}))
    assert errors["repaired"] < 0.95 * errors["plain"], errors
    assert repaired(**held[0]).logits.shape == model(**held[0]).logits.shape


def test_generation_reads_the_latent_cache_and_matches_the_compressed_module(tmp_path):
    """``to_transformers().generate()`` keeps only latents and rotary keys (measured on the cache tensors: the
    report's bytes per token) and gives the greedy tokens of a no-cache loop over the compressed module."""
    model = _deep_llama(layers=2)
    compressed = fxfuse.compress(model, _token_data(4), held_out=_token_data(2, seed=1), latent_kv=0.5)
    rebuilt = compressed.to_transformers()
    prompt = 1 + _token_data(1, batch=2, seq=12, seed=3)[0]["input_ids"] % 127  # no pad token (0) in it
    rebuilt.generation_config.eos_token_id = None
    with torch.no_grad():
        out = rebuilt.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                               return_dict_in_generate=True, pad_token_id=0)
        ids = prompt
        for _ in range(8):
            ids = torch.cat([ids, compressed(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, ids)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 2 * cache.get_seq_length() * compressed.compress_report.steps[0].kv_bytes_per_token
    assert held * 2 == 2 * cache.get_seq_length() * compressed.compress_report.original_kv_bytes_per_token
    with pytest.raises(InputError, match="DeepSeek-V3"):
        compressed.save_pretrained(tmp_path)


def test_latent_kv_explains_bad_requests():
    cal = _token_data(2)
    model = fxfuse.optimize(_deep_llama(layers=2), example_kwargs=cal[0], backend="eager")  # captured once
    with pytest.raises(InputError, match="latent_kv= as a fraction"):
        fxfuse.compress(model, cal, latent_kv=1.5)
    with pytest.raises(InputError, match="rope_dims must be even"):
        fxfuse.compress(model, cal, latent_kv=0.5, rope_dims=3)
    with pytest.raises(InputError, match="rope_dims must be even and at most 16"):
        fxfuse.compress(model, cal, latent_kv=0.9, rope_dims=18)
    with pytest.raises(InputError, match="not more than"):
        fxfuse.compress(model, cal, latent_kv=0.25, rope_dims=8)
    with pytest.raises(InputError, match="'activation' or 'svd'"):
        fxfuse.compress(model, cal, latent_kv=0.5, fit="pca")
