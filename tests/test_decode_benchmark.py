"""benchmarks/decode.py: the bytes its floor is built from, and its GEMMs-alone entry."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers import benchmark_script
from tests.zoo.models import ZOO

LLAMA = next(m for m in ZOO if m.name == "llama")


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script("decode.py", "fxfuse_benchmarks_decode")


def test_step_bytes_count_every_linear_once_and_the_static_cache(bench):
    config = LLAMA.config()
    config.tie_word_embeddings = True  # the LM head reads the embedding's tensor: counted once, as a GEMM's
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    last = {}
    forward = model.forward

    def record(*args, **kwargs):
        last.update(kwargs)
        return forward(*args, **kwargs)

    model.forward = record
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static")
    cache = last.get("cache", last.get("past_key_values"))  # transformers 5 names it cache
    weights, kv, linears = bench.step_bytes(model, cache, config, 7)
    layer = model.model.layers[0]
    per_layer = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert linears == 7 * config.num_hidden_layers + 1
    assert weights == 4 * (per_layer * config.num_hidden_layers + config.vocab_size * config.hidden_size)
    head_dim = config.hidden_size // config.num_attention_heads
    assert kv == 2 * config.num_hidden_layers * config.num_key_value_heads * 7 * head_dim * 4  # 5 + 3 - 1 positions


def test_gemms_alone_run_every_linear(bench, monkeypatch):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(LLAMA.config()).eval()
    calls = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: calls.append((x.shape, w.shape)))
    monkeypatch.setattr(bench.skinny_gemm, "linear", lambda x, w: calls.append((x.shape, w.shape)))
    bench.gemms_alone(model)()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert calls == [((1, w.shape[1]), w.shape) for w in weights]
