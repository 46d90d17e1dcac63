"""The eager back end: direct reference calls, oneDNN linears with fused epilogues, fallbacks."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fxfuse
from fxfuse.codegen import eager
from fxfuse.cpu_kernels import build, rows, skinny_gemm
from fxfuse.ir.dialect import OPS, REFERENCE
from fxfuse.passes.manager import NumericsError
from tests.helpers import count
from tests.zoo.models import LAYERS, ZOO

needs_onednn = pytest.mark.skipif(not eager.onednn_available(), reason="this PyTorch build has no oneDNN")
# The epilogue each architecture's MLP gets, one per layer.
EPILOGUES = {"bert": "linear+gelu", "opt": "linear+relu", "llama": "gated_linear(silu)"}


@pytest.fixture(autouse=True)
def onednn_gemms():
    """oneDNN for every eligible GEMM, so that call counts do not hang on timings (the timed choice has its tests)."""
    with eager.gemm_kernel("onednn"):
        yield


def _zoo(name):
    return next(m for m in ZOO if m.name == name)


def _onednn_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::_linear_pointwise"))


@pytest.fixture(scope="module", params=sorted(EPILOGUES))
def optimized(request):
    zoo = _zoo(request.param)
    model = zoo.build("eager")
    return zoo, model, fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")


@needs_onednn
def test_every_linear_is_lowered_with_its_epilogue(optimized):
    zoo, _, opt = optimized
    lowered = opt.report.lowered
    assert lowered[EPILOGUES[zoo.name]] == LAYERS
    gemms = sum(n * (2 if kind.startswith("gated") else 1) for kind, n in lowered.items())
    assert gemms == count(opt.graph_module, torch.ops.aten.linear.default)
    program_code = opt.program.graph_module.code
    assert "torch.ops.aten.linear" not in program_code and "torch.ops.fxfuse" not in program_code
    assert "lowered by the eager back end" in str(opt.report)


@needs_onednn
def test_lowered_program_matches_the_model_at_another_shape(optimized):
    zoo, model, opt = optimized
    other = zoo.inputs(3, 13, seed=1)
    with torch.no_grad():
        expected = model(**other).last_hidden_state
        got = opt(**other).last_hidden_state
        calls = _onednn_calls(lambda: opt(**other))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    gated = sum(n for kind, n in opt.report.lowered.items() if kind.startswith("gated"))
    assert calls == sum(opt.report.lowered.values()) + gated  # a gated MLP is two oneDNN GEMMs


@needs_onednn
def test_each_gemm_shape_runs_the_kernel_timed_faster(monkeypatch):
    """Per key (kind, rows rounded up to a power of two, weight shape, epilogue) the faster kernel, timed once."""
    timed: list[str] = []
    winner = {"linear": "aten", "gated": "onednn"}

    def fastest(candidates):
        timed.append(sorted(candidates))
        return winner[current[0]]

    current = ["linear"]
    monkeypatch.setattr(eager, "_fastest", fastest)
    eager.GEMMS.clear()
    g = torch.Generator().manual_seed(0)
    w, wu = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    with eager.gemm_kernel(None), torch.no_grad():
        x = torch.randn(5, 16, generator=g)
        assert _onednn_calls(lambda: eager.linear(x, w, None, "relu")) == 0  # timed: ATen won
        assert _onednn_calls(lambda: eager.linear(torch.randn(7, 16), w, None, "relu")) == 0  # 7 rows: same key
        skinny = ["skinny"] if build.available() else []  # 5 and 7 rows: a decode-sized GEMM
        assert len(timed) == 1 and timed[0] == ["aten", "onednn", *skinny]
        torch.testing.assert_close(eager.linear(x, w, None, "relu"), F.relu(F.linear(x, w)))
        eager.linear(torch.randn(9, 16), w, None, "relu")  # 9 rows: another power-of-two bucket, timed again
        eager.linear(x, w, None, "none")  # another epilogue: timed again
        assert len(timed) == 3
        current[0] = "gated"
        assert _onednn_calls(lambda: eager.gated_linear(x, w, None, x, wu, None, "silu")) == 2
        assert len(timed) == 4
        assert sorted(set(eager.GEMMS.choices.values())) == ["aten", "onednn"]
    eager.GEMMS.clear()
    assert not eager.GEMMS.choices


needs_cpu_kernels = pytest.mark.skipif(not build.available(), reason="fxfuse's CPU kernels could not be built here")


def _counting(monkeypatch, module, *names):
    """Count the calls of ``module``'s functions ``names`` (still running them)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@needs_cpu_kernels
