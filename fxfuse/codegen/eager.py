"""Eager back end: the dialect ops' reference implementations, and oneDNN or fxfuse's own linears on the CPU.

:func:`lower` takes the optimized graph module and returns an
:class:`EagerProgram`, a copy of the graph (reading parameters through the
optimized module, ``_root``, as the Triton program does) in which

* each dialect node calls its implementation directly instead of going
  through the dispatcher, which costs about 10 µs a call: the reference
  (``fxfuse.ir.dialect.REFERENCE``), or for the rotary embedding and the
  RMS norms this module's forms (:data:`FAST`), which compute the same
  numbers in fewer passes over memory;
* each ``aten.linear`` calls :func:`linear` through a :class:`GemmSite`
  (which keeps the node's kernel), and a linear whose only reader is
  an activation (``fxfuse.gelu`` erf or tanh, ``relu``, ``silu``) calls it
  with that activation as its epilogue; a ``fxfuse.gated_mlp_act`` whose gate
  and up inputs are single-use linears becomes :func:`gated_linear`: the gate
  GEMM with the activation epilogue, then the up GEMM with a multiply
  epilogue, so the (tokens × intermediate) products are written once each;
* each ``addmm(bias, x, w)`` with a 1-D bias (GPT-2's ``Conv1D``) calls
  :func:`addmm`, the same linear on the transposed view of ``w``.

:func:`linear` runs oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``,
the kernel Inductor's CPU back end uses for linear + pointwise fusion) or
``F.linear`` plus the activation (ATen's GEMM, MKL on x86) or, for at most
16 rows (a decode step), fxfuse's skinny GEMM (``fxfuse.cpu_kernels``, which
streams each weight at memory speed), whichever :data:`GEMMS` timed fastest
for that shape on this machine, on CPU
float32/bfloat16 tensors when no gradient is needed; ``F.linear`` otherwise
(CUDA tensors, autograd, other dtypes, oneDNN turned off with
``torch.backends.mkldnn.flags(enabled=False)``), so the program computes the
same thing everywhere. Neither kernel wins everywhere: on an AMD EPYC (Zen 4,
2 threads) oneDNN ran 8-25% faster at transformer shapes and a fused SwiGLU
17% faster than three kernels; on an Intel Xeon (AVX-512, 2 threads) they
were even at 512 rows, oneDNN 20-40% faster at 4-16 rows and ATen up to 2x
faster at one row (a decode step).

A weight that is an ``nn.Parameter`` is handed to oneDNN in its own blocked
layout (:data:`PACKED`), made on first use, as Inductor's freezing does:
oneDNN on the plain (out, in) weight reorders it on every call. The packed
copies cost one more copy of the linear weights' memory; ``PACKED.clear()``
frees them.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fxfuse.codegen.program import graph_reading_root, module_reading_root
from fxfuse.cpu_kernels import rows, skinny_gemm
from fxfuse.ir.dialect import OPS, REFERENCE, _check_rope

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_LINEAR = torch.ops.aten.linear.default
# fxfuse.gated_mlp_act's activation → (oneDNN post-op, its algorithm).
_GATED = {"silu": ("swish", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
# oneDNN's post-op (and algorithm) → the skinny GEMM kernel's activation.
_SKINNY_ACT = {("none", ""): "none", ("relu", ""): "relu", ("swish", ""): "silu", ("gelu", "none"): "gelu",
               ("gelu", "tanh"): "gelu_tanh"}


def onednn_available() -> bool:
    """True if this PyTorch build has oneDNN's fused linear (CPU builds of x86 and Arm do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _activate(y: Tensor, act: str, algorithm: str) -> Tensor:
    """``act(y)``, in place on ``y`` (a GEMM's fresh output) when no gradient flows: one buffer fewer."""
    inplace = not _needs_grad(y)
    if act == "none":
        return y
    if act == "gelu":
        return torch.ops.aten.gelu_(y, approximate=algorithm) if inplace else F.gelu(y, approximate=algorithm)
    if act == "relu":
        return F.relu(y, inplace=inplace)
    if act == "swish":
        return F.silu(y, inplace=inplace)
    raise ValueError(f"fxfuse eager back end: unknown linear epilogue {act!r}")


def _onednn_ok(*tensors: Optional[Tensor]) -> bool:
    if not torch.backends.mkldnn.enabled:  # the user turned oneDNN off (torch.backends.mkldnn.flags)
        return False
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if any(t.device.type != "cpu" or t.dtype != dtype for t in present) or dtype not in _ONEDNN_DTYPES:
        return False
    # oneDNN's fused linear has no backward: keep autograd's own ops when a gradient is wanted.
    return not _needs_grad(*present)


