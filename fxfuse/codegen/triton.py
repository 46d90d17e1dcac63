"""Triton back end: each fxfuse dialect op lowered to an ``fxfuse.kernels`` launcher.

:func:`lower` takes the optimized graph module and returns a
:class:`TritonProgram`, a copy of the graph whose dialect nodes call
*lowerings* instead of ``torch.ops.fxfuse.*``. The optimized graph itself is
not changed, and the copy reads parameters and buffers through it (``_root``),
so ``.to(device)`` and ``state_dict`` of the optimized module stay the one
source of truth.

A lowering runs the op's kernel when the kernel covers the call and the
op's reference implementation otherwise, logging why once per node and
reason (logger ``fxfuse.codegen.triton``). Fallback rules:

* device: the kernels run on CUDA tensors (CPU tensors under the Triton
  interpreter, ``fxfuse.kernels.device_ok``);
* dtype: float16, bfloat16, float32 (float64 falls back);
* attention: head dims up to 256, q/k/v of one dtype, boolean or float masks;
* latent_attention: latent dims up to 512, rotary dims up to 128, the four
  inputs of one dtype, boolean or float masks;
* norms: rows up to 64K elements, weight and bias of the row's length;
* rope: tensors of rank ≤ 4, q and k of one head dim.

Attention is specialized per node: the node's scale, causal flag, soft-cap
and mask kind (plus a sliding window or ALiBi a later pass may attach with
:func:`set_score_mods`) select one kernel variant, generated from the one
template in ``fxfuse.kernels._template`` when the graph is lowered.
``TritonProgram.generated_sources()`` returns the variants' source text.

Rope runs in place when that is safe: the rotated tensors are fresh values
(a projection's output seen through single-use views) that nothing else reads.
"""

from __future__ import annotations

from collections import Counter
import importlib
import logging
import math
import operator
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from fxfuse.codegen.program import graph_reading_root, module_reading_root
from fxfuse.ir.dialect import OPS

logger = logging.getLogger(__name__)

SCORE_MODS = "fxfuse_score_mods"
"""``node.meta`` key of an attention node's in-kernel score modifiers (see :func:`set_score_mods`)."""

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_VIEWS = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim, torch.ops.aten.unflatten.int, torch.ops.aten.flatten.using_ints,
    torch.ops.aten.expand.default, torch.ops.aten.slice.Tensor, torch.ops.aten.select.int,
    torch.ops.aten.alias.default, torch.ops.aten.t.default, torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default, torch.ops.aten.unbind.int,
    torch.ops.aten.as_strided.default, torch.ops.aten.narrow.default, torch.ops.aten.diagonal.default,
}


def set_score_mods(node: fx.Node, *, window: int | None = None, alibi: bool = False) -> None:
    """Ask the Triton back end to apply a sliding window and/or ALiBi inside the attention kernel.

    For a pass that recognizes these score modifiers and removes the mask
    tensor that spelled them: ``window`` w keeps key j > i - w (on top of the
    op's own mask and causal flag); ``alibi`` adds slope[h]·(j - i) with the
    standard slopes of the head count (``fxfuse.kernels.alibi_slopes``).
    Other back ends do not read this: the pass must keep the graph's
    meaning for them (or target only this back end).
    """
    if node.target is not OPS["attention"]:
        raise ValueError(f"{node.name} is not an fxfuse.attention node")
    node.meta[SCORE_MODS] = {"window": window, "alibi": bool(alibi)}


def _kernel_module(name: str) -> Any:
    """``fxfuse.kernels.<name>`` the module (the package's ``attention`` and ``rope`` are the functions)."""
    return importlib.import_module(f"fxfuse.kernels.{name}")


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _dtype_reason(*tensors: Any) -> str | None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype not in _FLOAT:
            return f"dtype {t.dtype} (the kernels take float16, bfloat16, float32)"
    return None


