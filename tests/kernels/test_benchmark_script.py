"""benchmarks/gpu.py: its plan, argument parsing and report writers run without a GPU."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.helpers import benchmark_script


@pytest.fixture(scope="module")
def gpu_bench():
    yield from benchmark_script("gpu.py", "fxfuse_benchmarks_gpu")


def test_dry_run_prints_the_plan(gpu_bench, capsys):
    assert gpu_bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("33 measurements (attention, memory, e2e)")
    assert "d128-causal-s16384" in out and "llama1b-b8x512" in out and "rope" in out


def test_plan_covers_the_issue(gpu_bench):
    cases = gpu_bench.plan(gpu_bench.PARTS, quick=False)
    att = [c.params for c in cases if c.part == "attention"]
    assert {(p["d"], p["causal"]) for p in att} == {(64, False), (64, True), (128, False), (128, True)}
    assert {p["seq"] for p in att} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(p["batch"] * p["seq"] == 16384 and p["heads"] * p["d"] == 2048 for p in att)
    assert {c.name for c in cases if c.part == "memory"} >= {"rms_norm", "layer_norm", "swiglu", "rope"}
    assert [c.params for c in cases if c.part == "e2e"] == [dict(batch=1, seq=2048), dict(batch=8, seq=512)]
    assert len(gpu_bench.plan(("attention",), quick=True)) == 8


def test_arguments(gpu_bench):
    args = gpu_bench.parse_args(["--only", "memory,e2e", "--quick"])
    assert args.parts == ("memory", "e2e") and args.quick
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--only", "attention,nope"])


def test_report_writers(gpu_bench, tmp_path):
    table = gpu_bench.Table("t", ["a", "b"], [["1", "2"]], ["note"])
    assert "| a | b |" in table.markdown() and "| 1 | 2 |" in table.markdown()
    series = {(64, False, "fxfuse"): [(512, 100.0), (1024, 200.0)],
              (64, False, "SDPA flash"): [(512, 90.0), (1024, "OOM")]}
    path = tmp_path / "plot.svg"
    gpu_bench.svg_plot(series, path)
    assert ET.parse(path).getroot().tag.endswith("svg")
    assert gpu_bench.fmt("OOM") == "OOM" and gpu_bench.fmt(1.234) == "1.2"
