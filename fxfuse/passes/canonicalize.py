"""canonicalize: one spelling for each computation, so fusion patterns match once.

Rewrites, applied until none fires:

* in-place ops on a fresh temporary that nothing else reads (``scores.div_(s)``)
  → their out-of-place form;
* drop ``_assert_tensor_metadata`` checks (export's dtype asserts on ``.to``);
* drop no-op conversions and copies (``to``/``_to_copy``/``type_as`` to the
  same dtype and device, ``clone``, ``contiguous``, ``alias``, ``detach``);
* softmax in one spelling: ``_softmax(x, d, half_to_float)`` and
  ``softmax(x, d, dtype)`` → ``softmax(x', d)`` with ``x'`` cast to the
  dtype first (what the dtype argument means); ``_safe_softmax`` likewise
  keeps its name (it differs on rows that are all -inf);
* drop full slices (``x[:, 0:]``) and ``expand`` to the same shape;
* ``transpose``/``t`` → ``permute``; chains of permutes → one; identity → gone;
* ``view`` and ``_unsafe_view`` → ``reshape``; ``reshape`` to the same shape → gone;
* composites as the CPU dispatches them below autograd, their other outputs
  unread: ``_scaled_dot_product_flash_attention_for_cpu(...)[0]`` →
  ``scaled_dot_product_attention``, ``native_layer_norm(...)[0]`` → ``layer_norm``;
* ``div`` by a constant → ``mul`` by its reciprocal; a 0-d tensor computed
  only from constants (``x / torch.sqrt(torch.tensor(d))``) counts as a constant.

Dropping copies and turning views into reshapes is only sound where no
in-place op writes the memory, so nodes that may alias a mutated tensor
keep them.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from fxfuse.ir.meta import attr_of, fake_mode_of, fill_attr_vals, same_shape, tensor
from fxfuse.ir.rewrite import Builder, erase_if_dead
from fxfuse.passes.manager import PassResult

aten = torch.ops.aten
Canon = Callable[[fx.Node, Builder], "fx.Node | None"]


def _same_value_type(node: fx.Node) -> fx.Node | None:
    src, out = tensor(node.args[0]), tensor(node)
    if src is None or out is None:
        return None
    if src.dtype == out.dtype and src.device == out.device and same_shape(src, out):
        return node.args[0]
    return None


def noop_conversion(node: fx.Node, b: Builder) -> fx.Node | None:
    """A conversion, copy or expand whose result has its input's dtype, device and shape."""
    return _same_value_type(node)


def full_slice(node: fx.Node, b: Builder) -> fx.Node | None:
    src, out = tensor(node.args[0]), tensor(node)
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    if src is None or out is None or step != 1:
        return None
    return node.args[0] if same_shape(src, out) else None


def _permutation(node: fx.Node) -> list[int] | None:
    """The permutation a transpose/t/permute node applies, dims made non-negative."""
    src = tensor(node.args[0])
    if src is None:
        return None
    rank = src.dim()
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]]
    if node.target is aten.t.default:
        return list(range(rank))[::-1]
    a, c = node.args[1] % rank, node.args[2] % rank
    perm = list(range(rank))
    perm[a], perm[c] = perm[c], perm[a]
    return perm


def to_permute(node: fx.Node, b: Builder) -> fx.Node | None:
    perm = _permutation(node)
    if perm is None:
        return None
    source = node.args[0]
    if isinstance(source, fx.Node) and source.target is aten.permute.default:
        inner = _permutation(source)
        perm = [inner[p] for p in perm]
        source = source.args[0]
    if perm == list(range(len(perm))):
        return source
    if node.target is aten.permute.default and source is node.args[0] and list(node.args[1]) == perm:
        return None
    return b.call(aten.permute.default, source, perm)


_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.flatten.using_ints)


def to_reshape(node: fx.Node, b: Builder) -> fx.Node | None:
    """view (and ``_unsafe_view``, its spelling below autograd) → reshape; a reshape of a reshape-like op reshapes
    its source; no-op reshapes go."""
    source = node.args[0]
    while isinstance(source, fx.Node) and source.target in _RESHAPES:
        source = source.args[0]
    src, out = tensor(source), tensor(node)
    if src is not None and out is not None and same_shape(src, out):
        return source
    if node.target is not aten.reshape.default or source is not node.args[0]:
        return b.call(aten.reshape.default, source, node.args[1])
    return None


