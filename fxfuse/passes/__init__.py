"""The pass registry: one explicit dict from pass name to pass, and the default pipeline."""

from __future__ import annotations

from fxfuse.errors import InputError
from fxfuse.passes.canonicalize import canonicalize
from fxfuse.passes.cse import cse
from fxfuse.passes.dce import dce
from fxfuse.passes.fuse_attention import fuse_attention
from fxfuse.passes.fuse_layer_norm import fuse_layer_norm
from fxfuse.passes.fuse_mlp import fuse_mlp
from fxfuse.passes.fuse_rms_norm import fuse_rms_norm
from fxfuse.passes.fuse_rope import fuse_rope
from fxfuse.passes.manager import NumericsError, Pass, PassFailure, PassManager, PassResult, Rejection
from fxfuse.passes.merge_projections import merge_projections
from fxfuse.passes.remove_dropout import remove_dropout

PASSES: dict[str, Pass] = {
    "canonicalize": canonicalize,
    "remove-dropout": remove_dropout,
    "dce": dce,
    "cse": cse,
    "merge-projections": merge_projections,
    "fuse-attention": fuse_attention,
    "fuse-rms-norm": fuse_rms_norm,
    "fuse-layer-norm": fuse_layer_norm,
    "fuse-mlp": fuse_mlp,
    "fuse-rope": fuse_rope,
}

DEFAULT_PIPELINE: list[str] = [
    "remove-dropout",
    "canonicalize",
    "dce",
    "cse",
    "fuse-attention",
    "fuse-rope",  # before the norms: a q/k norm after the rope must not take the rope's final add as a residual
    "fuse-rms-norm",
    "fuse-layer-norm",
    "fuse-mlp",
    "canonicalize",  # fused ops leave view pairs (a 3-D attention's flatten, then the model's reshape)
    "dce",
    "cse",
]


def default_pipeline(backend: str) -> list[str]:
    """The default passes for a concrete back end.

    ``merge-projections`` runs for Triton (one wide GEMM instead of two or
    three launches). It is left out on the eager CPU back end: measured on
    this project's 2-core CPU with torch 2.13 (MKL), the merged GEMMs of a
    110M LLaMA-style model at batch 1 × 512 took 2-4% longer than the separate
    ones. Ask for it with ``passes=`` where it pays.
    """
    if backend != "triton":
        return list(DEFAULT_PIPELINE)
    at = DEFAULT_PIPELINE.index("fuse-attention")
    return [*DEFAULT_PIPELINE[:at], "merge-projections", *DEFAULT_PIPELINE[at:]]


def resolve(names: list[str]) -> list[tuple[str, Pass]]:
    """The passes for ``names``, in order; unknown names raise with the list of known ones."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise InputError(f"unknown pass(es) {unknown}; known passes: {sorted(PASSES)}")
    return [(n, PASSES[n]) for n in names]


__all__ = [
    "DEFAULT_PIPELINE", "PASSES", "default_pipeline", "NumericsError", "Pass", "PassFailure", "PassManager",
    "PassResult", "Rejection", "resolve",
]
