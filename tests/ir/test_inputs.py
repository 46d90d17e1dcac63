"""Probes: inputs derived from the example by role (masks padded, ids redrawn in range, positions counting)."""

from __future__ import annotations

import torch

from fxfuse.ir.inputs import derive_probes, grow_unit_dims, grown_sizes, role, standalone
from tests.helpers import captured


def test_roles_are_read_from_dtype_and_values():
    assert role(torch.ones(2, 5, dtype=torch.bool)) == "mask"
    assert role(torch.ones(2, 5, dtype=torch.long)) == "mask"
    assert role(torch.tensor([[1.0, 1.0, 0.0]])) == "mask"
    assert role(torch.tensor([[0.0, 0.0, torch.finfo(torch.float32).min]])) == "additive_mask"
    assert role(torch.tensor([[0.0, float("-inf")]])) == "additive_mask"
    assert role(torch.arange(3, 9)[None].repeat(2, 1)) == "positions"
    assert role(torch.tensor([[5, 17, 3]])) == "ids"
    assert role(torch.randn(2, 3)) == "float"


def test_padded_probe_pads_every_mask_kind_and_keeps_ids_in_range():
    ids = torch.randint(10, 50, (3, 9))
    keep = torch.ones(3, 9, dtype=torch.long)
    additive = torch.zeros(3, 1, 9, 9)
    (probe,) = derive_probes((ids,), {"mask": keep, "bias": additive}, None)
    new_ids, mask, bias = probe.args[0], probe.kwargs["mask"], probe.kwargs["bias"]
    assert new_ids.shape == ids.shape and set(new_ids.unique().tolist()) <= set(ids.unique().tolist())
    assert not torch.equal(new_ids, ids)
    # last row right-padded by a third, first row left-padded by a third, every row keeps a position
    assert mask[-1].tolist() == [1] * 6 + [0] * 3 and mask[0].tolist() == [0] * 3 + [1] * 6
    assert mask[1].tolist() == [1] * 9
    assert (bias[-1, ..., -3:] == torch.finfo(torch.float32).min).all() and (bias[1] == 0).all()


def test_shape_probe_grows_dynamic_dims_alike_and_positions_keep_counting():
    class Model(torch.nn.Module):
        def forward(self, ids, mask, positions):
            return ids * mask + positions

    ids, mask = torch.randint(0, 9, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    positions = torch.arange(6)[None].repeat(2, 1) + 4
    auto = torch.export.Dim.AUTO
    gm = captured(Model(), ids, mask, positions,
                  dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}))
    sizes = grown_sizes(gm, (ids, mask, positions), {})
    assert sizes == [{0: 3, 1: 9}] * 3
    padded, grown = derive_probes((ids, mask, positions), {}, sizes)
    new_ids, new_mask, new_positions = grown.args
    assert new_ids.shape == new_mask.shape == new_positions.shape == (3, 9)
    assert torch.equal(new_positions, (torch.arange(9) + 4)[None].repeat(3, 1))
    assert new_mask[-1, -3:].eq(0).all() and new_mask[0, :3].eq(0).all()
    assert "2×6 → 3×9" in grown.label and torch.equal(padded.args[2], positions)


def test_unit_dims_grow_to_two_and_sliced_inputs_become_contiguous():
    ids, mask4d = torch.tensor([[7]]), torch.zeros(1, 1, 1, 1)
    boldest, no_heads, batch_seq = grow_unit_dims((ids,), {"mask": mask4d})
    assert boldest[0][0].tolist() == [[7, 7], [7, 7]] and boldest[1]["mask"].shape == (2, 2, 2, 2)
    assert no_heads[1]["mask"].shape == (2, 1, 2, 2) and batch_seq[1]["mask"].shape == (2, 1, 1, 1)
    assert grow_unit_dims((torch.zeros(2, 3),), {}) == []
    sliced = torch.arange(40).reshape(4, 10)[:2, :5]
    (out, again), _ = standalone((sliced, sliced), {})
    assert out.is_contiguous() and torch.equal(out, sliced) and torch.equal(again, sliced) and again is not out