class Lowering:
    """The runtime of one dialect node: its kernel when it covers the call, else the reference op."""

    def __init__(self, op: str, node: fx.Node, program: TritonProgram) -> None:
        self.op = op
        self.node_name = node.name
        self.reference = OPS[op]
        self.program = program
        self.static_reason: str | None = None
        # fx's code generator names a call_function target "<module>_<name>": fxfuse_triton_<op>
        self.__name__ = f"triton_{op}"
        self.__qualname__ = self.__name__
        self.__module__ = "fxfuse"

    def check(self, *args: Any) -> str | None:
        """Why the kernel cannot run this call (None if it can)."""
        raise NotImplementedError

    def run(self, *args: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = self.bind(*args, **kwargs)
        reason = self.static_reason or self.program.device_reason(args) or self.check(*args)
        if reason is None:
            return self.run(*args)
        self.program.fell_back(self, reason)
        return self.reference(*args)

    def bind(self, *args: Any, **kwargs: Any) -> tuple:
        """All arguments positionally, defaults filled in, in the op's schema order."""
        if not kwargs and len(args) == len(self.reference._schema.arguments):
            return args
        out = list(args)
        for arg in self.reference._schema.arguments[len(args):]:
            out.append(kwargs[arg.name] if arg.name in kwargs else arg.default_value)
        return tuple(out)

    def __repr__(self) -> str:
        return f"<{self.__name__} for {self.node_name}>"


class _Attention(Lowering):
    def __init__(self, op: str, node: fx.Node, program: TritonProgram) -> None:
        super().__init__(op, node, program)
        kattn = _kernel_module("attention")
        self.kernels = kattn
        q, k, v, mask, scale, causal, softcap, sinks = self.bind(*node.args, **node.kwargs)
        mods = node.meta.get(SCORE_MODS) or {}
        self.window: int | None = mods.get("window")
        self.alibi: bool = bool(mods.get("alibi", False))
        qv, kv, vv, mv = (_val(x) for x in (q, k, v, mask))
        self.static_reason = _dtype_reason(qv, kv, vv)
        if sinks is not None:
            self.static_reason = "attention sinks (extra per-row logits) have no kernel"
        self.variant = None
        if self.static_reason is None and isinstance(qv, torch.Tensor):
            if isinstance(qv.shape[-1], int) and qv.shape[-1] > kattn.MAX_HEAD_DIM:
                self.static_reason = f"head dim {qv.shape[-1]} above {kattn.MAX_HEAD_DIM}"
            elif scale is not None or isinstance(qv.shape[-1], int):
                mask_val = mv if isinstance(mv, torch.Tensor) else None
                scale_value = scale if scale is not None else 1.0 / math.sqrt(qv.shape[-1])
                self.variant = kattn.variant_for(qv, mask_val, causal, scale_value, softcap, self.window,
                                                 torch.empty(0) if self.alibi else None)
                program.use_variant(kattn.get_kernel(self.variant))
        self.__name__ = self.__qualname__ = f"triton_attention_{self._tag()}"

    def _tag(self) -> str:
        return "generic" if self.variant is None else self.kernels.get_kernel(self.variant).name.split("_", 2)[-1]

    def check(self, q, k, v, mask=None, scale=None, causal=False, softcap=None, sinks=None):
        return self.kernels.supports(q, k, v, mask)

    def run(self, q, k, v, mask=None, scale=None, causal=False, softcap=None, sinks=None):
        slopes = None
        if self.alibi:
            slopes = self.program.alibi_slopes(q.shape[1], q.device)
        return self.kernels.attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
                                      softcap=softcap, window=self.window, alibi_slopes=slopes)


class _LatentAttention(Lowering):
    def __init__(self, op: str, node: fx.Node, program: TritonProgram) -> None:
        super().__init__(op, node, program)
        self.kernels = _kernel_module("latent_attention")
        self.static_reason = _dtype_reason(*(_val(x) for x in self.bind(*node.args, **node.kwargs)[:4]))

    def check(self, q_latent, q_rope, latent, k_rope, mask=None, scale=None, causal=False):
        return self.kernels.supports(q_latent, q_rope, latent, k_rope, mask)

    def run(self, q_latent, q_rope, latent, k_rope, mask=None, scale=None, causal=False):
        return self.kernels.latent_attention(q_latent, q_rope, latent, k_rope, attn_mask=mask, is_causal=causal,
                                             scale=scale)


def _norm_reason(x: torch.Tensor, *params: torch.Tensor | None) -> str | None:
    reason = _kernel_module("norms").supports(x) or _dtype_reason(*params)
    if reason is None:
        for p in params:
            if p is not None and tuple(p.shape) != (x.shape[-1],):
                return f"weight/bias of shape {tuple(p.shape)} for rows of {x.shape[-1]}"
    return reason


