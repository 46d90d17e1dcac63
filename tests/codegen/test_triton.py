"""The Triton back end: lowering of the dialect ops, specialized attention sources, fallbacks.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(``tests/conftest.py`` sets TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton", reason="the triton extra is not installed")

import fxfuse  # noqa: E402
from fxfuse.codegen import resolve_backend  # noqa: E402
from fxfuse.codegen import triton as triton_codegen  # noqa: E402
from fxfuse.ir.dialect import OPS  # noqa: E402
from tests.kernels.refs import ref_attention  # noqa: E402
from tests.zoo.models import ZOO  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOGGER = "fxfuse.codegen.triton"


def _zoo(name):
    return next(m for m in ZOO if m.name == name)


@pytest.fixture(scope="module")
def llama_triton():
    """The zoo's LLaMA (grouped-query attention, rope, RMSNorm, SwiGLU) optimized for the Triton back end."""
    zoo = _zoo("llama")
    return fxfuse.optimize(zoo.build("eager"), example_kwargs=zoo.inputs(2, 9), backend="triton")


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_zoo_model_matches_eager_backend(name, caplog, request):
    zoo = _zoo(name)
    model = zoo.build("eager").to(DEVICE)
    example = {k: v.to(DEVICE) for k, v in zoo.inputs(2, 9).items()}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        eager = fxfuse.optimize(model, example_kwargs=example, backend="eager")
        if name == "llama" and DEVICE == "cpu":
            fast = request.getfixturevalue("llama_triton")
        else:
            fast = fxfuse.optimize(model, example_kwargs=example, backend="triton")
    assert fast.report.backend == "triton" and fast.program is not None
    assert not [r for r in caplog.records if r.name == LOGGER], "no op should fall back"
    assert not fast.program.fallbacks
    lowered = {lw.op for lw in fast.program.lowerings.values()}
    assert lowered == set(fast.report.ops)  # every dialect op in the graph is lowered
    other = {k: v.to(DEVICE) for k, v in zoo.inputs(3, 13, seed=1).items()}
    with torch.no_grad():
        expected = eager(**other).last_hidden_state
        got = fast(**other).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the optimized graph still calls the dialect ops; the lowered copy calls the kernels
    assert "torch.ops.fxfuse.attention" in fast.graph_module.code
    assert "fxfuse.attention" not in fast.program.graph_module.code
    assert "fxfuse_triton_attention" in fast.program.graph_module.code


def test_generated_sources_are_the_attention_variants(llama_triton, tmp_path):
    opt = llama_triton
    sources = opt.generated_sources()
    assert len(sources) == 1  # both layers share one variant: scale 1/√8, float (padding + causal) mask
    (name, source), = sources.items()
    assert name.startswith("fxfuse_attn_floatmask_")
    assert f"def {name}(" in source and "@triton.jit" in source and "0.35355339" in source
    written = opt.generated_sources(dump_dir=tmp_path)
    assert (tmp_path / f"{name}.py").read_text() == written[name] == source
    eager = fxfuse.optimize(_Attn().eval(), (torch.randn(2, 5, 16),), backend="eager")
    assert eager.generated_sources() == {}


def test_rope_runs_in_place_when_safe(llama_triton):
    ropes = [lw for lw in llama_triton.program.lowerings.values() if lw.op == "rope"]
    assert ropes and all(lw.inplace for lw in ropes)  # q, k: pieces of a fresh projection, read once


class _Attn(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48, dtype=dtype)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).flatten(2)


def test_uncovered_dtype_falls_back_with_a_log_line(caplog):
    model = _Attn(torch.float64).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        opt = fxfuse.optimize(model, (x,), backend="triton")
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("attention" in m and "reference implementation" in m and "float64" in m for m in messages)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


def test_device_fallback_logs_once_per_node_and_reason(caplog):
    model = _Attn().eval()
    x = torch.randn(2, 5, 16)
    opt = fxfuse.optimize(model, (x,), backend="eager")
    program = triton_codegen.lower(opt.graph_module, device_ok=lambda *tensors: False)
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(program(x), model(x))
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1 and "the kernels run on CUDA tensors" in messages[0]
    assert program.fallbacks == [(next(iter(program.lowerings)), messages[0].split("implementation: ", 1)[1])]


