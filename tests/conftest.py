"""Suite-wide set-up: Triton kernels run under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported (``triton.jit``
reads it when a kernel is decorated); this root conftest is loaded before any
test module, so every test directory sees the same setting. Every test runs
under ``fxfuse.errors.strict()``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fxfuse.errors import strict  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(autouse=True, scope="session")
def _strict_fxfuse():
    """fxfuse's own bugs fail the tests: a rule or pass that raises propagates instead of becoming a rejection."""
    with strict():
        yield


def pytest_addoption(parser):
    parser.addoption("--fuzz-modules", type=int, default=300, help="blocks the differential fuzzer generates")
    parser.addoption("--fuzz-seed", type=int, default=0, help="the differential fuzzer's seed")