class GemmChoice:
    """Which kernel runs each GEMM: oneDNN's (packed weight, fused epilogue), ATen's (MKL) or fxfuse's skinny
    GEMM (at most ``skinny_gemm.MAX_ROWS`` rows), by timing.

    None wins everywhere: on this project's 2-core Intel Xeon, oneDNN on a
    packed weight took 0.6-0.8x ATen's time at 4-16 rows and 1.1-2.6x at one
    row; on an AMD EPYC Zen 4 both read one-row weights at 10-15 GB/s, the
    skinny GEMM at 25-30 GB/s. So the first call of each key (the GEMM kind,
    rows rounded up to a power of two, the weight's shape and dtype, the
    epilogue, and what decides which kernels can take the operands) times
    every kernel that can (best of three after a warm-up, a few GEMMs' time
    once) and every later call of that key runs the winner without looking
    at the operands again. ``force`` (see :func:`gemm_kernel`) skips the
    timing; ``choices`` shows what was chosen.
    """

    KERNELS = ("onednn", "aten", "skinny")

    def __init__(self) -> None:
        self.choices: dict[tuple, str] = {}
        self.force: Optional[str] = None
        self.generation = 0  # bumped whenever earlier choices stop holding (clear, force): GemmSite's key

    def pick(self, key: tuple, candidates: Callable[[], dict[str, Any]]) -> str:
        """The kernel for ``key``; on its first call, the faster of ``candidates()`` (kernel name → thunk,
        "aten" always among them). A forced kernel that cannot take these operands gives way to "aten"."""
        chosen = self.choices.get(key)
        if chosen is None:
            thunks = candidates()
            if self.force is not None:
                return self.force if self.force in thunks else "aten"
            chosen = self.choices[key] = _fastest(thunks) if len(thunks) > 1 else "aten"
        return chosen

    def clear(self) -> None:
        """Forget every choice (they are timed again on next use)."""
        self.choices.clear()
        self.generation += 1


def _fastest(candidates: dict[str, Any], rounds: int = 3) -> str:
    """The name of the thunk in ``candidates`` with the least best-of-``rounds`` time, after one warm-up each."""
    best = dict.fromkeys(candidates, float("inf"))
    for thunk in candidates.values():
        thunk()
    for _ in range(rounds):
        for name, thunk in candidates.items():
            start = time.perf_counter()
            thunk()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.__getitem__)


GEMMS = GemmChoice()


@contextlib.contextmanager
def gemm_kernel(kernel: Optional[str]) -> Iterator[None]:
    """Run every eligible GEMM on ``kernel`` ("onednn", "aten" or "skinny") inside the block (ATen's where
    ``kernel`` cannot take the operands); None: choose by timing."""
    if kernel is not None and kernel not in GemmChoice.KERNELS:
        raise ValueError(f"gemm_kernel: kernel must be one of {GemmChoice.KERNELS} or None, got {kernel!r}")
    previous, GEMMS.force = GEMMS.force, kernel
    saved, GEMMS.choices = GEMMS.choices, {}  # choices made under another force do not apply
    GEMMS.generation += 1
    try:
        yield
    finally:
        GEMMS.force, GEMMS.choices = previous, saved
        GEMMS.generation += 1


