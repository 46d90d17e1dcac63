"""Kernel tests run on a GPU when there is one, else on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (``triton.jit``
reads it when a kernel is decorated), so it is set here, at collection,
before any test module imports ``fxfuse.kernels``. Without triton installed
the whole directory is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()

if HAS_TRITON and not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so its "
            "kernels are compiled for a GPU this machine lacks; run with TRITON_INTERPRET=1 in the environment"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")

if not HAS_TRITON:
    collect_ignore_glob = ["test_*.py"]  # noqa: F841  (read by pytest)


def pytest_report_header(config):
    if not HAS_TRITON:
        return "fxfuse kernels: triton is not installed; tests/kernels skipped (pip install -e '.[triton]')"
    return f"fxfuse kernels: {'CUDA' if ON_GPU else 'CPU under TRITON_INTERPRET=1'}"


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"