def test_lowered_program_reads_parameters_through_the_optimized_module():
    model = _Attn().eval()
    x = torch.randn(2, 5, 16)
    opt = fxfuse.optimize(model, (x,), backend="triton")
    names = set(opt.state_dict())
    assert names and all(n.startswith("graph_module.") for n in names)  # no second copy
    with torch.no_grad():
        before = opt(x)
        opt.graph_module.get_submodule("proj").weight.mul_(2)  # in place
        opt.graph_module.get_submodule("proj").bias = torch.nn.Parameter(torch.zeros(48))  # rebound
        model.proj.weight.mul_(2)
        model.proj.bias.zero_()
        after = opt(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model(x), rtol=1e-4, atol=1e-4)


def test_score_mods_hook_adds_a_sliding_window():
    model = _Attn().eval()
    x = torch.randn(2, 11, 16)
    opt = fxfuse.optimize(model, (x,), backend="eager")
    node = next(n for n in opt.graph_module.graph.nodes if n.target is OPS["attention"])
    triton_codegen.set_score_mods(node, window=3)
    program = triton_codegen.lower(opt.graph_module)
    (name,) = program.generated_sources()
    assert "window" in name and "- WINDOW" in program.generated_sources()[name]
    with torch.no_grad():
        q, k, v = model.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        expected = ref_attention(q, k, v, causal=True, window=3).transpose(1, 2).flatten(2)
        torch.testing.assert_close(program(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not an fxfuse.attention"):
        triton_codegen.set_score_mods(next(iter(opt.graph_module.graph.nodes)), window=3)


def test_resolve_backend(monkeypatch):
    assert resolve_backend("auto", [torch.zeros(1)]) == "eager"
    assert resolve_backend("triton") == "triton"
    assert resolve_backend("eager") == "eager"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("tvm")
    monkeypatch.setattr(triton_codegen, "available", lambda: False)
    with pytest.raises(fxfuse.errors.InputError, match="triton"):
        resolve_backend("triton")
    assert resolve_backend("auto", [torch.zeros(1, device="meta")]) == "eager"


def test_attention_with_sinks_falls_back_to_the_reference_with_the_reason():
    zoo = _zoo("gpt_oss")
    model = zoo.build("eager").to(DEVICE)
    example = {k: v.to(DEVICE) for k, v in zoo.inputs(2, 6).items()}
    opt = fxfuse.optimize(model, example_kwargs=example, backend="triton")
    attention = {n.name for n in opt.graph_module.graph.nodes if n.target is OPS["attention"]}
    assert {node for node, _ in opt.program.fallbacks} >= attention and len(attention) == 2
    assert {reason for node, reason in opt.program.fallbacks if node in attention} == {
        "attention sinks (extra per-row logits) have no kernel"}
    with torch.no_grad():
        torch.testing.assert_close(opt(**example).last_hidden_state,
                                   model(**example, use_cache=False).last_hidden_state, rtol=1e-4, atol=1e-4)


class _LatentAttention(torch.nn.Module):
    """x (B, S, 32) → 4 absorbed query heads (R = 16, Dr = 8) over ``groups`` latents → fxfuse.latent_attention."""

    def __init__(self, groups=1, dtype=torch.float32):
        super().__init__()
        self.groups = groups
        self.q = torch.nn.Linear(32, 4 * 24, dtype=dtype)
        self.kv = torch.nn.Linear(32, groups * 24, dtype=dtype)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 24).transpose(1, 2)
        kv = self.kv(x).view(b, s, self.groups, 24).transpose(1, 2)
        out = torch.ops.fxfuse.latent_attention(q[..., :16], q[..., 16:], kv[..., :16], kv[..., 16:], mask, 0.2, True)
        return out.transpose(1, 2).reshape(b, s, 64)


@pytest.mark.parametrize("groups", [1, 2])
def test_latent_attention_is_lowered_to_its_kernel(groups, caplog):
    model = _LatentAttention(groups).eval().to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=DEVICE)
    keep[1, ..., 6:] = False  # padding
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        opt = fxfuse.optimize(model, (x, keep), backend="triton")
    assert not opt.program.fallbacks and not [r for r in caplog.records if r.name == LOGGER]
    assert opt.program.lowered == {"latent_attention": 1}
    assert "fxfuse_triton_latent_attention" in opt.program.graph_module.code
    with torch.no_grad():
        torch.testing.assert_close(opt(x, keep), model(x, keep), rtol=1e-4, atol=1e-4)


def test_latent_attention_of_an_uncovered_dtype_falls_back(caplog):
    model = _LatentAttention(dtype=torch.float64).eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        opt = fxfuse.optimize(model, (x, None), backend="triton")
    assert [reason for _, reason in opt.program.fallbacks] == [
        "dtype torch.float64 (the kernels take float16, bfloat16, float32)"]
    with torch.no_grad():
        torch.testing.assert_close(opt(x, None), model(x, None))