def _gemm_key(kind: str, x: Tensor, weight: Tensor, others: tuple, *extra: Any) -> tuple:
    """What decides a GEMM's kernel: the kind, rows rounded up to a power of two, the weight's shape and
    dtype, ``extra`` (the epilogue), and what decides which kernels can take the operands at all."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else x.numel()
    grad = _needs_grad(x, weight, *others)
    return (kind, max(rows - 1, 0).bit_length(), rows <= skinny_gemm.MAX_ROWS, tuple(weight.shape), weight.stride(),
            weight.dtype, x.dtype, x.device.type, grad, torch.backends.mkldnn.enabled, *extra)


class PackedWeights:
    """oneDNN-packed copies of linear weights, keyed by the parameter they copy.

    A copy is made on the parameter's first use and made again when the
    parameter changes (an in-place update bumps its version counter; a new
    ``.data`` moves its storage), so an optimizer step or ``load_state_dict``
    is never read stale. Entries go away with their parameter.
    """

    def __init__(self) -> None:
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, parameter: Tensor, weight: Tensor, rows: int) -> Tensor:
        """The packed copy of ``weight``, an (out, in) view of ``parameter``, tuned for ``rows`` rows."""
        stamp = (parameter._version, parameter.data_ptr(), weight.shape, weight.stride(), weight.dtype)
        entry = self._copies.get(parameter)
        if entry is None or entry[0] != stamp:
            entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight, rows))
            self._copies[parameter] = entry
        return entry[1]

    def clear(self) -> None:
        """Free every packed copy (they are made again on next use)."""
        self._copies.clear()

    def __len__(self) -> int:
        return len(self._copies)


PACKED = PackedWeights()


def _onednn_weight(weight: Tensor, parameter: Tensor, x: Tensor) -> Tensor:
    """``weight`` as oneDNN should read it: the packed copy when ``parameter`` is a model's parameter."""
    if isinstance(parameter, nn.Parameter) and not parameter.is_inference():
        return PACKED.get(parameter, weight, max(1, x.numel() // x.shape[-1]))
    return weight


def _linear_aten(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, algorithm: str,
                 residual: Optional[Tensor], parameter: Optional[Tensor]) -> Tensor:
    y = _activate(F.linear(x, weight, bias), act, algorithm)
    return y if residual is None else y + residual


def _linear_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, algorithm: str,
                   residual: Optional[Tensor], parameter: Optional[Tensor]) -> Tensor:
    packed = _onednn_weight(weight, weight if parameter is None else parameter, x)
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, act, [], algorithm)
    return y if residual is None else y.add_(residual)


def _linear_skinny(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, algorithm: str,
                   residual: Optional[Tensor], parameter: Optional[Tensor]) -> Tensor:
    return skinny_gemm.linear(x, weight, bias, _SKINNY_ACT[act, algorithm], residual)


_LINEAR_KERNELS = {"aten": _linear_aten, "onednn": _linear_onednn, "skinny": _linear_skinny}


def _linear_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "none",
                   algorithm: str = "", residual: Optional[Tensor] = None, *,
                   parameter: Optional[Tensor] = None) -> Callable[..., Tensor]:
    """The kernel :data:`GEMMS` chose for :func:`linear`'s operands (timing the candidates on first use)."""
    operands = (x, weight, bias, act, algorithm, residual, parameter)

    def candidates() -> dict[str, Any]:
        found = {"aten": lambda: _linear_aten(*operands)}
        if _onednn_ok(x, weight, bias, residual):
            found["onednn"] = lambda: _linear_onednn(*operands)
        if (act, algorithm) in _SKINNY_ACT and skinny_gemm.eligible(x, weight, bias, residual) and (
                residual is None or residual.shape == (*x.shape[:-1], weight.shape[0])):
            found["skinny"] = lambda: _linear_skinny(*operands)
        return found

    key = _gemm_key("linear", x, weight, (bias, residual), bias is None or bias.dtype, act, algorithm,
                    residual is None or (residual.dtype, residual.shape))
    return _LINEAR_KERNELS[GEMMS.pick(key, candidates)]


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "none",
           algorithm: str = "", residual: Optional[Tensor] = None, *, parameter: Optional[Tensor] = None) -> Tensor:
    """``act(F.linear(x, weight, bias)) + residual``, with ``act`` one of "none", "gelu" (``algorithm``
    "none" or "tanh"), "relu", "swish" (SiLU), on the kernel :data:`GEMMS` chose for these operands:
    ATen's, oneDNN's (where :func:`_onednn_ok` allows it) or, for at most ``skinny_gemm.MAX_ROWS``
    rows, fxfuse's skinny GEMM (residual added in its epilogue).

    ``parameter`` is the tensor ``weight`` is a view of (default: ``weight`` itself); a parameter's
    packed copy is what oneDNN reads."""
    kernel = _linear_kernel(x, weight, bias, act, algorithm, residual, parameter=parameter)
    return kernel(x, weight, bias, act, algorithm, residual, parameter)


def _gated_aten(x_gate: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], x_up: Tensor, w_up: Tensor,
                b_up: Optional[Tensor], activation: str) -> Tensor:
    gate, up = F.linear(x_gate, w_gate, b_gate), F.linear(x_up, w_up, b_up)
    if gate.shape != up.shape or _needs_grad(gate, up):
        return REFERENCE["gated_mlp_act"](gate, up, activation)
    return _activate(gate, *_GATED[activation]).mul_(up)


