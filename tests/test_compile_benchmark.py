"""benchmarks/compile.py: the decode step it replays is the step generate() ran, and its rows come out whole."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxfuse
from tests.helpers import benchmark_script
from tests.zoo.models import ZOO

LLAMA = next(m for m in ZOO if m.name == "llama")


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_script("compile.py", "fxfuse_benchmarks_compile")


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(LLAMA.config(), attn_implementation="sdpa").eval()


def test_a_replayed_decode_step_computes_the_last_step_again(bench):
    model = tiny_llama()
    outputs, last = [], {}
    forward = model.forward

    def keep_output(*args, **kwargs):
        out = forward(*args, **kwargs)
        outputs.append(out.logits.clone())
        return out

    model.forward = bench.recording(keep_output, last)
    ids = torch.randint(0, LLAMA.config().vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static",
                       disable_compile=True)
        lengths = [layer.cumulative_length.clone() for layer in last["kwargs"]["cache"].layers]
        for _ in range(2):  # again and again at the same place: the cache does not run past its end
            bench.rewind(last["kwargs"])
            replayed = forward(*last["args"], **last["kwargs"]).logits
            torch.testing.assert_close(replayed, outputs[-1], rtol=0, atol=0)
    assert last["kwargs"]["input_ids"].shape == (1, 1)  # a decode step, not the prefill
    assert [layer.cumulative_length for layer in last["kwargs"]["cache"].layers] == lengths


def test_rewind_says_what_it_cannot_replay(bench):
    with pytest.raises(RuntimeError, match="cumulative_length"):
        bench.rewind({"cache": None})


def test_paired_ratio_is_taken_within_each_round(bench):
    # A way 10% faster than the base in every round, while the host slows both down 3x midway.
    base = [1.0, 1.0, 3.0, 3.0, 3.0]
    median, q1, q3 = bench.paired([0.9 * b for b in base], base)
    assert median == pytest.approx(0.9) and q1 == pytest.approx(0.9) and q3 == pytest.approx(0.9)


def test_decode_gives_a_row_per_way_and_the_floor(bench, monkeypatch):
    monkeypatch.setattr(bench, "WAYS", {"HF eager": bench.WAYS["HF eager"],
                                        "fxfuse": lambda f: torch.compile(f, backend=fxfuse.backend(lower="eager"))})
    rows = bench.decode("tiny", tiny_llama, 6, 3, 1, 5)
    assert [r["way"] for r in rows] == ["HF eager", "fxfuse", "its GEMMs alone (floor)"]
    assert all(r["same"] for r in rows[:2])  # greedy tokens equal HF eager's
    assert all(r["step_ms"] > 0 and r["step_faults"] >= 0 for r in rows)
    assert rows[1]["vs_inductor"][0] == pytest.approx(1.0)  # the second way is the base of the ratio
    text = bench.render([], rows, bench.argparse.Namespace(repeats=1, decode_repeats=1, step_repeats=5, threads=1,
                                                           prompt=6, new_tokens=3))
    assert text.count("| tiny | 6 + 3 |") == 3
    assert f"- tiny, at the decode-step rounds: {torch.get_num_threads()} intra-op threads" in text
    assert "decode_graph" not in rows[0] and "- tiny, fxfuse, its decode graph: lowered eager; notes:" in text


def test_every_way_reads_the_same_weights(bench):
    model = tiny_llama()
    twin = bench.same_weights(model)
    assert twin is not model and twin.model.layers[0] is not model.model.layers[0]  # modules of its own to wrap
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert all(a is b for a, b in zip(model.buffers(), twin.buffers()))


def test_recording_leaves_generate_passing_what_it_passes_the_model_itself(bench):
    # generate() looks at forward's signature to choose its inputs; a wrapper taking **kwargs got a 4-D mask.
    def shapes(kwargs):
        return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in kwargs.items()}

    ids = torch.randint(0, LLAMA.config().vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, cache_implementation="static",
                    disable_compile=True)
    plain, seen = tiny_llama(), {}
    plain.register_forward_pre_hook(lambda module, args, kwargs: seen.update(shapes(kwargs)), with_kwargs=True)
    recorded, last = tiny_llama(), {}
    recorded.forward = bench.recording(recorded.forward, last)
    with torch.no_grad():
        plain.generate(ids, **settings)
        recorded.generate(ids, **settings)
    assert shapes(last["kwargs"]) == seen
