"""What every launcher shares: the interpreter switch, autotune configs, device and autograd rules.

Kernels in this package import only torch and triton. The one environment
variable they look at is Triton's own ``TRITON_INTERPRET``, read here once.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import triton

# Under Triton's CPU interpreter (TRITON_INTERPRET=1, how the tests run without a GPU)
# kernels run on CPU tensors and autotuning would benchmark every config in Python,
# which is slow and says nothing about a GPU: launchers then use one config. This is
# the only place the library reads an environment variable, and it reads Triton's own.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_ok(*tensors: torch.Tensor | None) -> bool:
    """True if the kernels can run on these tensors: CUDA tensors, or CPU tensors under the interpreter."""
    want = "cpu" if INTERPRET else "cuda"
    return all(t is None or t.device.type == want for t in tensors)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def bucket(n: int, cap: int = 1 << 16) -> int:
    """The power of two at or above ``n``, capped: autotune keys that re-tune per size class, not per size."""
    return min(next_pow2(max(int(n), 1)), cap)


def tuned(configs: Sequence[triton.Config], key: list[str], interpret: triton.Config | None = None,
          **kwargs) -> Callable:
    """``triton.autotune`` over ``configs``; under the interpreter over ``interpret`` (default: the first) alone."""
    configs = list(configs)
    if INTERPRET:
        configs = [interpret or configs[0]]
    return triton.autotune(configs=configs, key=key, **kwargs)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in under the interpreter (for split heuristics)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def check_float(name: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fxfuse.kernels.{name}: dtype {t.dtype} is not supported (float16, bfloat16, float32)")


def check_device(name: str, *tensors: torch.Tensor | None) -> None:
    if not device_ok(*tensors):
        where = "CPU tensors (TRITON_INTERPRET=1 is set)" if INTERPRET else "CUDA tensors"
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise ValueError(f"fxfuse.kernels.{name} runs on {where}; got tensors on {', '.join(devices)}")


def needs_grad(*tensors: object) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _NoBackward(torch.autograd.Function):
    """Runs a forward-only kernel inside autograd: the outputs get a grad_fn whose backward raises."""

    @staticmethod
    def forward(ctx, name: str, fn: Callable, n_args: int, *args):
        ctx.name = name
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            out = fn(*args[:n_args])
        if isinstance(out, tuple):
            # An in-place kernel returns its inputs; autograd wants outputs distinct from inputs.
            return tuple(o.view_as(o) if any(o is a for a in args) else o for o in out)
        return out.view_as(out) if any(out is a for a in args) else out

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"fxfuse.kernels.{ctx.name} has a forward pass only (no backward kernel yet). "
            "Run it under torch.no_grad() / torch.inference_mode(), or use the eager back end to train."
        )


def forward_only(name: str, fn: Callable, *args):
    """``fn(*args)``; under autograd with inputs that require grad, the result's backward raises a clear error."""
    if not needs_grad(*args):
        return fn(*args)
    return _NoBackward.apply(name, fn, len(args), *args)