def _gated_onednn(x_gate: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], x_up: Tensor, w_up: Tensor,
                  b_up: Optional[Tensor], activation: str) -> Tensor:
    act, algorithm = _GATED[activation]
    gate = torch.ops.mkldnn._linear_pointwise(x_gate, _onednn_weight(w_gate, w_gate, x_gate), b_gate, act, [],
                                              algorithm)
    return torch.ops.mkldnn._linear_pointwise.binary(x_up, gate, _onednn_weight(w_up, w_up, x_up), b_up, "mul")


def _gated_skinny(x_gate: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], x_up: Tensor, w_up: Tensor,
                  b_up: Optional[Tensor], activation: str) -> Tensor:
    return skinny_gemm.gated(x_gate, w_gate, b_gate, w_up, b_up, activation)


_GATED_KERNELS = {"aten": _gated_aten, "onednn": _gated_onednn, "skinny": _gated_skinny}


def _gated_kernel(x_gate: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], x_up: Tensor, w_up: Tensor,
                  b_up: Optional[Tensor], activation: str) -> Callable[..., Tensor]:
    """The kernel :data:`GEMMS` chose for :func:`gated_linear`'s operands (timing them on first use)."""
    operands = (x_gate, w_gate, b_gate, x_up, w_up, b_up, activation)
    same_rows = x_gate.shape[:-1] == x_up.shape[:-1] and w_gate.shape[0] == w_up.shape[0]

    def candidates() -> dict[str, Any]:
        found = {"aten": lambda: _gated_aten(*operands)}
        if same_rows and _onednn_ok(x_gate, w_gate, b_gate, x_up, w_up, b_up):
            found["onednn"] = lambda: _gated_onednn(*operands)
        if same_rows and x_gate is x_up and skinny_gemm.eligible(x_gate, w_gate, b_gate, w_up, b_up):
            found["skinny"] = lambda: _gated_skinny(*operands)
        return found

    key = _gemm_key("gated", x_gate, w_gate, (b_gate, x_up, w_up, b_up), x_gate is x_up, same_rows,
                    tuple(w_up.shape), w_up.stride(), x_up.dtype, b_gate is None or b_gate.dtype,
                    b_up is None or b_up.dtype, activation)
    return _GATED_KERNELS[GEMMS.pick(key, candidates)]


def gated_linear(x_gate: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], x_up: Tensor, w_up: Tensor,
                 b_up: Optional[Tensor], activation: str) -> Tensor:
    """``fxfuse.gated_mlp_act(F.linear(x_gate, w_gate, b_gate), F.linear(x_up, w_up, b_up), activation)``;
    where gate and up read the same input, fxfuse's skinny GEMM can stream both weights in one pass."""
    kernel = _gated_kernel(x_gate, w_gate, b_gate, x_up, w_up, b_up, activation)
    return kernel(x_gate, w_gate, b_gate, x_up, w_up, b_up, activation)


class GemmSite:
    """One GEMM node of a lowered graph (:func:`linear` or :func:`gated_linear`), remembering its kernel.

    A decode step calls about 200 GEMMs, each a few tens of microseconds:
    checking every call's operands for every kernel and building the choice's
    key cost about as much as the Python around the GEMM. A site keeps the
    kernel chosen for its input's shape and whether a gradient is wanted (the
    graph fixes its operands' dtypes, devices and weights), and asks again
    when :data:`GEMMS` forgets its choices or oneDNN is turned off.
    """

    def __init__(self, kind: str, number: int) -> None:
        self.choose = _linear_kernel if kind == "linear" else _gated_kernel
        self.kernels: dict[tuple, Callable[..., Tensor]] = {}
        self.__name__ = self.__qualname__ = f"{kind}_site_{number}"  # how the lowered graph's code names it
        self.__module__ = __name__

    def __call__(self, *args: Any) -> Tensor:
        grad = torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        key = (args[0].shape, grad, GEMMS.generation, torch.backends.mkldnn.enabled)
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.kernels[key] = self.choose(*args)
        return kernel(*args) if self.choose is _gated_kernel else kernel(*args, *_LINEAR_DEFAULTS[len(args):])


# linear()'s positional arguments after x and weight, with their defaults, for a site's short calls.
_LINEAR_DEFAULTS = (None, None, None, "none", "", None, None)


def addmm(bias: Tensor, x: Tensor, weight_in_out: Tensor) -> Tensor:
    """``torch.addmm(bias, x, weight_in_out)`` with a 1-D bias: a linear whose weight is stored (in, out),
    as GPT-2's ``Conv1D`` keeps it; oneDNN reads the transposed view without a copy."""
    return linear(x, weight_in_out.t(), bias, parameter=weight_in_out)