def constant_scalar(node: object, depth: int = 8) -> float | None:
    """The value of a Python number, or of a 0-d float tensor computed from constants only."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    value = _constant_tensor(node, depth)
    if value is None or value.dim() != 0 or not value.is_floating_point():
        return None
    return float(value.item())


def _constant_tensor(node: object, depth: int) -> torch.Tensor | None:
    """A small tensor whose value is known at optimization time (get_attr constants and ops on them)."""
    if not isinstance(node, fx.Node) or depth == 0:
        return None
    if node.op == "get_attr":
        value = attr_of(node.graph.owning_module, node.target)
        return value.detach().clone() if isinstance(value, torch.Tensor) and value.numel() == 1 else None
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    out = tensor(node)
    if out is None or out.numel() != 1:
        return None
    values = {}
    for arg in node.all_input_nodes:
        values[arg] = _constant_tensor(arg, depth - 1)
        if values[arg] is None:
            return None
    args = fx.node.map_arg(node.args, values.get)
    kwargs = fx.node.map_arg(node.kwargs, values.get)
    return node.target(*args, **kwargs)


def div_by_constant(node: fx.Node, b: Builder) -> fx.Node | None:
    divisor = constant_scalar(node.args[1])
    if divisor is None or divisor == 0 or tensor(node) is None or not tensor(node).is_floating_point():
        return None
    out = b.call(aten.mul.Tensor, node.args[0], 1.0 / divisor)
    if tensor(out).dtype != tensor(node).dtype:
        b.discard()
        return None
    return out


def softmax_dtype_as_cast(node: fx.Node, b: Builder) -> fx.Node | None:
    """``softmax(x, d, dtype)`` → ``softmax(x.to(dtype), d)``; ``_softmax(x, d, True)`` likewise with float32."""
    x, dim = node.args[0], node.args[1]
    if node.target is aten._softmax.default:
        dtype = torch.float32 if node.args[2] else None
        target = aten.softmax.int
    else:
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        target = node.target
        if dtype is None:
            return None
    if tensor(x) is None:
        return None
    if dtype is not None and dtype != tensor(x).dtype:
        x = b.call(aten._to_copy.default, x, dtype=dtype)
    return b.call(target, x, dim)


def mul_by_constant_tensor(node: fx.Node, b: Builder) -> fx.Node | None:
    """``x * c`` with ``c`` a 0-d constant tensor → ``x * float(c)``; ``x * 1`` → ``x``."""
    factor = node.args[1]
    if isinstance(factor, (int, float)) and not isinstance(factor, bool):
        same = tensor(node.args[0]) is not None and tensor(node.args[0]).dtype == tensor(node).dtype
        return node.args[0] if factor == 1 and same and same_shape(tensor(node.args[0]), tensor(node)) else None
    value = constant_scalar(factor)
    if value is None or tensor(node) is None or not tensor(node).is_floating_point():
        return None
    out = b.call(aten.mul.Tensor, node.args[0], value)
    if tensor(out).dtype != tensor(node).dtype or not same_shape(tensor(out), tensor(node)):
        b.discard()
        return None
    return out


def _out_of_place(target: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _aliases_only_a_fresh_temporary(node: object) -> bool:
    """``node`` is a fresh temporary, or a chain of views of one, that nothing but the next link reads."""
    for _ in range(8):
        if not isinstance(node, fx.Node) or len(node.users) != 1 or node.op != "call_function" \
                or not isinstance(node.target, torch._ops.OpOverload) or node.target._schema.is_mutable:
            return False
        if all(r.alias_info is None for r in node.target._schema.returns):
            return True
        node = node.args[0]  # a view: writing it writes its base too, which must be as private
    return False


def functionalize_inplace(gm: fx.GraphModule, mode) -> int:
    """``y = op_(x, ...)`` → ``y = op(x, ...)`` where ``x`` is a fresh temporary only ``op_`` reads.

    Then nothing can observe that ``x`` was overwritten, so the out-of-place op
    computes the same value (checked: same dtype and shape as ``x``). ``x``
    may also be a view of such a temporary (``s.view(b, h, q, k).add_(m)``)
    whose base nothing else reads.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not node.args:
            continue
        functional = _out_of_place(target) if target._schema.is_mutable else None
        source = node.args[0]
        if functional is None or not _aliases_only_a_fresh_temporary(source):
            continue
        b = Builder(gm.graph, mode, node)
        out = b.call(functional, *node.args, **node.kwargs)
        if tensor(out) is None or tensor(out).dtype != tensor(source).dtype or not same_shape(tensor(out), tensor(source)):
            b.discard()
            continue
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        rewritten += 1
    return rewritten


