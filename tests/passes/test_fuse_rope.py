"""fuse-rope: the rotate_half rotations of q and k become one fxfuse.rope."""

from __future__ import annotations

import torch

from fxfuse.passes import PASSES
from tests.helpers import captured as capture_any, count, run_pipeline

ops = torch.ops.fxfuse
aten = torch.ops.aten
PIPELINE = ["canonicalize", "dce", "cse", "fuse-rope", "dce"]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(torch.nn.Module):
    def __init__(self, rotate_k: bool = True, rot_dim: int | None = None) -> None:
        super().__init__()
        self.rotate_k, self.rot_dim = rotate_k, rot_dim

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.rot_dim is not None:  # partial rotary, as GPT-NeoX/Phi spell it
            r = self.rot_dim
            q_rot = q[..., :r] * cos + rotate_half(q[..., :r]) * sin
            return torch.cat((q_rot, q[..., r:]), -1), k
        q2 = q * cos + rotate_half(q) * sin
        k2 = k * cos + rotate_half(k) * sin if self.rotate_k else k
        return q2, k2


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
    assert next(r for r in results if r.name == "fuse-rope").rewrites["rotate_half_pair"] == 1
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


def test_partial_rotary_is_not_taken_for_full_rotary():
    args = inputs(rot_dim=4)
    gm = captured(Rope(rot_dim=4), *args)
    run_pipeline(gm, PIPELINE, *args)
    assert count(gm, ops.rope.default) == 0


def test_fused_rope_runs_at_other_shapes():
    model = Rope()
    args = inputs()
    gm = captured(model, *args)
    run_pipeline(gm, PIPELINE, *args)
    other = inputs(b=3, s=9)
    for got, want in zip(gm(*other), model(*other)):
        torch.testing.assert_close(got, want)
