"""Moving parameters into one huge-page arena: same values, same Parameter objects, one copy, once."""

from __future__ import annotations

import torch

from fxfuse.cpu_kernels import arena


def test_rehome_keeps_values_and_parameters_and_lays_them_out_in_order():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(30, 20), torch.nn.Linear(20, 7)
    params = [first.weight, first.bias, second.weight]
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    moved = arena.rehome([*params, first.weight, torch.randn(5), torch.nn.Parameter(torch.randn(4, 4).t())])
    assert moved == sum(-(-p.numel() * 4 // 64) * 64 for p in params)  # each counted once, cache-line aligned
    assert [id(p) for p in params] == ids and all(torch.equal(p, b) for p, b in zip(params, before))
    assert first.weight.data_ptr() % arena.HUGE_PAGE == 0  # the arena starts on a huge page
    assert first.bias.data_ptr() == first.weight.data_ptr() + 2432  # in the order given: 30 * 20 * 4 bytes, aligned
    assert all(p.storage_offset() == 0 for p in params)  # a storage each: graphs compiled on them still apply
    assert second.weight.data_ptr() > first.bias.data_ptr()
    assert arena.rehome(params) == 0  # moved once
    x = torch.randn(3, 30)
    second(first(x)).sum().backward()  # still trainable parameters
    assert first.weight.grad is not None and first.weight.grad.shape == (20, 30)


def test_nothing_movable_moves_nothing():
    strided = torch.nn.Parameter(torch.randn(4, 6).t())  # not contiguous
    plain = torch.randn(8)  # not a parameter
    ptrs = (strided.data_ptr(), plain.data_ptr())
    assert arena.rehome([strided, plain]) == 0 and (strided.data_ptr(), plain.data_ptr()) == ptrs


def test_huge_page_buffer_is_aligned_and_writable():
    buffer = arena.huge_page_buffer(3 * 2**20)
    assert buffer.numel() == 3 * 2**20 and buffer.data_ptr() % arena.HUGE_PAGE == 0
    buffer.view(torch.float32).fill_(2.0)
    assert float(buffer.view(torch.float32).sum()) == 2.0 * 3 * 2**20 / 4