_ALIAS_FREE: dict[object, Canon] = {
    aten.to.dtype: noop_conversion,
    aten.to.dtype_layout: noop_conversion,
    aten.to.device: noop_conversion,
    aten._to_copy.default: noop_conversion,
    aten.type_as.default: noop_conversion,
    aten.contiguous.default: noop_conversion,
    aten.clone.default: noop_conversion,
    aten.alias.default: noop_conversion,
    aten.detach.default: noop_conversion,
    aten.slice.Tensor: full_slice,
    aten.expand.default: noop_conversion,
    aten.view.default: to_reshape,
    aten.reshape.default: to_reshape,
    aten._unsafe_view.default: to_reshape,
}


def _sdpa(flash: fx.Node, b: Builder) -> fx.Node:
    q, k, v = flash.args[:3]
    dropout_p = flash.args[3] if len(flash.args) > 3 else flash.kwargs.get("dropout_p", 0.0)
    causal = flash.args[4] if len(flash.args) > 4 else flash.kwargs.get("is_causal", False)
    return b.call(aten.scaled_dot_product_attention.default, q, k, v, flash.kwargs.get("attn_mask"), dropout_p,
                  causal, scale=flash.kwargs.get("scale"))


def _layer_norm(native: fx.Node, b: Builder) -> fx.Node:
    return b.call(aten.layer_norm.default, *native.args, **native.kwargs)


# Composites that a graph traced below autograd (through a tensor subclass such as DTensor) spells as the
# multi-output op the CPU dispatches them to, by that op: how to write the composite back.
_DISPATCHED = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa,
    aten.native_layer_norm.default: _layer_norm,
}


def dispatched_composite(node: fx.Node, b: Builder) -> fx.Node | None:
    """``op(...)[0]`` for an op in ``_DISPATCHED`` whose other outputs are not read (logsumexp, mean, rstd) → the
    composite it implements (``scaled_dot_product_attention``, ``layer_norm``)."""
    source = node.args[0]
    if not (isinstance(source, fx.Node) and source.target in _DISPATCHED and node.args[1] == 0
            and all(user.args[1] == 0 or not user.users for user in source.users)):
        return None
    for unread in [user for user in source.users if user is not node and not user.users]:
        node.graph.erase_node(unread)  # so that the op goes with ``node`` (DCE keeps it: it is tagged random)
    return _DISPATCHED[source.target](source, b)


_ALWAYS: dict[object, Canon] = {
    operator.getitem: dispatched_composite,
    aten.transpose.int: to_permute,
    aten.t.default: to_permute,
    aten.permute.default: to_permute,
    aten.div.Tensor: div_by_constant,
    aten.mul.Tensor: mul_by_constant_tensor,
    aten._softmax.default: softmax_dtype_as_cast,
    aten.softmax.int: softmax_dtype_as_cast,
    aten._safe_softmax.default: softmax_dtype_as_cast,
}


_VIEWISH = set(_ALIAS_FREE) | {aten.select.int, aten.as_strided.default, aten.unsqueeze.default,
                               aten.squeeze.dim, aten.permute.default, aten.transpose.int, aten.t.default}


def _may_alias_mutation(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that may share memory with a tensor some in-place op writes.

    Starting from each written argument, follow every edge into or out of an
    op that can return a view or its own input (the ops this pass drops or
    rewrites, plus select/as_strided). Dropping a copy or a view is unsafe
    only on these nodes.
    """
    pending = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            for arg, schema_arg in zip(node.args, target._schema.arguments):
                if schema_arg.alias_info is not None and schema_arg.alias_info.is_write and isinstance(arg, fx.Node):
                    pending += [arg, node]
    tainted: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in tainted:
            continue
        tainted.add(node)
        if node.target in _VIEWISH:
            pending += node.all_input_nodes
        pending += [u for u in node.users if u.target in _VIEWISH]
    return tainted


def canonicalize(gm: fx.GraphModule) -> PassResult:
    """Rewrite ``gm`` in place into fxfuse's canonical ATen form."""
    mode = fake_mode_of(gm)
    fill_attr_vals(gm, mode)
    result = PassResult(name="canonicalize")
    if functionalized := functionalize_inplace(gm, mode):
        result.rewrites["functionalize_inplace"] = functionalized
    aliased = _may_alias_mutation(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            result.rewrites["drop_dtype_assert"] += 1
    for _ in range(8):
        fired = False
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or node.op != "call_function":
                continue
            canon = _ALWAYS.get(node.target) or (_ALIAS_FREE.get(node.target) if node not in aliased else None)
            out = canon(node, Builder(gm.graph, mode, node)) if canon else None
            if out is None or out is node:
                continue
            node.replace_all_uses_with(out)
            erase_if_dead([node])
            result.rewrites[canon.__name__] += 1
            fired = True
        if not fired:
            break
    result.changed = sum(result.rewrites.values()) > 0
    return result

