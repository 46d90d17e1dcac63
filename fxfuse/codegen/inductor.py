"""Inductor back end: a fused graph compiled by Inductor.

:func:`compile_with_inductor` hands Inductor the norms, rotary embeddings
and activations as their reference forms, from which it generates its own
fused loops (as opaque extern calls they ran several ATen kernels each);
``fxfuse.attention`` as :func:`~fxfuse.ir.dialect.traceable_attention`, so
that it calls SDPA itself (as an extern op, the attention's Python
implementation cost LLaMA-style 100M 1–2 ms a decode step: 0.99–1.09× of
Inductor's step time before, 0.93–0.95× after); and
``fxfuse.latent_attention`` as an extern kernel. Its GEMMs stay Inductor's
(ATen's, on the CPU): routing them to the eager back end's oneDNN kernels
as extern ops was slower on the project's Xeon (50.8 against 48.5 ms for
all-MiniLM-L6-v2 at 4 × 128, 440 against 419 ms for LLaMA-style 100M at
1 × 512).

:func:`decode_step` is how ``lower="auto"`` tells a model's decode step, the
one graph for which it weighs Inductor against the eager back end;
:class:`AtenGemms` is the bound it weighs first (Inductor's step is at least
its GEMMs, which it runs on ATen's kernels).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from fxfuse.ir.dialect import OPS, REFERENCE, traceable_attention

# A decode step of a real model: every GEMM sees at most DECODE_ROWS rows, known at compile time, and
# together they read at least DECODE_WEIGHT_BYTES. There the eager back end's per-op dispatch (about 3,100
# ATen calls a step against Inductor's 750) can be a large share of the step, which runs once per token, or
# its GEMM kernels can win by more (one-row oneDNN against ATen on an AMD EPYC):
# benchmarks/results/compile-cpu.md gives each way's decode step next to its GEMMs' time alone.
DECODE_ROWS = 16
DECODE_WEIGHT_BYTES = 32 * 2**20
# Where a GEMM node's input rows and weight are among its arguments.
_GEMMS = {torch.ops.aten.linear.default: (0, 1), torch.ops.aten.mm.default: (0, 1),
          torch.ops.aten.addmm.default: (1, 2)}


def _gemms(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, Tensor, Any, Tensor]]:
    """Each GEMM node with the fake values of its input rows and weight: (node, input, weight arg, weight)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _GEMMS:
            continue
        x_arg, w_arg = (node.args[i] for i in _GEMMS[node.target])
        x, w = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in (x_arg, w_arg))
        if isinstance(x, Tensor) and isinstance(w, Tensor) and x.dim() > 0:
            yield node, x, w_arg, w


def _gemm_rows(gm: fx.GraphModule) -> tuple[list[Any], int]:
    """Each GEMM's rows (an int, or a SymInt for a dynamic size) and the bytes of all their weights."""
    found = [(x.numel() // x.shape[-1], w.numel() * w.element_size()) for _, x, _, w in _gemms(gm)]
    return [rows for rows, _ in found], sum(size for _, size in found)


def step_bytes(gm: fx.GraphModule) -> int:
    """The bytes a call of ``gm`` must read from memory at least: its GEMMs' weights and the keys and values
    its attention ops read (a decode step's KV cache); each tensor counted once."""
    seen: dict[Any, int] = {}
    for _, _, w_arg, w in _gemms(gm):
        seen[w_arg] = w.numel() * w.element_size()
    for node in gm.graph.find_nodes(op="call_function", target=OPS["attention"]):
        for arg in node.args[1:3]:
            value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if isinstance(value, Tensor) and all(isinstance(d, int) for d in value.shape):
                seen[arg] = value.numel() * value.element_size()
    return sum(seen.values())


def decode_step(gm: fx.GraphModule) -> Optional[str]:
    """Why ``gm`` counts as a decode step (its rows and weight bytes), or None if it does not."""
    rows, weight_bytes = _gemm_rows(gm)
    if not rows or not all(isinstance(n, int) for n in rows):  # no GEMM, or one graph for every length
        return None
    if max(rows) > DECODE_ROWS or weight_bytes < DECODE_WEIGHT_BYTES:
        return None
    return f"GEMMs of at most {max(rows)} rows reading {weight_bytes / 2**20:.0f} MiB of weights"


def gemm_weights(gm: fx.GraphModule, inputs: Sequence[Any]) -> Iterator[tuple[fx.Node, Tensor, Tensor]]:
    """Each GEMM node whose weight is a graph input, in graph order, with the fake value of its input rows and
    its real 2-D weight (``inputs``: the graph's real inputs in placeholder order)."""
    position = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    for node, x, w_arg, _ in _gemms(gm):
        weight = inputs[position[w_arg]] if w_arg in position else None
        if isinstance(weight, Tensor) and weight.dim() == 2:
            yield node, x, weight


class AtenGemms:
    """A graph's GEMMs alone as Inductor runs them on the CPU (ATen's kernels), on its real weights.

    Built from the GEMM nodes whose weight is a graph input, with ``inputs``
    the graph's real inputs in placeholder order; a call runs each GEMM once on
    zero rows of its input's shape. ``shapes`` lists (rows, in, out).
    """

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
        self.calls: list[tuple[Tensor, Tensor]] = []
        self.shapes: list[tuple[int, int, int]] = []
        for node, x, weight in gemm_weights(gm, inputs):
            if not all(isinstance(d, int) for d in x.shape):
                continue
            if node.target is torch.ops.aten.linear.default:  # stored (out, in)
                weight = weight.t()
            rows = x.numel() // x.shape[-1]
            self.calls.append((torch.zeros(rows, weight.shape[0], dtype=weight.dtype, device=weight.device), weight))
            self.shapes.append((rows, weight.shape[0], weight.shape[1]))

    def __call__(self, *args: Any) -> None:
        for x, weight in self.calls:
            torch.mm(x, weight)


def compile_with_inductor(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """``gm`` compiled by Inductor, with the dialect ops handed to it as the module's docstring says."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    inlined = {op: REFERENCE[name] for name, op in OPS.items() if name not in ("attention", "latent_attention")}
    inlined[OPS["attention"]] = traceable_attention
    return compile_fx(gm, example_inputs, decompositions={**select_decomp_table(), **inlined})
