"""Capture: dynamic batch/sequence by default, use_cache=False for HF decoders, helpful errors."""

from __future__ import annotations

import pytest
import torch

import fxfuse
from fxfuse.ir.capture import capture


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x)


class Inner(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return x * 2
        return x


def test_capture_error_names_the_module_and_what_to_do():
    with pytest.raises(fxfuse.CaptureError) as info:
        capture(Branchy(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "could not capture Branchy" in message
    assert "failed in: inner (Inner)" in message
    assert "torch.where or torch.cond" in message
    assert info.value.__cause__ is not None


def test_inputs_that_do_not_fit_forward_get_an_input_error():
    with pytest.raises(fxfuse.InputError, match=r"(?s)Inner does not run on the example inputs.*takes 2 positional"):
        capture(Inner(), (torch.randn(2), torch.randn(2)))


def test_batch_and_sequence_dims_are_dynamic():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).softmax(-1)

    model = Lin().eval()
    gm = capture(model, (torch.randn(2, 3, 4),)).graph_module
    x = torch.randn(5, 9, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_a_size_one_example_dim_stays_dynamic():
    captured = capture(torch.nn.Softmax(-1), (torch.randn(1, 3),))
    assert captured.notes == []
    x = torch.randn(4, 3)
    torch.testing.assert_close(captured.graph_module(x), x.softmax(-1))


class OneRowOnly(torch.nn.Module):
    def forward(self, x):
        return x.reshape(3) * 2  # only a batch of one has three elements


def test_a_size_one_dim_the_model_fixes_is_reported_static():
    captured = capture(OneRowOnly(), (torch.randn(1, 3),))
    assert any("dim 0 is static (= 1)" in note for note in captured.notes)
