"""Building the CPU kernels: where no C++ compiler can build them, everything falls back and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxfuse.cpu_kernels import build

ROOT = Path(__file__).resolve().parents[2]

NO_COMPILER = """
import torch, torch.nn.functional as F
from fxfuse.codegen import eager
from fxfuse.cpu_kernels import build, rows, skinny_gemm
x, w = torch.randn(1, 8), torch.randn(4, 8)
assert not build.available() and not skinny_gemm.eligible(x, w) and not rows.eligible(x)
with torch.no_grad():
    torch.testing.assert_close(eager.linear(x, w), F.linear(x, w))  # ATen's or oneDNN's kernel
    torch.testing.assert_close(eager.rms_norm(x, None, 1e-6), F.rms_norm(x, (8,), None, 1e-6))
try:
    skinny_gemm.linear(x, w)
except RuntimeError as error:
    print("RAISED:", error)
print("REASON:", build.unavailable_reason())
"""


def test_without_a_compiler_the_kernels_fall_back_and_say_why(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reason = done.stdout.split("REASON:", 1)[1].strip()
    assert reason and reason != "None"
    assert "could not be built" in done.stderr  # the warning a user sees once
    assert "RAISED: fxfuse's CPU kernels are not built" in done.stdout and "install a C++ compiler" in done.stdout


@pytest.mark.skipif(not build.available(), reason="fxfuse's CPU kernels could not be built here")
def test_the_built_kernels_say_which_instruction_set_they_picked():
    assert build.isa() in ("avx2+fma", "generic") and build.unavailable_reason() is None

