"""The bad-input table (docs/bad-input.md): every row gets fxfuse's own error, or works, and leaves nothing partial."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.errors import FxfuseError, InputError

onnx_export_module = importlib.import_module("fxfuse.onnx_export")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.proj(x) * 0.5, -1)


class BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) if x.sum() > 0 else -self.proj(x)


X = torch.randn(2, 5, 8)
ROWS = {
    "not a module": (lambda: (lambda x: x), (X,), {}, InputError, "takes an nn.Module"),
    "bare tensor as example_args": (lambda: Small().eval(), X, {}, InputError, r"example_args=\(x,\)"),
    "list as example_kwargs": (lambda: Small().eval(), (), [X], InputError, "example_kwargs must be a dict"),
    "unknown pass": (lambda: Small().eval(), (X,), {"passes": ["fuse-all"]}, InputError, "unknown pass"),
    "unknown back end": (lambda: Small().eval(), (X,), {"backend": "tpu"}, InputError, "backend must be one of"),
    "training mode": (lambda: Small().train(), (X,), {}, InputError, r"Call model\.eval\(\)"),
    "example that does not run": (lambda: Small().eval(), (torch.randn(2, 5, 7),), {}, InputError,
                                  r"does not run on the example inputs.*failed in: proj \(Linear\)"),
    "input dtype unlike the weights": (lambda: Small().eval(), (X.double(),), {}, InputError,
                                       r"args\[0\] is torch.float64 but the weights are torch.float32"),
    "input device unlike the weights": (lambda: Small().eval(), (X.to("meta"),), {}, InputError,
                                        r"args\[0\] is on meta but the weights are on cpu"),
    "data-dependent control flow": (lambda: BranchesOnValues().eval(), (X,), {}, fxfuse.CaptureError,
                                    r"branches on tensor \*values\*.*torch\.where or torch\.cond"),
}


@pytest.mark.parametrize("on_failure", ["raise", "skip"])
@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_gets_fxfuses_own_error(row, on_failure):
    build, args, extra, error, message = ROWS[row]
    kwargs = {} if row == "list as example_kwargs" else extra
    example_kwargs = extra if row == "list as example_kwargs" else None
    with pytest.raises(error, match=f"(?s){message}") as caught:
        fxfuse.optimize(build(), args, example_kwargs, on_failure=on_failure, **kwargs)
    assert isinstance(caught.value, FxfuseError)


def test_an_unknown_on_failure_is_refused():
    with pytest.raises(InputError, match="on_failure must be"):
        fxfuse.optimize(Small().eval(), (X,), on_failure="ignore")


def test_sliced_and_repeated_inputs_are_taken_as_their_values():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v

    big = torch.randn(4, 2, 9, 4)
    sliced = big[:2, :, 1:7]  # not contiguous
    opt = fxfuse.optimize(Attend().eval(), (sliced, sliced, sliced))  # one tensor passed three times
    assert opt.report.ops == {"attention": 1}
    q, k, v = torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(opt(q, k, v), Attend()(q, k, v))


def test_export_onnx_takes_sliced_example_inputs(tmp_path):
    ids = torch.arange(60).reshape(6, 10) % 7
    result = fxfuse.export_onnx(Embed().eval(), (ids[:2, :5],), path=tmp_path / "m.onnx")
    assert result.path.exists() and result.max_error < 1e-5


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(7, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, ids):
        return self.norm(self.table(ids))


def test_an_unwritable_output_path_fails_before_any_work_and_writes_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(fxfuse.OnnxExportError, match="cannot write the ONNX file to"):
        fxfuse.export_onnx(Embed().eval(), (torch.zeros(2, 5, dtype=torch.long),), path=blocker / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_an_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export_module, "_validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fxfuse.export_onnx(Embed().eval(), (torch.zeros(2, 5, dtype=torch.long),), path=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
