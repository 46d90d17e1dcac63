"""Kernel tests run on a GPU when there is one, else on CPU tensors under Triton's interpreter.

``tests/conftest.py`` sets TRITON_INTERPRET=1 before triton is imported when
there is no GPU. Without triton installed the whole directory is skipped.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()

if not HAS_TRITON:
    collect_ignore_glob = ["test_*.py"]  # noqa: F841  (read by pytest)


def pytest_report_header(config):
    if not HAS_TRITON:
        return "fxfuse kernels: triton is not installed; tests/kernels skipped (pip install -e '.[triton]')"
    return f"fxfuse kernels: {'CUDA' if ON_GPU else 'CPU under TRITON_INTERPRET=1'}"


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"