# Below this many elements a rotary call is a handful of dispatcher calls either way and the reference's
# fewer calls win (one decode token: 65 vs 80 µs on the project's Xeon); above it the two-pass form does.
ROPE_MIN_ELEMENTS = 8192


def _rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·cos + rotate_half(x)·sin written into a tensor laid out like ``x``: two passes per half, no temporaries."""
    rot_dim = cos.shape[-1]
    half = rot_dim // 2
    out = torch.empty_like(x)
    x1, x2, o1, o2 = x[..., :half], x[..., half:rot_dim], out[..., :half], out[..., half:rot_dim]
    torch.mul(x1, cos[..., :half], out=o1).addcmul_(x2, sin[..., :half], value=-1)
    torch.mul(x2, cos[..., half:], out=o2).addcmul_(x1, sin[..., half:])
    if rot_dim < x.shape[-1]:
        out[..., rot_dim:] = x[..., rot_dim:]
    return out


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """``fxfuse.rope``: the reference's arithmetic, without its concatenated copies and layout copy-back.

    The reference builds rotate_half(x) by concatenation and copies its
    result back into the input's (B, S, H, D) layout; this writes each half
    straight into that layout: 0.44 ms instead of 2.9 ms for 12 + 4 heads of
    512 tokens on the project's Xeon. A decode step's few heads (float32,
    ``rows.MAX_ROWS`` rows at most) run fxfuse's row kernel, one C++ call;
    interleaved pairs, autograd, cos/sin that broadcast past q or k, and
    other small calls run the reference.
    """
    _check_rope(q, k, cos, sin)
    if not interleaved and k.numel() <= rows.MAX_ROWS * k.shape[-1] and rows.eligible(q, k, cos, sin):
        rotated = rows.rope(q, k, cos, sin)  # a decode step's few heads: one C++ call
        if rotated is not None:
            return rotated
    fast = (not interleaved and q.numel() >= ROPE_MIN_ELEMENTS and not _needs_grad(q, k, cos, sin)
            and q.dtype == k.dtype == cos.dtype == sin.dtype
            and all(cos.dim() <= x.dim() and torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1]) == x.shape[:-1]
                    for x in (q, k)))
    if not fast:
        return REFERENCE["rope"](q, k, cos, sin, interleaved)
    return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)


_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)  # since torch 2.9


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """``fxfuse.rms_norm`` on float32 (contiguous, float32 or no weight): ATen's ``_fused_rms_norm``.

    On the CPU that is a composite too (pow, mean, then in-place steps), but
    with fewer buffers than the reference: 0.27 against 1.36 ms in a loop at
    512 × 768 on the project's Xeon, about 0.4 ms a call inside the
    LLaMA-style model. Equal to the reference in every bit on float32
    (tested). A decode step's few rows (``rows.MAX_ROWS`` at most) run
    fxfuse's row kernel instead (one C++ call instead of ATen's composite:
    its time is all dispatch there), equal to float32 rounding. Other
    dtypes run the reference, which rounds the normalized value to the
    input's dtype before the weight multiplies it.
    """
    fast = (_FUSED_RMS_NORM is not None and x.dtype == torch.float32 and x.is_contiguous()
            and (weight is None or (weight.dtype == torch.float32 and weight.shape == x.shape[-1:]))
            and not _needs_grad(x, weight))
    if not fast:
        return REFERENCE["rms_norm"](x, weight, eps)
    if rows.eligible(x, weight) and (weight is None or weight.is_contiguous()):
        return rows.rms_norm(x, weight, eps)
    return _FUSED_RMS_NORM(x, [x.shape[-1]], weight, eps)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``fxfuse.add_rms_norm``: the sum, then :func:`rms_norm` of it."""
    if x.shape != residual.shape or x.dtype != residual.dtype or not (x.is_contiguous() and residual.is_contiguous()):
        return REFERENCE["add_rms_norm"](x, residual, weight, eps)
    if (rows.eligible(x, residual, weight) and (weight is None or (weight.shape == x.shape[-1:]
                                                                  and weight.is_contiguous()))):
        return rows.add_rms_norm(x, residual, weight, eps)
    total = x + residual
    return rms_norm(total, weight, eps), total


