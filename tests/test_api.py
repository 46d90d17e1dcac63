"""fxfuse.optimize(): the public contract."""

from __future__ import annotations

import pytest
import torch

import fxfuse
from fxfuse.passes import DEFAULT_PIPELINE, PassManager, resolve
from fxfuse.report import count_dialect_ops
from tests.zoo.models import ZOO

LLAMA = next(m for m in ZOO if m.name == "llama")


@pytest.fixture(scope="module")
def llama():
    model = LLAMA.build("eager")
    return model, fxfuse.optimize(model, example_kwargs=LLAMA.inputs(2, 8))


def test_report_renders_passes_ops_and_error(llama):
    _, opt = llama
    text = str(opt.report)
    assert "fuse-attention" in text and "eager_attention×2" in text
    assert "attention×2" in text and "max relative output error" in text
    assert [p.name for p in opt.report.passes] == DEFAULT_PIPELINE


def test_optimized_module_is_an_nn_module_with_the_graph(llama):
    _, opt = llama
    assert isinstance(opt, torch.nn.Module)
    assert any(n.target is torch.ops.fxfuse.attention.default for n in opt.graph_module.graph.nodes)


def test_fixed_kwargs_are_filled_in_and_guarded(llama):
    model, opt = llama
    assert opt.fixed_kwargs == {"use_cache": False}
    with pytest.raises(ValueError, match="use_cache=False"):
        opt(**LLAMA.inputs(2, 8), use_cache=True)


def test_a_second_pipeline_run_changes_nothing(llama):
    model, opt = llama
    inputs = {**LLAMA.inputs(2, 8), **opt.fixed_kwargs}
    with torch.no_grad():
        reference = model(**inputs)
    again = PassManager(resolve(DEFAULT_PIPELINE)).run(opt.graph_module, ((), inputs), reference)
    assert not any(p.changed for p in again)
    assert count_dialect_ops(opt.graph_module) == opt.report.ops


def test_training_mode_is_refused():
    model = LLAMA.build("eager").train()
    with pytest.raises(ValueError, match="model.eval"):
        fxfuse.optimize(model, example_kwargs=LLAMA.inputs(2, 8))


def test_unknown_pass_and_backend_are_refused():
    model = LLAMA.build("eager")
    with pytest.raises(ValueError, match="unknown pass"):
        fxfuse.optimize(model, example_kwargs=LLAMA.inputs(2, 8), passes=["fuse-everything"])
    with pytest.raises(ValueError, match="backend must be one of"):
        fxfuse.optimize(model, example_kwargs=LLAMA.inputs(2, 8), backend="tpu")


def test_a_custom_pipeline_runs_only_its_passes():
    model = LLAMA.build("sdpa")
    opt = fxfuse.optimize(model, example_kwargs=LLAMA.inputs(2, 8), passes=["canonicalize", "fuse-attention", "dce"])
    assert opt.report.ops == {"attention": LLAMA.attention}