class _RmsNorm(Lowering):
    def check(self, x, weight, eps):
        return _norm_reason(x, weight)

    def run(self, x, weight, eps):
        from fxfuse.kernels import rms_norm

        return rms_norm(x, weight, eps)


class _AddRmsNorm(Lowering):
    def check(self, x, residual, weight, eps):
        return _norm_reason(x, weight) or _dtype_reason(residual)

    def run(self, x, residual, weight, eps):
        from fxfuse.kernels import rms_norm

        return rms_norm(x, weight, eps, residual=residual)


class _LayerNorm(Lowering):
    def check(self, x, weight, bias, eps):
        return _norm_reason(x, weight, bias)

    def run(self, x, weight, bias, eps):
        from fxfuse.kernels import layer_norm

        return layer_norm(x, weight, bias, eps)


class _AddLayerNorm(Lowering):
    def check(self, x, residual, weight, bias, eps):
        return _norm_reason(x, weight, bias) or _dtype_reason(residual)

    def run(self, x, residual, weight, bias, eps):
        from fxfuse.kernels import layer_norm

        return layer_norm(x, weight, bias, eps, residual=residual)


class _GatedMlpAct(Lowering):
    def check(self, gate, up, activation):
        if activation not in ("silu", "gelu", "gelu_tanh"):
            return f"activation {activation!r}"
        return _dtype_reason(gate, up)

    def run(self, gate, up, activation):
        from fxfuse.kernels import gated_mlp_act

        return gated_mlp_act(gate, up, activation)


class _Gelu(Lowering):
    def check(self, x, approximate="none"):
        return _dtype_reason(x)

    def run(self, x, approximate="none"):
        from fxfuse.kernels import gelu

        return gelu(x, approximate)


class _Rope(Lowering):
    def __init__(self, op: str, node: fx.Node, program: TritonProgram) -> None:
        super().__init__(op, node, program)
        q, k, cos, _sin = node.args[:4]
        self.inplace = _fresh_and_dead(q, node) and _fresh_and_dead(k, node) and q is not k \
            and _same_out(node, 0, q) and _same_out(node, 1, k)
        if self.inplace:
            self.__name__ = self.__qualname__ = "triton_rope_inplace"

    def check(self, q, k, cos, sin, interleaved=False):
        return _kernel_module("rope").supports(q, k, cos, sin)

    def run(self, q, k, cos, sin, interleaved=False):
        inplace = self.inplace and q.stride(-1) == 1 and k.stride(-1) == 1
        return _kernel_module("rope").rope(q, k, cos, sin, interleaved, inplace=inplace)


def _same_out(node: fx.Node, index: int, arg: Any) -> bool:
    """The op's output ``index`` has the input's shape and dtype (so it can be written over it)."""
    out, val = node.meta.get("val"), _val(arg)
    if not (isinstance(out, (tuple, list)) and isinstance(val, torch.Tensor)):
        return False
    o = out[index]
    return isinstance(o, torch.Tensor) and o.dtype == val.dtype and tuple(o.shape) == tuple(val.shape)


def _aliases_input(target: Any) -> bool:
    """True unless ``target`` is an op whose schema says its outputs are fresh tensors (no alias, no mutation)."""
    if not isinstance(target, torch._ops.OpOverload):
        return True
    schema = target._schema
    return schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


_PARTITIONS = {
    torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default,
    torch.ops.aten.unbind.int,
}


def _fresh_and_dead(arg: Any, user: fx.Node) -> bool:
    """``arg`` is read by ``user`` alone and is a fresh value seen through single-use views.

    Then writing over it cannot be observed: no other node reads it or an
    alias of it, and it is no input, parameter or buffer of the graph. Views
    are the ops whose schema marks the output as an alias of the input
    (``view``, ``transpose``, ``to``, ``contiguous``, …); the walk ends at the
    first op that returns a fresh tensor (a projection, say). One piece of a
    split (a fused QKV projection's q) qualifies too: the other pieces are
    disjoint from it.
    """
    node = arg
    for _ in range(16):
        if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.users) != 1:
            return False
        if node.target is operator.getitem:
            parts = node.args[0]
            if not (isinstance(parts, fx.Node) and parts.op == "call_function" and parts.target in _PARTITIONS
                    and all(u.target is operator.getitem for u in parts.users)):
                return False
            node = parts.args[0]  # the split itself may have one user per piece
            continue
        if not _aliases_input(node.target):
            return True
        if node.target not in _VIEWS and not (isinstance(node.target, torch._ops.OpOverload)
                                              and node.target.overloadpacket.__name__ in ("to", "contiguous")):
            return False  # an in-place op or one whose aliasing we do not model
        node = node.args[0]
    return False


