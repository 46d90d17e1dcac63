"""canonicalize, remove-dropout, dce and cse on small graphs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxfuse.passes import PASSES
from tests.helpers import captured, count, run_pipeline

aten = torch.ops.aten


class Spellings(torch.nn.Module):
    def forward(self, x):
        y = x.view(x.shape[0], -1, 4).transpose(1, 2).transpose(1, 2).contiguous()
        z = (y / 4.0)[:, 0:]
        return F.dropout(z, 0.1, training=False) + (y / 4.0)


def test_canonical_form():
    x = torch.randn(2, 8)
    gm = captured(Spellings(), x)
    run_pipeline(gm, ["remove-dropout", "canonicalize", "dce", "cse", "dce"], x)
    for gone in (aten.view.default, aten.transpose.int, aten.permute.default, aten.contiguous.default,
                 aten.div.Tensor, aten.slice.Tensor, aten.dropout.default):
        assert count(gm, gone) == 0, gone
    assert count(gm, aten.mul.Tensor) == 1  # the two y / 4.0 became one mul by 0.25
    (mul,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    assert mul.args[1] == 0.25


def test_active_dropout_is_kept():
    class Drop(torch.nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=True)

    gm = captured(Drop(), torch.randn(2, 3))
    result = PASSES["remove-dropout"](gm)
    assert not result.changed and count(gm, aten.dropout.default) == 1


def test_cse_keeps_random_ops_apart():
    class Rand(torch.nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=True) + F.dropout(x, 0.5, training=True)

    gm = captured(Rand(), torch.randn(2, 3))
    assert not PASSES["cse"](gm).changed
    assert count(gm, aten.dropout.default) == 2


def test_permute_chain_folds_to_one():
    class Chain(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 1, 3).transpose(-1, -2) * 2

    x = torch.randn(2, 3, 4, 5)
    gm = captured(Chain(), x)
    run_pipeline(gm, ["canonicalize", "dce"], x)
    (perm,) = [n for n in gm.graph.nodes if n.target is aten.permute.default]
    assert list(perm.args[1]) == [0, 2, 3, 1]


def test_views_of_mutated_tensors_are_kept_and_others_dropped():
    class Mixed(torch.nn.Module):
        def forward(self, x):
            buf = torch.zeros_like(x)
            buf[:, 0:].add_(x)  # writes buf through a full slice: that slice must stay
            return buf + x[:, 0:] * 2  # a full slice of a tensor nothing writes

    x = torch.randn(2, 3)
    gm = captured(Mixed(), x)
    assert count(gm, aten.slice.Tensor) == 4  # x[:, 0:] is a full slice of dim 0, then of dim 1
    run_pipeline(gm, ["canonicalize", "dce"], x)
    kept = [n for n in gm.graph.nodes if n.target is aten.slice.Tensor]
    assert len(kept) == 2
    assert all(n.args[0].target in (aten.zeros_like.default, aten.slice.Tensor) for n in kept)


class InPlaceThroughAView(torch.nn.Module):
    def __init__(self, base_read_later: bool) -> None:
        super().__init__()
        self.base_read_later = base_read_later

    def forward(self, x, m):
        s = x @ x.transpose(0, 1)
        view = s.view(-1)
        view += m  # writes s too
        return (view, s.sum()) if self.base_read_later else view * 2


def test_in_place_ops_on_a_private_view_become_out_of_place_but_not_when_the_base_is_read():
    x, m = torch.randn(3, 4), torch.randn(9)
    gm = captured(InPlaceThroughAView(False), x, m)
    result = PASSES["canonicalize"](gm)
    assert result.rewrites["functionalize_inplace"] == 1 and count(gm, aten.add_.Tensor) == 0
    torch.testing.assert_close(gm(x, m), InPlaceThroughAView(False)(x, m))
    shared = captured(InPlaceThroughAView(True), x, m)
    assert PASSES["canonicalize"](shared).rewrites["functionalize_inplace"] == 0
    assert count(shared, aten.add_.Tensor) == 1


def test_composites_dispatched_below_autograd_are_written_back():
    """make_fx below autograd (as through DTensor) spells layer_norm as native_layer_norm and SDPA as the CPU's
    flash kernel, each with outputs nobody reads; canonicalize writes the composites back."""
    from torch.fx.experimental.proxy_tensor import make_fx

    class Block(torch.nn.Module):
        def forward(self, x, w, b):
            y = F.layer_norm(x, (8,), w, b, 1e-5)
            q = y.reshape(2, 3, 2, 4).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).sum(1)

    x, w, b = torch.randn(2, 3, 8), torch.randn(8), torch.randn(8)
    gm = make_fx(Block(), tracing_mode="fake")(x, w, b)
    assert count(gm, aten.native_layer_norm.default) == 1
    assert count(gm, aten._scaled_dot_product_flash_attention_for_cpu.default) == 1
    results = run_pipeline(gm, ["canonicalize", "dce"], x, w, b)
    assert results[0].rewrites["dispatched_composite"] == 2
    assert count(gm, aten.layer_norm.default) == 1 and count(gm, aten.native_layer_norm.default) == 0
    assert count(gm, aten.scaled_dot_product_attention.default) == 1
    assert count(gm, aten._scaled_dot_product_flash_attention_for_cpu.default) == 0
