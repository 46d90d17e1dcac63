"""Suite-wide set-up: Triton kernels run under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported (``triton.jit``
reads it when a kernel is decorated); this root conftest is loaded before any
test module, so every test directory sees the same setting.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
