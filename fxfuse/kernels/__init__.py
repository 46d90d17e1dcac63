"""Triton kernels for the fxfuse dialect ops; they import only torch and triton.

Each kernel is a ``@triton.jit`` function plus a launcher with autotuned
configs, usable without the compiler::

    from fxfuse.kernels import attention, rms_norm
    out = attention(q, k, v, is_causal=True)            # (B, H, S, D), as SDPA
    y, resid = rms_norm(x, weight, 1e-6, residual=r)   # fused residual add

They run on CUDA tensors (on CPU tensors under ``TRITON_INTERPRET=1``), in
float16, bfloat16 and float32, forward only: under autograd the results'
backward raises ``NotImplementedError``.
"""

from fxfuse.kernels._config import INTERPRET, device_ok
from fxfuse.kernels._template import AttentionVariant, compiled_variants, render, set_source_dir, source_dir
from fxfuse.kernels.activations import gated_mlp_act, gelu
from fxfuse.kernels.attention import alibi_slopes, attention, get_kernel
from fxfuse.kernels.latent_attention import latent_attention
from fxfuse.kernels.norms import layer_norm, rms_norm
from fxfuse.kernels.rope import rope

__all__ = [
    "INTERPRET", "AttentionVariant", "alibi_slopes", "attention", "compiled_variants", "device_ok",
    "gated_mlp_act", "gelu", "get_kernel", "latent_attention", "layer_norm", "render", "rms_norm", "rope",
    "set_source_dir", "source_dir",
]
