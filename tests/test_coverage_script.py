"""benchmarks/coverage.py: its fxfuse column on one zoo case (no Inductor, no ONNX Runtime: fast)."""

from __future__ import annotations


import pytest

from tests.helpers import benchmark_script
from tests.zoo.models import ZOO


@pytest.fixture(scope="module")
def coverage():
    yield from benchmark_script("coverage.py", "coverage_script")


def test_fxfuse_column_on_bert_eager(coverage):
    bert = next(m for m in ZOO if m.name == "bert")
    col = coverage.fxfuse_columns(bert, "eager")
    assert col.cells["attention"] == "2/2"
    assert col.cells["norms"] == "5/5 (4/4 residual)"
    assert col.cells["mlp"] == "2/2 gelu"
    assert col.cells["rope"] == "-"
    assert float(col.cells["err_example"]) < 1e-4 and float(col.cells["err_other"]) < 1e-4
    assert col.why == []
    # The "not fused" section lists the reasons of rows short of a count.
    short = coverage.Columns({"attention": "**1/2**"}, why=["`to_attention` at `softmax_1`: a reason"])
    text = "\n".join(coverage.not_fused([coverage.Row("bert", "eager", {"fxfuse": short})]))
    assert "**bert-eager**" in text and "a reason" in text