FAST = {"rope": rope, "rms_norm": rms_norm, "add_rms_norm": add_rms_norm}
"""Dialect ops that this back end runs through its own forms; the others run their reference.

``latent_attention``'s reference, one GEMM per latent group for the scores
and one for the values, is the fastest CPU form measured: SDPA on the
concatenated queries and keys (the latent as values) took 50-100x its time
at decode steps (16-32 heads, R = 512, 1-4K keys: SDPA repeats the latent for
every head), 1.2-1.4x at a 256-token causal prefill, and 0.8-0.9x only at a
small one (128 tokens, R = 128, with a mask); float32 and bfloat16, one
thread on the project's Xeon.
"""


def _is_plain_addmm(node: fx.Node) -> bool:
    """An ``addmm(bias, x, w)`` with a 1-D bias and the default alpha and beta."""
    if node.target is not torch.ops.aten.addmm.default or len(node.args) != 3 or node.kwargs:
        return False
    bias = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return isinstance(bias, Tensor) and bias.dim() == 1


def _epilogue(node: fx.Node) -> Optional[tuple[str, str]]:
    """The oneDNN post-op that computes activation node ``node`` of its first argument, if any."""
    if node.target in (OPS["gelu"], torch.ops.aten.gelu.default):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu", approximate) if approximate in ("none", "tanh") else None
    if node.target is torch.ops.aten.relu.default:
        return ("relu", "")
    if node.target is torch.ops.aten.silu.default:
        return ("swish", "")
    return None


def _linear_args(node: Any) -> Optional[tuple]:
    """(x, weight, bias) of a linear node read by exactly one node, else None."""
    if not isinstance(node, fx.Node) or node.target is not _LINEAR or len(node.users) != 1:
        return None
    x, weight, *rest = node.args
    return x, weight, node.kwargs.get("bias", rest[0] if rest else None)


def _lower_linears(graph: fx.Graph) -> Counter:
    """Route ``graph``'s linears and plain addmms to this module's functions; returns what was lowered, by kind."""
    lowered: Counter = Counter()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is OPS["gated_mlp_act"]:
            gate, up = _linear_args(node.args[0]), _linear_args(node.args[1])
            activation = node.kwargs.get("activation", node.args[2] if len(node.args) > 2 else None)
            if gate is None or up is None or node.args[0] is node.args[1] or activation not in _GATED:
                continue
            sources = node.args[:2]
            node.target, node.args, node.kwargs = GemmSite("gated", sum(lowered.values())), (*gate, *up, activation), {}
            lowered[f"gated_linear({activation})"] += 1
            for source in sources:
                graph.erase_node(source)
        elif (post_op := _epilogue(node)) is not None and (args := _linear_args(node.args[0])) is not None:
            source = node.args[0]
            node.target, node.args, node.kwargs = GemmSite("linear", sum(lowered.values())), (*args, *post_op), {}
            lowered[f"linear+{node.args[3]}"] += 1
            graph.erase_node(source)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _LINEAR:
            x, weight, *rest = node.args
            bias = node.kwargs.get("bias", rest[0] if rest else None)
            node.target, node.args, node.kwargs = GemmSite("linear", sum(lowered.values())), (x, weight, bias), {}
            lowered["linear"] += 1
        elif node.op == "call_function" and _is_plain_addmm(node):
            node.target = addmm
            lowered["addmm"] += 1
    return lowered


class EagerProgram:
    """The lowered graph: called like the optimized graph module, runs the eager back end's kernels.

    ``graph_module`` is the lowered ``fx.GraphModule``; its ``_root`` is the
    optimized graph module, whose parameters and buffers it reads.
    ``lowered`` counts the linears routed to oneDNN, by kind ("linear",
    "linear+gelu", "gated_linear(silu)", …); empty without oneDNN.
    """

    def __init__(self, gm: fx.GraphModule, onednn: bool | None = None) -> None:
        graph = graph_reading_root(gm)
        use_onednn = onednn_available() if onednn is None else onednn
        self.lowered = dict(sorted(_lower_linears(graph).items())) if use_onednn else {}
        by_target = {op: FAST.get(name, REFERENCE[name]) for name, op in OPS.items()}
        for node in graph.nodes:
            if node.op == "call_function" and node.target in by_target:
                node.target = by_target[node.target]
        self.graph_module = module_reading_root(gm, graph, "EagerLowered")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def generated_sources(self, dump_dir: str | None = None) -> dict[str, str]:
        """No kernels are generated by this back end."""
        return {}


def lower(gm: fx.GraphModule, onednn: bool | None = None) -> EagerProgram:
    """Lower ``gm`` for the eager back end; ``onednn`` (default: when available) routes linears to oneDNN."""
    return EagerProgram(gm, onednn)
