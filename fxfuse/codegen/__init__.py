"""Back ends: lowering of the fxfuse dialect ops.

``eager`` runs each dialect op's reference implementation (registered with
the op in ``fxfuse.ir.dialect``: SDPA, ``F.layer_norm`` and friends), so an
eager graph needs no rewriting. Triton (CUDA) and ONNX back ends are built
on the same ops.
"""

from __future__ import annotations

BACKENDS = ("auto", "eager", "triton")


def resolve_backend(backend: str) -> str:
    """The concrete back end for ``backend``; "auto" picks the best one available."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "the Triton back end is not available in this version of fxfuse; "
            "use backend='eager' (or 'auto')"
        )
    return "eager"