def test_a_decode_step_runs_the_skinny_gemm_and_row_kernels(monkeypatch):
    """A LLaMA-style zoo model at one token a row (a decode step's shapes, without a cache): every GEMM on the
    skinny kernel (gate and up as one gated call), the norms and rotary embedding on the row kernels; the
    outputs equal the model's. At 9 tokens a row (a prefill) none of them runs."""
    zoo = _zoo("llama")
    model = zoo.build("eager")
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    gemms = _counting(monkeypatch, skinny_gemm, "linear", "gated")
    row_ops = _counting(monkeypatch, rows, "rms_norm", "add_rms_norm", "rope")
    one_token = zoo.inputs(3, 1, seed=3)
    with eager.gemm_kernel("skinny"), torch.no_grad():
        got = opt(**one_token).last_hidden_state
        expected = model(**one_token).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert gemms == {"linear": 5 * LAYERS, "gated": LAYERS}  # q, k, v, o, down; gate and up together
    assert row_ops["rope"] == LAYERS and row_ops["rms_norm"] + row_ops["add_rms_norm"] == 2 * LAYERS + 1
    with eager.gemm_kernel("skinny"), torch.no_grad():
        torch.testing.assert_close(opt(**zoo.inputs(2, 9, seed=4)).last_hidden_state,
                                   model(**zoo.inputs(2, 9, seed=4)).last_hidden_state, rtol=1e-4, atol=1e-5)
    assert gemms == {"linear": 5 * LAYERS, "gated": LAYERS} and row_ops["rope"] == LAYERS  # 18 rows: not skinny


@needs_cpu_kernels
def test_skinny_gemm_takes_the_residual_and_gives_way_where_it_cannot_run():
    g = torch.Generator().manual_seed(5)
    x, w, residual = torch.randn(1, 24, generator=g), torch.randn(10, 24, generator=g), torch.randn(1, 10, generator=g)
    with eager.gemm_kernel("skinny"), torch.no_grad():
        torch.testing.assert_close(eager.linear(x, w, None, "swish", "", residual), F.silu(F.linear(x, w)) + residual)
        wide = torch.randn(24, 10, generator=g)  # stored (in, out): the skinny kernel cannot take it, ATen runs
        torch.testing.assert_close(eager.addmm(torch.zeros(10), x, wide), x @ wide)
        x2 = torch.randn(1, 24, generator=g)  # gate and up read different inputs: two GEMMs, not one gated call
        torch.testing.assert_close(eager.gated_linear(x, w, None, x2, w, None, "silu"),
                                   F.silu(F.linear(x, w)) * F.linear(x2, w))


@needs_onednn
def test_the_timing_picks_the_faster_thunk():
    def slow():
        time.sleep(0.002)

    assert eager._fastest({"onednn": slow, "aten": lambda: None}) == "aten"
    assert eager._fastest({"onednn": lambda: None, "aten": slow}) == "onednn"
    with pytest.raises(ValueError, match="must be one of"):
        with eager.gemm_kernel("mkl"):
            pass


