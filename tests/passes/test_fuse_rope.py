"""fuse-rope: the rotate_half rotations of q and k become one fxfuse.rope."""

from __future__ import annotations

import pytest
import torch

from fxfuse.passes import PASSES
from tests.helpers import captured as capture_any, count, run_pipeline

ops = torch.ops.fxfuse
aten = torch.ops.aten
PIPELINE = ["canonicalize", "dce", "cse", "fuse-rope", "dce"]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x):
    """GPT-J's rotate_every_two."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class Rope(torch.nn.Module):
    def __init__(self, rotate_k: bool = True, rot_dim: int | None = None, interleaved: bool = False) -> None:
        super().__init__()
        self.rotate_k, self.rot_dim = rotate_k, rot_dim
        self.rot = rotate_pairs if interleaved else rotate_half

    def rotate(self, x, cos, sin):
        if self.rot_dim is None:
            return x * cos + self.rot(x) * sin
        r = self.rot_dim  # partial rotary, as GPT-NeoX/Phi/GPT-J spell it
        return torch.cat((x[..., :r] * cos + self.rot(x[..., :r]) * sin, x[..., r:]), -1)

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin) if self.rotate_k else k


def inputs(rot_dim=8, b=2, s=5):
    torch.manual_seed(0)
    q, k = torch.randn(b, 4, s, 8), torch.randn(b, 2, s, 8)
    angles = torch.randn(b, s, rot_dim // 2).repeat(1, 1, 2)
    return q, k, angles.cos(), angles.sin()


def captured(module, *args):
    auto = torch.export.Dim.AUTO
    return capture_any(module, *args, dynamic_shapes={"q": {0: auto, 2: auto}, "k": {0: auto, 2: auto},
                                                       "cos": {0: auto, 1: auto}, "sin": {0: auto, 1: auto}})


def test_q_and_k_rotations_become_one_op():
    args = inputs()
    gm = captured(Rope(), *args)
    results = run_pipeline(gm, PIPELINE, *args)
    assert next(r for r in results if r.name == "fuse-rope").rewrites["rotary_pair"] == 1
    assert count(gm, ops.rope.default) == 1
    assert count(gm, aten.cat.default) == 0 and count(gm, aten.neg.default) == 0
    (node,) = [n for n in gm.graph.nodes if n.target is ops.rope.default]
    assert [a.name for a in node.args[:2]] == ["q", "k"]


def test_a_lone_rotation_is_left_with_a_reason():
    args = inputs()
    gm = captured(Rope(rotate_k=False), *args)
    result = PASSES["fuse-rope"](gm)
    assert not result.changed and count(gm, ops.rope.default) == 0
    assert "one tensor alone" in result.rejections[0].reason


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("rot_dim", [None, 4], ids=["full", "partial"])
def test_every_spelling_becomes_one_op_on_the_whole_tensors(interleaved, rot_dim):
    args = inputs(rot_dim=rot_dim or 8)
    model = Rope(rot_dim=rot_dim, interleaved=interleaved)
    gm = captured(model, *args)
    run_pipeline(gm, PIPELINE, *args)
    (node,) = [n for n in gm.graph.nodes if n.target is ops.rope.default]
    assert [a.name for a in node.args[:2]] == ["q", "k"] and node.args[4] is interleaved
    assert count(gm, aten.cat.default) + count(gm, aten.stack.default) + count(gm, aten.slice.Tensor) == 0
    other = inputs(rot_dim=rot_dim or 8, b=3, s=9)
    for got, want in zip(gm(*other), model(*other)):
        torch.testing.assert_close(got, want)


def test_a_partial_rotation_is_not_taken_for_a_full_one():
    """The halves of the rotated slice are not the halves of the whole head dim."""
    args = inputs(rot_dim=4)
    gm = captured(Rope(rot_dim=4), *args)
    run_pipeline(gm, ["canonicalize", "dce", "cse"], *args)
    result = PASSES["fuse-rope"](gm)
    (node,) = [n for n in gm.graph.nodes if n.target is ops.rope.default]
    assert node.meta["val"][0].shape[-1] == 8 and result.rewrites["partial_rotary_pair"] == 1
    assert result.rewrites["rotary_pair"] == 0


def test_fused_rope_runs_at_other_shapes():
    model = Rope()
    args = inputs()
    gm = captured(model, *args)
    run_pipeline(gm, PIPELINE, *args)
    other = inputs(b=3, s=9)
    for got, want in zip(gm(*other), model(*other)):
        torch.testing.assert_close(got, want)


def test_every_layer_pairs_its_own_q_and_k_though_all_layers_share_cos_and_sin():
    class Layers(torch.nn.Module):
        def __init__(self, n: int = 4) -> None:
            super().__init__()
            self.q = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(n))
            self.k = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(n))

        def forward(self, x, cos, sin):
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            for q_proj, k_proj in zip(self.q, self.k):
                q, k = q_proj(x), k_proj(x)
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
                x = x + q * k
            return x

    _, _, cos, sin = inputs()
    x = torch.randn(2, 4, 5, 8)
    model = Layers()
    gm = capture_any(model, x, cos, sin)
    results = run_pipeline(gm, PIPELINE, x, cos, sin)
    rope = next(r for r in results if r.name == "fuse-rope")
    assert count(gm, ops.rope.default) == 4 and rope.rejections == []


class HalfRotation(torch.nn.Module):
    """Rotation of the halves with half-width tables: GPT-OSS (chunk) or DeepSeek-V3 (even/odd dims, output
    de-interleaved)."""

    def __init__(self, even_odd: bool) -> None:
        super().__init__()
        self.even_odd = even_odd

    def rotate(self, x, cos, sin):
        a, b = (x[..., 0::2], x[..., 1::2]) if self.even_odd else torch.chunk(x, 2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1)[..., : q.shape[-1] // 2], sin.unsqueeze(1)[..., : q.shape[-1] // 2]
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


@pytest.mark.parametrize("even_odd", [False, True], ids=["chunk", "even_odd"])
def test_half_rotations_become_one_op(even_odd):
    args = inputs()
    model = HalfRotation(even_odd)
    gm = captured(model, *args)
    results = run_pipeline(gm, PIPELINE, *args)
    assert next(r for r in results if r.name == "fuse-rope").rewrites["half_rotation_pair"] == 1
    assert count(gm, ops.rope.default) == 1 and count(gm, aten.sub.Tensor) == 0
    other = inputs(b=3, s=9)
    for got, want in zip(gm(*other), model(*other)):
        torch.testing.assert_close(got, want)
