"""Eager back end: the dialect ops' reference implementations, and oneDNN linears on the CPU.

:func:`lower` takes the optimized graph module and returns an
:class:`EagerProgram`, a copy of the graph (reading parameters through the
optimized module, ``_root``, as the Triton program does) in which

* each dialect node calls its reference implementation directly
  (``fxfuse.ir.dialect.REFERENCE``) instead of going through the dispatcher,
  which costs about 10 µs a call;
* each ``aten.linear`` calls :func:`linear`, and a linear whose only reader is
  an activation (``fxfuse.gelu`` erf or tanh, ``relu``, ``silu``) calls it
  with that activation as its epilogue; a ``fxfuse.gated_mlp_act`` whose gate
  and up inputs are single-use linears becomes :func:`gated_linear`: the gate
  GEMM with the activation epilogue, then the up GEMM with a multiply
  epilogue, so the (tokens × intermediate) products are written once each;
* each ``addmm(bias, x, w)`` with a 1-D bias (GPT-2's ``Conv1D``) calls
  :func:`addmm`, the same linear on the transposed view of ``w``.

:func:`linear` runs oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``,
the kernel Inductor's CPU back end uses for linear + pointwise fusion) on CPU
float32/bfloat16 tensors when no gradient is needed, and ``F.linear`` plus
the activation otherwise (CUDA tensors, autograd, other dtypes, oneDNN
turned off with ``torch.backends.mkldnn.flags(enabled=False)``), so the
program computes the same thing everywhere. Why oneDNN: on an AMD EPYC (Zen 4,
2 threads) its fp32 GEMM ran 8-25% faster than the MKL sgemm behind
``F.linear`` at transformer shapes, and a fused SwiGLU 17% faster than three
separate kernels (``benchmarks/results/cpu-latency.md`` measures the whole
models).

A weight that is an ``nn.Parameter`` is handed to oneDNN in its own blocked
layout (:data:`PACKED`), made on first use, as Inductor's freezing does: on
an Intel Xeon (AVX-512, 2 threads) oneDNN on the plain (out, in) weight was
2-8% slower than ``F.linear``, because it reorders the weight on every call,
and 3-13% faster on the packed one from 4 to 1000 rows. The packed copies
cost one more copy of the linear weights' memory; ``PACKED.clear()`` frees
them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fxfuse.codegen.program import graph_reading_root, module_reading_root
from fxfuse.ir.dialect import OPS, REFERENCE

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_LINEAR = torch.ops.aten.linear.default
# fxfuse.gated_mlp_act's activation → (oneDNN post-op, its algorithm).
_GATED = {"silu": ("swish", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def onednn_available() -> bool:
    """True if this PyTorch build has oneDNN's fused linear (CPU builds of x86 and Arm do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _activate(y: Tensor, act: str, algorithm: str) -> Tensor:
    if act == "none":
        return y
    if act == "gelu":
        return F.gelu(y, approximate=algorithm)
    if act == "relu":
        return F.relu(y)
    if act == "swish":
        return F.silu(y)
    raise ValueError(f"fxfuse eager back end: unknown linear epilogue {act!r}")


# Below this many rows (tokens), F.linear runs instead: oneDNN's GEMM on an unpacked weight reorders it on
# every call, which only pays back over many rows. Measured on this project's 2-core Intel Xeon with
# torch 2.13 (576-2048 wide weights): at 1-4 rows F.linear was 1.3-3x faster, at 16 they were even.
ONEDNN_MIN_ROWS = 16


def _onednn_ok(*tensors: Optional[Tensor]) -> bool:
    if not torch.backends.mkldnn.enabled:  # the user turned oneDNN off (torch.backends.mkldnn.flags)
        return False
    x = tensors[0]
    if x is not None and x.dim() and x.numel() < ONEDNN_MIN_ROWS * x.shape[-1]:
        return False  # a decode step's few rows
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if any(t.device.type != "cpu" or t.dtype != dtype for t in present) or dtype not in _ONEDNN_DTYPES:
        return False
    # oneDNN's fused linear has no backward: keep autograd's own ops when a gradient is wanted.
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


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


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "none",
           algorithm: str = "", *, parameter: Optional[Tensor] = None) -> Tensor:
    """``act(F.linear(x, weight, bias))``, with ``act`` one of "none", "gelu" (``algorithm`` "none"
    or "tanh"), "relu", "swish" (SiLU); on oneDNN where :func:`_onednn_ok` allows it.

    ``parameter`` is the tensor ``weight`` is a view of (default: ``weight`` itself); a parameter's
    packed copy is what oneDNN reads."""
    if _onednn_ok(x, weight, bias):
        packed = _onednn_weight(weight, weight if parameter is None else parameter, x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, act, [], algorithm)
    return _activate(F.linear(x, weight, bias), act, algorithm)


def gated_linear(x_gate: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], x_up: Tensor, w_up: Tensor,
                 b_up: Optional[Tensor], activation: str) -> Tensor:
    """``fxfuse.gated_mlp_act(F.linear(x_gate, w_gate, b_gate), F.linear(x_up, w_up, b_up), activation)``."""
    act, algorithm = _GATED[activation]
    same_rows = x_gate.shape[:-1] == x_up.shape[:-1] and w_gate.shape[0] == w_up.shape[0]
    if same_rows and _onednn_ok(x_gate, w_gate, b_gate, x_up, w_up, b_up):
        gate = torch.ops.mkldnn._linear_pointwise(x_gate, _onednn_weight(w_gate, w_gate, x_gate), b_gate, act, [],
                                                  algorithm)
        return torch.ops.mkldnn._linear_pointwise.binary(x_up, gate, _onednn_weight(w_up, w_up, x_up), b_up, "mul")
    return REFERENCE["gated_mlp_act"](F.linear(x_gate, w_gate, b_gate), F.linear(x_up, w_up, b_up), activation)


def addmm(bias: Tensor, x: Tensor, weight_in_out: Tensor) -> Tensor:
    """``torch.addmm(bias, x, weight_in_out)`` with a 1-D bias: a linear whose weight is stored (in, out),
    as GPT-2's ``Conv1D`` keeps it; oneDNN reads the transposed view without a copy."""
    return linear(x, weight_in_out.t(), bias, parameter=weight_in_out)


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
            node.target, node.args, node.kwargs = gated_linear, (*gate, *up, activation), {}
            lowered[f"gated_linear({activation})"] += 1
            for source in sources:
                graph.erase_node(source)
        elif (post_op := _epilogue(node)) is not None and (args := _linear_args(node.args[0])) is not None:
            source = node.args[0]
            node.target, node.args, node.kwargs = linear, (*args, *post_op), {}
            lowered[f"linear+{node.args[3]}"] += 1
            graph.erase_node(source)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _LINEAR:
            node.target = linear
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
        by_target = {op: REFERENCE[name] for name, op in OPS.items()}
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