@needs_onednn
def test_autograd_runs_the_aten_path_and_gets_the_same_gradients(optimized):
    zoo, model, opt = optimized
    inputs = zoo.inputs(2, 7, seed=2)
    params = dict(opt.graph_module.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    with torch.enable_grad():
        calls = _onednn_calls(lambda: opt(**inputs).last_hidden_state.square().sum().backward())
        model(**inputs).last_hidden_state.square().sum().backward()
    assert calls == 0
    weight = next(name for name in params if name.endswith("weight") and params[name].dim() == 2)
    original = dict(model.named_parameters())[weight.replace("graph_module.", "")]
    torch.testing.assert_close(params[weight].grad, original.grad, rtol=1e-4, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("act,algorithm,reference", [
    ("none", "", lambda y: y),
    ("gelu", "none", F.gelu),
    ("gelu", "tanh", lambda y: F.gelu(y, approximate="tanh")),
    ("relu", "", F.relu),
    ("swish", "", F.silu),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_aten(act, algorithm, reference, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 24, generator=g).to(dtype)  # 21 rows: enough for oneDNN
    w, b = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    with torch.no_grad():
        assert _onednn_calls(lambda: eager.linear(x, w, b, act, algorithm)) == 1
        got = eager.linear(x, w, b, act, algorithm)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, reference(F.linear(x.float(), w.float(), b.float())).to(dtype),
                               rtol=tol, atol=tol)


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() context warns on CPU
def test_linear_falls_back_for_float16_float64_and_onednn_turned_off():
    for dtype in (torch.float16, torch.float64):
        x, w = torch.randn(20, 8, dtype=dtype), torch.randn(6, 8, dtype=dtype)
        with torch.no_grad():
            assert _onednn_calls(lambda: eager.linear(x, w, None, "relu")) == 0
            torch.testing.assert_close(eager.linear(x, w, None, "relu"), F.relu(F.linear(x, w)))
    x, w = torch.randn(20, 8), torch.randn(6, 8)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert _onednn_calls(lambda: eager.linear(x, w, None, "relu")) == 0
        torch.testing.assert_close(eager.linear(x, w, None, "relu"), F.relu(F.linear(x, w)))


@needs_onednn
def test_linear_takes_a_transposed_weight_view():
    x, w_in_out = torch.randn(20, 16), torch.randn(16, 12)  # Conv1D-style (in, out) storage
    with torch.no_grad():
        assert _onednn_calls(lambda: eager.linear(x, w_in_out.t())) == 1
        torch.testing.assert_close(eager.linear(x, w_in_out.t()), x @ w_in_out, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_linear_matches_the_dialect_op(activation):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, generator=g)
    wg, wu, bu = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g), torch.randn(32, generator=g)
    expected = REFERENCE["gated_mlp_act"](F.linear(x, wg), F.linear(x, wu, bu), activation)
    with torch.no_grad():
        assert _onednn_calls(lambda: eager.gated_linear(x, wg, None, x, wu, bu, activation)) == 2
        torch.testing.assert_close(eager.gated_linear(x, wg, None, x, wu, bu, activation), expected,
                                   rtol=1e-5, atol=1e-5)
        # up rows broadcast against gate rows: not one GEMM's output shape, so the reference runs
        x_up = x[:1]
        broadcast = REFERENCE["gated_mlp_act"](F.linear(x, wg), F.linear(x_up, wu, bu), activation)
        assert _onednn_calls(lambda: eager.gated_linear(x, wg, None, x_up, wu, bu, activation)) == 0
        torch.testing.assert_close(eager.gated_linear(x, wg, None, x_up, wu, bu, activation), broadcast)


def test_without_onednn_the_program_calls_the_references_directly():
    zoo = _zoo("llama")
    opt = fxfuse.optimize(zoo.build("eager"), example_kwargs=zoo.inputs(2, 9), backend="eager")
    program = eager.lower(opt.graph_module, onednn=False)
    assert program.lowered == {}
    targets = {n.target for n in program.graph_module.graph.nodes if n.op == "call_function"}
    assert REFERENCE["attention"] in targets and OPS["attention"] not in targets
    assert torch.ops.aten.linear.default in targets
    other = {**zoo.inputs(1, 5, seed=3), **opt.fixed_kwargs}
    with torch.no_grad():
        torch.testing.assert_close(program(**other)[0], opt.graph_module(**other)[0])


def test_a_back_end_that_breaks_numerics_is_refused_or_skipped(monkeypatch):
    zoo = _zoo("bert")
    model, example = zoo.build("eager"), zoo.inputs(2, 9)
    real = REFERENCE["layer_norm"]
    monkeypatch.setitem(REFERENCE, "layer_norm", lambda x, w, b, eps: real(x, w, b, eps) + 0.01)
    with pytest.raises(NumericsError, match="eager back end's output differs"):
        fxfuse.optimize(model, example_kwargs=example, backend="eager")
    opt = fxfuse.optimize(model, example_kwargs=example, backend="eager", on_failure="skip")
    assert opt.program is None and opt.report.lowered == {}
    assert opt.report.skipped[-1].name == "codegen-eager"
    with torch.no_grad():
        torch.testing.assert_close(opt(**example).last_hidden_state, model(**example).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


@needs_onednn
def test_gpt2_conv1d_addmm_runs_on_onednn():
    zoo = _zoo("gpt2")
    model = zoo.build("eager")
    opt = fxfuse.optimize(model, example_kwargs=zoo.inputs(2, 9), backend="eager")
    addmms = count(opt.graph_module, torch.ops.aten.addmm.default)
    assert addmms == 4 * LAYERS and opt.report.lowered["addmm"] == addmms  # c_attn, c_proj, c_fc, mlp c_proj
    other = zoo.inputs(3, 13, seed=1)
    with torch.no_grad():
        expected = model(**other).last_hidden_state
        got = opt(**other).last_hidden_state
        assert _onednn_calls(lambda: opt(**other)) == addmms
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_optimized_module_runs_under_inference_mode(optimized):
    zoo, model, opt = optimized
    other = zoo.inputs(2, 6, seed=4)
    with torch.inference_mode():
        expected = model(**other).last_hidden_state
        got = opt(**other).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_parameters_are_packed_once_and_repacked_when_they_change():
    eager.PACKED.clear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 16, generator=g)
    w = torch.nn.Parameter(torch.randn(12, 16, generator=g))
    w_in_out = torch.nn.Parameter(torch.randn(16, 12, generator=g))  # Conv1D-style (in, out)
    bias = torch.randn(12, generator=g)
    with torch.no_grad():
        first = eager.linear(x, w, bias, "relu")
        assert len(eager.PACKED) == 1
        eager.linear(x, w, bias, "relu")
        assert len(eager.PACKED) == 1  # the same copy, not a new one per call
        torch.testing.assert_close(first, F.relu(F.linear(x, w, bias)), rtol=1e-5, atol=1e-5)
        w.mul_(-2.0)  # an optimizer step or load_state_dict writes in place
        torch.testing.assert_close(eager.linear(x, w, bias, "relu"), F.relu(F.linear(x, w, bias)),
                                   rtol=1e-5, atol=1e-5)
        w.data = torch.randn(12, 16, generator=g)  # new storage, same version counter
        torch.testing.assert_close(eager.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eager.addmm(bias, x, w_in_out), torch.addmm(bias, x, w_in_out),
                                   rtol=1e-5, atol=1e-5)
        assert len(eager.PACKED) == 2  # keyed by the stored (in, out) parameter, not its fresh .t() view
        plain = torch.randn(12, 16, generator=g)  # not a parameter: computed weights are never cached
        torch.testing.assert_close(eager.linear(x, plain), F.linear(x, plain), rtol=1e-5, atol=1e-5)
        assert len(eager.PACKED) == 2
    del w, w_in_out
    assert len(eager.PACKED) == 0  # copies go with their parameters


@needs_onednn
def test_optimized_model_follows_its_weights_after_an_update(optimized):
    zoo, model, opt = optimized
    inputs = zoo.inputs(2, 9)
    with torch.no_grad():
        opt(**inputs)
        for p in opt.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
        got = opt(**inputs)
        expected = model(**inputs)
    torch.testing.assert_close(got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0],
                               expected.last_hidden_state if hasattr(expected, "last_hidden_state") else expected[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [64, 32])  # full and partial rotary
def test_fast_rope_matches_the_reference_in_the_inputs_layout(dtype, rot_dim):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 40, 6, 64, generator=g).to(dtype).transpose(1, 2)  # (B, H, S, D) laid out as (B, S, H, D)
    k = torch.randn(2, 40, 2, 64, generator=g).to(dtype).transpose(1, 2)
    cos, sin = (torch.randn(2, 1, 40, rot_dim, generator=g).to(dtype) for _ in range(2))
    assert q.numel() >= eager.ROPE_MIN_ELEMENTS
    expected = REFERENCE["rope"](q, k, cos, sin, False)
    got = eager.FAST["rope"](q, k, cos, sin, False)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for e, o in zip(expected, got):
        assert o.stride() == e.stride()
        torch.testing.assert_close(o, e, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="rotary dim"):
        eager.FAST["rope"](q, k, cos[..., :rot_dim - 1], sin[..., :rot_dim - 1], False)


def test_fast_rms_norms_equal_the_reference():
    """Above the row kernels' size (a prefill), ATen's _fused_rms_norm: equal in every bit; below it, the row
    kernel (within float32 rounding: tests/cpu_kernels/test_rows.py)."""
    g = torch.Generator().manual_seed(4)
    x, residual, weight = torch.randn(5, 17, 48, generator=g), torch.randn(5, 17, 48, generator=g), torch.randn(48)
    assert x.numel() // x.shape[-1] > rows.MAX_ROWS
    torch.testing.assert_close(eager.FAST["rms_norm"](x, weight, 1e-6), REFERENCE["rms_norm"](x, weight, 1e-6),
                               rtol=0, atol=0)
    for e, o in zip(REFERENCE["add_rms_norm"](x, residual, weight, 1e-5),
                    eager.FAST["add_rms_norm"](x, residual, weight, 1e-5)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    half = x.to(torch.bfloat16)  # computed in float32 and cast back: the reference's path
    torch.testing.assert_close(eager.FAST["rms_norm"](half, weight, 1e-6), REFERENCE["rms_norm"](half, weight, 1e-6))


def test_fast_rms_norm_without_weight_and_on_a_strided_input():
    x = torch.randn(80, 24)  # more rows than the row kernel takes: ATen's, bit-identical
    torch.testing.assert_close(eager.FAST["rms_norm"](x, None, 1e-6), REFERENCE["rms_norm"](x, None, 1e-6),
                               rtol=0, atol=0)
    strided = torch.randn(24, 40).t()  # not contiguous: the reference keeps its layout
    got = eager.FAST["rms_norm"](strided, torch.randn(24), 1e-6)
    assert got.stride() == torch.empty_like(strided).stride()


class _LatentAttention(torch.nn.Module):
    """x (B, S, 32) → 4 absorbed query heads, a rotary part, one latent → fxfuse.latent_attention → (B, S, 32)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 4 * (8 + 4))
        self.kv = torch.nn.Linear(32, 8 + 4)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 12).transpose(1, 2)
        kv = self.kv(x).view(b, s, 1, 12).transpose(1, 2)
        out = torch.ops.fxfuse.latent_attention(q[..., :8], q[..., 8:], kv[..., :8], kv[..., 8:], None, 0.3, True)
        return out.transpose(1, 2).reshape(b, s, 32)


def test_latent_attention_runs_its_reference():
    """The one-GEMM-per-group reference is the eager form: 2 vs 100 ms for SDPA on the concatenated q and k
    at a 2048-token decode step with 16 heads of R = 512 (float32, one thread on the project's Xeon)."""
    model = _LatentAttention().eval()
    x = torch.randn(2, 7, 32)
    opt = fxfuse.optimize(model, (x,), backend="eager")
    assert opt.report.ops == {"latent_attention": 1}
    targets = {n.target for n in opt.program.graph_module.graph.nodes if n.op == "call_function"}
    assert REFERENCE["latent_attention"] in targets and OPS["latent_attention"] not in targets
    other = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(opt(other), model(other))