_LOWERINGS: dict[str, type[Lowering]] = {
    "attention": _Attention, "latent_attention": _LatentAttention, "rms_norm": _RmsNorm,
    "add_rms_norm": _AddRmsNorm, "layer_norm": _LayerNorm, "add_layer_norm": _AddLayerNorm,
    "gated_mlp_act": _GatedMlpAct, "gelu": _Gelu, "rope": _Rope,
}
_BY_TARGET = {OPS[name]: name for name in _LOWERINGS}


class TritonProgram:
    """The lowered graph: called like the optimized graph module, runs Triton kernels.

    ``graph_module`` is the lowered ``fx.GraphModule`` (its ``_root`` is the
    optimized graph module, whose parameters it reads); ``lowerings`` maps
    each dialect node's name to its lowering; ``fallbacks`` lists the
    (node, reason) pairs that ran the reference implementation so far.
    """

    def __init__(self, gm: fx.GraphModule, device_ok: Callable[..., bool] | None = None) -> None:
        from fxfuse import kernels

        self._device_ok = device_ok or kernels.device_ok
        self._sources: dict[str, str] = {}
        self._slopes: dict[tuple, torch.Tensor] = {}
        self.fallbacks: list[tuple[str, str]] = []
        self._seen: set[tuple[str, str]] = set()
        self.lowerings: dict[str, Lowering] = {}
        graph = graph_reading_root(gm)
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _BY_TARGET:
                lowering = _LOWERINGS[_BY_TARGET[node.target]](_BY_TARGET[node.target], node, self)
                if lowering.static_reason is not None:
                    self.fell_back(lowering, lowering.static_reason)
                self.lowerings[node.name] = lowering
                node.target = lowering
        self.graph_module = module_reading_root(gm, graph, "TritonLowered")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    @property
    def lowered(self) -> dict[str, int]:
        """The dialect nodes lowered to kernel launchers, by op (fallbacks are in ``fallbacks``)."""
        return dict(sorted(Counter(lowering.op for lowering in self.lowerings.values()).items()))

    def device_reason(self, args: tuple) -> str | None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if self._device_ok(*tensors):
            return None
        devices = ", ".join(sorted({str(t.device) for t in tensors}))
        return f"tensors on {devices} (the kernels run on CUDA tensors)"

    def fell_back(self, lowering: Lowering, reason: str) -> None:
        key = (lowering.node_name, reason)
        if key in self._seen:
            return
        self._seen.add(key)
        self.fallbacks.append(key)
        logger.warning("fxfuse triton back end: %s (%s) runs the reference implementation: %s",
                       lowering.node_name, lowering.op, reason)

    def use_variant(self, kernel: Any) -> None:
        self._sources[kernel.name] = kernel.source

    def alibi_slopes(self, heads: int, device: torch.device) -> torch.Tensor:
        key = (heads, str(device))
        if key not in self._slopes:
            from fxfuse.kernels import alibi_slopes

            self._slopes[key] = alibi_slopes(heads, device)
        return self._slopes[key]

    def generated_sources(self, dump_dir: str | os.PathLike | None = None) -> dict[str, str]:
        """The Triton source of every attention variant this program uses, by kernel name.

        With ``dump_dir``, also writes each to ``dump_dir/<name>.py``.
        """
        if dump_dir is not None:
            path = Path(dump_dir)
            path.mkdir(parents=True, exist_ok=True)
            for name, source in self._sources.items():
                (path / f"{name}.py").write_text(source)
        return dict(self._sources)


def lower(gm: fx.GraphModule, device_ok: Callable[..., bool] | None = None) -> TritonProgram:
    """Lower ``gm``'s dialect ops to Triton kernels; ``device_ok(*tensors)`` overrides where kernels may run."""
    return TritonProgram(gm, device_ok)


def available() -> bool:
    """True if Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
