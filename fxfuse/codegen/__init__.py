"""Back ends: lowering of the fxfuse dialect ops.

``eager`` (``fxfuse.codegen.eager``) runs each dialect op's reference
implementation (registered with the op in ``fxfuse.ir.dialect``: SDPA,
``F.layer_norm`` and friends), and on the CPU runs linears through oneDNN
with their activation epilogues fused. ``triton`` (``fxfuse.codegen.triton``) lowers
each dialect op to an ``fxfuse.kernels`` launcher on CUDA tensors, with the
reference implementation as the fallback. ``inductor``
(``fxfuse.codegen.inductor``, for the ``torch.compile`` back end) hands a
fused graph to Inductor. An ONNX back end is built on the same ops.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from fxfuse.errors import InputError

BACKENDS = ("auto", "eager", "triton")


def triton_available() -> bool:
    """True if Triton can be imported (the ``triton`` extra)."""
    from fxfuse.codegen.triton import available

    return available()


def resolve_backend(backend: str, tensors: Iterable[Any] = ()) -> str:
    """The concrete back end for ``backend``.

    "auto" picks "triton" when Triton is installed and the model runs on CUDA
    (any of ``tensors``, its parameters or example inputs, is a CUDA tensor),
    and "eager" otherwise.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise InputError(
                "backend='triton' needs Triton: pip install 'fxfuse[triton]' (or use backend='eager')"
            )
        return "triton"
    if backend == "auto":
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_available() else "eager"
    return "eager"


def lower(gm: fx.GraphModule, backend: str) -> Any:
    """The runnable program of ``gm`` for a concrete back end ("eager" or "triton")."""
    if backend == "triton":
        from fxfuse.codegen.triton import lower as lower_triton

        return lower_triton(gm)
    from fxfuse.codegen.eager import lower as lower_eager

    return lower_eager(gm)
