"""fuse-attention: softmax(q·kᵀ …)·v in its many spellings, and SDPA calls → fxfuse.attention.

Two rules, on the canonical form:

* ``eager_attention``: ``matmul|bmm(probs, v)`` where ``probs`` is a softmax
  over the key dim (possibly cast, or reshaped from 4-D to 3-D) of a *score
  chain* on top of the product q·kᵀ. ``_read_scores`` reads the chain from
  the softmax down, step by step, in any number and order of:

  - casts to a float type at least as wide (the fp32 upcast of half models);
  - scales: ``mul`` by a constant (``div`` was canonicalized), also when
    folded into q or kᵀ;
  - soft-capping ``c·tanh(s/c)`` (Gemma 2);
  - additive biases: padding and causal masks, relative position bias (T5),
    ALiBi (BLOOM), disentangled-attention terms (DeBERTa): any tensor that
    broadcasts to the scores;
  - boolean masks: ``where(keep, s, fill)``, ``masked_fill(s, drop, fill)``;
  - one reshape of 3-D (batch·heads, q, k) scores to 4-D.

  The product is ``matmul(q, kᵀ)`` (4-D) or ``bmm``/``baddbmm`` on 3-D
  (batch·heads) tensors, which are viewed as 4-D. The bias and mask steps are
  replayed without the scores into one additive mask, in the model's order,
  so every kept score gets exactly the model's bias and every masked score
  the model's fill value.
* ``sdpa_attention``: an existing ``scaled_dot_product_attention`` call.

In both, the ``repeat_kv`` expansion of grouped-query attention
(``reshape(expand(unsqueeze(kv, 2)))``) is folded into the op, which reads
the shared key/value heads without copying them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import size_is, tensor
from fxfuse.ir.rewrite import Builder, detach_shape_readers, value_users
from fxfuse.passes.canonicalize import constant_scalar
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var

aten = torch.ops.aten

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)
_PRODUCTS = (aten.matmul.default, aten.bmm.default, aten.baddbmm.default)
_WHERE = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
_MASKED_FILL = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
_MAX_CHAIN = 32
_ABSORBED = 2.0**10  # scores up to this magnitude vanish when added to a masking fill
# _safe_softmax gives zeros on a row whose every score is -inf, as fxfuse.attention does.
_SOFTMAX = (aten.softmax.int, aten._safe_softmax.default)

EAGER = P.any_of(["matmul", "bmm"], Var("probs"), Var("v"))
SDPA = P.scaled_dot_product_attention(
    Var("q"), Var("k"), Var("v"), Var("mask"), Const("dropout_p"), Const("causal"),
    scale=Var("scale"), enable_gqa=Const("enable_gqa"),
)


@dataclass
class _Step:
    """One thing the model does to the scores.

    ``kind`` is scale, softcap, bias (``dtype``: the scores' type after the
    add; ``negate`` for a subtraction), keep, drop, heads (3-D → 4-D) or flat
    (4-D → 3-D).
    """

    kind: str
    value: Any
    fill: float = 0.0
    dtype: torch.dtype | None = None
    negate: bool = False


def strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """(kv, n_rep) if ``node`` repeats each key/value head n_rep times in place, else (node, 1).

    Spelled ``reshape(expand(unsqueeze(kv, 2)))`` (HF's ``repeat_kv``) or
    ``repeat_interleave(kv, n_rep, dim=1)``; both put copies of head j at
    j·n_rep … j·n_rep + n_rep - 1, the grouped-query mapping. (``kv.repeat``
    tiles the heads instead and is not grouped-query attention.)
    """
    if isinstance(node, fx.Node) and node.target is aten.repeat_interleave.self_int:
        kv, n_rep = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if tensor(kv) is not None and tensor(kv).dim() == 4 and dim is not None and dim % 4 == 1 \
                and isinstance(n_rep, int):
            return kv, n_rep
        return node, 1
    if not (isinstance(node, fx.Node) and node.target is aten.reshape.default):
        return node, 1
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default):
        return node, 1
    unsq = expand.args[0]
    if not (isinstance(unsq, fx.Node) and unsq.target is aten.unsqueeze.default and unsq.args[1] == 2):
        return node, 1
    kv, big, out = tensor(unsq.args[0]), tensor(expand), tensor(node)
    if kv is None or big is None or out is None or kv.dim() != 4 or big.dim() != 5:
        return node, 1
    b, h, s, d = kv.shape
    n_rep = big.shape[2]
    if not isinstance(n_rep, int) or not all(
        size_is(x, y) for x, y in zip(big.shape, (b, h, n_rep, s, d))
    ) or not all(size_is(x, y) for x, y in zip(out.shape, (b, h * n_rep, s, d))):
        return node, 1
    return unsq.args[0], n_rep


def _unrepeat(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node]:
    k0, k_rep = strip_repeat_kv(k)
    v0, v_rep = strip_repeat_kv(v)
    return (k0, v0) if k_rep == v_rep else (k, v)


def _check_heads(q: fx.Node, k: fx.Node, v: fx.Node) -> Reject | None:
    for node in (q, k, v):
        t = tensor(node)
        if t is None or t.dim() != 4:
            shape = None if t is None else tuple(t.shape)
            return Reject(f"{node.name} has shape {shape}; only 4-D (batch, heads, seq, dim) attention is fused", node)
    hq, hk, hv = tensor(q).shape[1], tensor(k).shape[1], tensor(v).shape[1]
    grouped = isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0
    if not size_is(hk, hv) or not (size_is(hq, hk) or grouped):
        return Reject(f"query heads {hq} are not a multiple of key/value heads {hk}/{hv}", q)
    return None


def _single_use(node: fx.Node, what: str, allowed: tuple[fx.Node, ...] = ()) -> Reject | None:
    readers = [u for u in value_users(node) if u not in allowed]
    if len(readers) != 1:
        users = ", ".join(u.name for u in readers)
        return Reject(f"{what} at {node.name} are also read by {users} (e.g. returned as attention weights)", node)
    return None


def _is_upcast(node: fx.Node) -> bool:
    src, out = tensor(node.args[0]), tensor(node)
    return (src is not None and out is not None and src.is_floating_point() and out.is_floating_point()
            and torch.finfo(out.dtype).bits >= torch.finfo(src.dtype).bits)


def _is_unflatten0(node: fx.Node) -> bool:
    """A reshape of (n, s, t) to (b, h, s, t) with n = b·h."""
    src, out = tensor(node.args[0]), tensor(node)
    return (node.target is aten.reshape.default and src is not None and out is not None and src.dim() == 3
            and out.dim() == 4 and size_is(src.shape[0], out.shape[0] * out.shape[1])
            and size_is(src.shape[1], out.shape[2]) and size_is(src.shape[2], out.shape[3]))


def _is_flatten0(node: fx.Node) -> bool:
    """A reshape of (b, h, s, t) to (b·h, s, t)."""
    return node.target is aten.reshape.default and _is_unflatten0_shapes(tensor(node), tensor(node.args[0]))


def _is_unflatten0_shapes(flat: torch.Tensor | None, full: torch.Tensor | None) -> bool:
    return (flat is not None and full is not None and flat.dim() == 3 and full.dim() == 4
            and size_is(flat.shape[0], full.shape[0] * full.shape[1])
            and size_is(flat.shape[1], full.shape[2]) and size_is(flat.shape[2], full.shape[3]))


def _reaches_product(node: Any) -> bool:
    """True if ``node`` is the scores: a single-use chain of score steps down to q·kᵀ."""
    for _ in range(_MAX_CHAIN):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if node.target in _PRODUCTS:
            return True
        if len(value_users(node)) != 1:
            return False
        if node.target is aten.add.Tensor:
            return _reaches_product(node.args[0]) or _reaches_product(node.args[1])
        if node.target is aten.sub.Tensor:
            return _reaches_product(node.args[0])
        if node.target in _WHERE:
            node = node.args[1] if isinstance(node.args[1], fx.Node) else node.args[2]
        elif node.target in (*_CASTS, aten.mul.Tensor, aten.tanh.default, aten.reshape.default, *_MASKED_FILL):
            node = node.args[0]
        else:
            return False
    return False


def _softcap(node: fx.Node) -> tuple[float, fx.Node] | None:
    """(c, s) if ``node`` is ``tanh(s · (1/c)) · c``."""
    inner, c = node.args[0], constant_scalar(node.args[1])
    if c is None or not isinstance(inner, fx.Node) or inner.target is not aten.tanh.default:
        return None
    scaled = inner.args[0]
    if not (isinstance(scaled, fx.Node) and scaled.target is aten.mul.Tensor and len(inner.users) == 1):
        return None
    inv = constant_scalar(scaled.args[1])
    if inv is None or c == 0 or not math.isclose(inv * c, 1.0, rel_tol=1e-6) or len(scaled.users) != 1:
        return None
    return c, scaled.args[0]


def _check_fill(fill: float, node: fx.Node) -> Reject | None:
    """Refuse a fill that replacing a score with differs from adding to it.

    The fused op adds the mask; the model replaces masked scores with the
    fill. The two agree when the fill is -inf, or so large that adding any
    score of magnitude up to 2^10 leaves it unchanged in the scores' dtype
    (``finfo.min`` in float32 and bfloat16). With a milder fill (-1e4, -1e9)
    a row whose every score is masked is uniform in the model and not in the
    fused op.
    """
    dtype = tensor(node).dtype
    if math.isinf(fill) or not dtype.is_floating_point:
        return None
    value = torch.tensor(fill, dtype=dtype)
    if fill < 0 and bool(value + _ABSORBED == value) and bool(value - _ABSORBED == value):
        return None
    return Reject(f"masked scores are replaced by {fill:g}, which adding a mask cannot reproduce on a fully masked "
                  f"row (use -inf or torch.finfo({str(dtype).removeprefix('torch.')}).min)", node)


def _read_scores(top: fx.Node, visited: list[fx.Node],
                 allowed: tuple[fx.Node, ...] = ()) -> tuple[fx.Node, list[_Step]] | Reject:
    """From the softmax input down to the q·kᵀ product: (product, steps from the top down).

    Every chain node read is appended to ``visited``; ``allowed`` are further
    readers of the top that the fusion removes too (a row-max shift's max).
    """
    steps: list[_Step] = []
    node = top
    for _ in range(_MAX_CHAIN):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return Reject(f"the scores come from {node}, not from a q·kᵀ product", top)
        visited.append(node)
        if node.target in _PRODUCTS:
            return node, steps
        if (bad := _single_use(node, "the scores", allowed if node is top else ())) is not None:
            return bad
        target = node.target
        if target in _CASTS:
            if not _is_upcast(node):
                return Reject(f"the scores are cast to a narrower type at {node.name}", node)
            node = node.args[0]
        elif target is aten.mul.Tensor:
            if (capped := _softcap(node)) is not None:
                steps.append(_Step("softcap", capped[0]))
                node = capped[1]
                continue
            c = constant_scalar(node.args[1])
            if c is None:
                return Reject(f"the scores are multiplied by a tensor at {node.name}", node)
            steps.append(_Step("scale", c))
            node = node.args[0]
        elif target is aten.add.Tensor:
            if node.kwargs.get("alpha", 1) != 1:
                return Reject(f"the scores are added with alpha={node.kwargs['alpha']} at {node.name}", node)
            a, b = node.args[:2]
            if _reaches_product(a):
                steps.append(_Step("bias", b, dtype=tensor(node).dtype))
                node = a
            elif _reaches_product(b):
                steps.append(_Step("bias", a, dtype=tensor(node).dtype))
                node = b
            else:
                return Reject(f"neither operand of {node.name} leads to a q·kᵀ product", node)
        elif target is aten.sub.Tensor:
            if node.kwargs.get("alpha", 1) != 1 or not _reaches_product(node.args[0]):
                return Reject(f"the scores are subtracted from, or with alpha, at {node.name}", node)
            steps.append(_Step("bias", node.args[1], dtype=tensor(node).dtype, negate=True))
            node = node.args[0]
        elif target in _WHERE:
            cond, x, y = node.args[:3]
            if _reaches_product(x) and (fill := constant_scalar(y)) is not None:
                kind, node_below = "keep", x
            elif _reaches_product(y) and (fill := constant_scalar(x)) is not None:
                kind, node_below = "drop", y
            else:
                return Reject(f"the scores are selected against a non-constant at {node.name}", node)
            if (bad := _check_fill(fill, node)) is not None:
                return bad
            steps.append(_Step(kind, cond, fill))
            node = node_below
        elif target in _MASKED_FILL:
            fill = constant_scalar(node.args[2])
            if fill is None:
                return Reject(f"the scores are masked with a non-constant fill at {node.name}", node)
            if (bad := _check_fill(fill, node)) is not None:
                return bad
            steps.append(_Step("drop", node.args[1], fill))
            node = node.args[0]
        elif _is_unflatten0(node):
            steps.append(_Step("heads", tensor(node).shape[1]))
            node = node.args[0]
        elif _is_flatten0(node):
            steps.append(_Step("flat", tensor(node.args[0]).shape[1]))
            node = node.args[0]
        else:
            return Reject(f"the scores go through {target} at {node.name}, which attention does not express", node)
    return Reject("the score chain is too long", top)


class _Lifter:
    """Views 3-D (batch·heads, s, d) tensors as 4-D (batch, heads, s, d) for a known head count."""

    def __init__(self, b: Builder, heads: int) -> None:
        self.b, self.heads = b, heads

    def __call__(self, node: fx.Node) -> fx.Node:
        t = tensor(node)
        if t is None or t.dim() != 3:
            return node  # lower ranks broadcast the same way in 3-D and 4-D
        source = tensor(node.args[0]) if node.target is aten.reshape.default else None
        if _is_unflatten0_shapes(t, source) and source.shape[1] == self.heads:
            return node.args[0]
        # The 3-D operands of a matmul decomposed below autograd (a graph traced through DTensor): a batched
        # transpose, and a reshape straight from repeat_kv's 5-D expand. Lifted through, so that the 4-D
        # tensors (and the repeat_kv of grouped-query attention) show again.
        if node.target is aten.permute.default and node.args[1][0] % 3 == 0:
            return self._permute(self(node.args[0]), [0, 1, *(d % 3 + 1 for d in node.args[1][1:])])
        if source is not None and source.dim() > 4:
            return self.b.call(aten.reshape.default, node.args[0], [-1, self.heads, *t.shape[1:]])
        if size_is(t.shape[0], 1):
            return self.b.call(aten.unsqueeze.default, node, 0)
        return self.b.call(aten.unflatten.int, node, 0, [-1, self.heads])

    def _permute(self, node: fx.Node, perm: list[int]) -> fx.Node:
        """``node`` permuted by ``perm``, folded into ``node``'s own permute if it is one (canonical form)."""
        if node.target is aten.permute.default:
            inner = [d % 4 for d in node.args[1]]
            node, perm = node.args[0], [inner[d] for d in perm]
        return node if perm == [0, 1, 2, 3] else self.b.call(aten.permute.default, node, perm)


def _peel_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """(x, c) for a single-use ``x · c`` with a constant c (the scale folded into q or k), else (node, 1)."""
    if node.target is aten.mul.Tensor and len(value_users(node)) == 1 \
            and (c := constant_scalar(node.args[1])) is not None:
        return node.args[0], c
    return node, 1.0


def _untranspose(kT: fx.Node, b: Builder) -> fx.Node:
    """k from kᵀ: swap the last two dims back, folded into kᵀ's own permute if it has one (canonical form)."""
    rank = tensor(kT).dim()
    swap = [*range(rank - 2), rank - 1, rank - 2]
    source, perm = kT, swap
    if kT.target is aten.permute.default:
        inner = [d % rank for d in kT.args[1]]
        source, perm = kT.args[0], [inner[d] for d in swap]
    if perm == list(range(rank)):
        return source
    return b.call(aten.permute.default, source, perm)


@dataclass
class _Scores:
    """What the chain does, replayed: q·kᵀ·scale, capped, plus ``mask``."""

    scale: float
    softcap: float | None
    mask: fx.Node | None
    heads: int | None


def _replay(product: fx.Node, steps: list[_Step], scale: float, b: Builder) -> _Scores | Reject:
    """Fold the steps, from the product up, into a scale, a soft-cap and one additive (or boolean) mask.

    Bias and mask terms added while the scores are 3-D (batch·heads) are
    viewed as 4-D once the head count is known; the mask is 4-D from then on.
    """
    mask: fx.Node | None = None
    softcap: float | None = None
    heads: int | None = None
    rank = tensor(product).dim()
    if product.target is aten.baddbmm.default:
        beta, alpha = product.kwargs.get("beta", 1), product.kwargs.get("alpha", 1)
        mask = product.args[0] if beta == 1 else b.call(aten.mul.Tensor, product.args[0], beta)
        scale *= alpha
    mask_steps = [s for s in steps if s.kind in ("bias", "keep", "drop")]
    if mask is None and len(mask_steps) == 1 and mask_steps[0].kind == "keep" and mask_steps[0].fill == -math.inf:
        mask_steps[0].kind = "keep_bool"  # where(keep, s, -inf) is exactly SDPA's boolean mask
    for step in reversed(steps):
        if step.kind == "scale":
            if softcap is not None:
                return Reject("the soft-capped scores are scaled again", product)
            scale *= step.value
            if mask is not None and tensor(mask).dtype == torch.bool:
                if step.value <= 0:
                    return Reject(f"the masked scores are scaled by {step.value}", product)
            elif mask is not None:
                mask = b.call(aten.mul.Tensor, mask, step.value)
        elif step.kind == "softcap":
            if mask is not None or softcap is not None:
                return Reject("the scores are soft-capped after a bias, mask or another cap", product)
            softcap = step.value
        elif step.kind in ("heads", "flat"):
            if heads is not None and heads != step.value:
                return Reject(f"the scores are viewed with {heads} and with {step.value} heads", product)
            heads, rank = step.value, (4 if step.kind == "heads" else 3)
            if mask is not None:
                mask = _Lifter(b, heads)(mask)
        else:
            value = _bias_term(step, b) if step.kind == "bias" else step.value
            if rank == 3 and heads is not None:
                value = _Lifter(b, heads)(value)
            mask = _combine(mask, step, value, b)
    if mask is not None and tensor(mask).dim() < 2:
        mask = b.call(aten.reshape.default, mask, [1] * (2 - tensor(mask).dim()) + list(tensor(mask).shape))
    return _Scores(scale, softcap, mask, heads)


def _bias_term(step: _Step, b: Builder) -> fx.Node:
    """The tensor a bias step adds, in the scores' type: numbers, booleans and integers are cast (True is 1)."""
    value = step.value
    if not isinstance(value, fx.Node):
        value = b.call(aten.scalar_tensor.default, float(value), dtype=step.dtype)
    elif not tensor(value).is_floating_point():
        value = b.call(aten._to_copy.default, value, dtype=step.dtype)
    return b.call(aten.neg.default, value) if step.negate else value


def _combine(mask: fx.Node | None, step: _Step, value: fx.Node, b: Builder) -> fx.Node:
    """The mask so far with one more bias, keep or drop step applied on top."""
    if step.kind == "bias":
        return value if mask is None else b.call(aten.add.Tensor, mask, value)
    if step.kind == "keep_bool":
        return value
    if step.kind == "keep":
        return (b.call(aten.where.Scalar, value, 0.0, step.fill) if mask is None
                else b.call(aten.where.ScalarOther, value, mask, step.fill))
    return (b.call(aten.where.Scalar, value, step.fill, 0.0) if mask is None
            else b.call(aten.where.ScalarSelf, value, step.fill, mask))


@dataclass
class _Probs:
    """The left operand of the output product, read down to the softmax."""

    softmax: fx.Node
    heads: int | None  # the head count of a 4-D → 3-D reshape of the probabilities
    kept: Any = None  # the end of a slice keeping the first keys (the sinks' columns dropped)


def _row_max_shift(node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """(x, its max readers) if ``node`` is ``x - max(x, -1, keepdim)``: a shift the softmax does not see."""
    if node.target is not aten.sub.Tensor or node.kwargs.get("alpha", 1) != 1:
        return None
    x, m = node.args[:2]
    if not isinstance(m, fx.Node) or tensor(x) is None:
        return None
    rank = tensor(x).dim()
    if m.target is operator.getitem and m.args[1] == 0 and m.args[0].target is aten.max.dim:
        reducer, dims = m.args[0], [m.args[0].args[1]]
        keep = m.args[0].args[2] if len(m.args[0].args) > 2 else False
    elif m.target is aten.amax.default:
        reducer, dims = m, list(m.args[1])
        keep = m.args[2] if len(m.args) > 2 else False
    else:
        return None
    if reducer.args[0] is not x or not keep or [d % rank for d in dims] != [rank - 1]:
        return None
    return x, (reducer,)


def _read_sinks(top: fx.Node, kept: Any, visited: list[fx.Node]) -> tuple[fx.Node, Any, tuple] | Reject:
    """Below the softmax: (the scores, the sink logits or None, the scores' other readers the fusion removes).

    The softmax may read the scores shifted by their row max (GPT-OSS writes
    it, the softmax does not see it). When the probabilities are sliced to the
    first keys, the scores must be ``cat([scores, sinks], -1)`` with the slice
    dropping exactly the sinks' columns.
    """
    node, allowed = top, ()
    while node.target in _CASTS and _is_upcast(node) and len(value_users(node)) == 1:
        visited.append(node)
        node = node.args[0]
    if (shift := _row_max_shift(node)) is not None:
        visited.append(node)
        node, allowed = shift
    if kept is None:
        return node, None, allowed
    if node.target is not aten.cat.default or len(node.args[0]) != 2 or tensor(node).dim() != 4 \
            or (node.args[1] if len(node.args) > 1 else 0) % 4 != 3:
        return Reject("the probabilities are cut to their first keys, but not after sink logits were appended", node)
    scores, sinks = node.args[0]
    n, sk = tensor(sinks).shape[-1], tensor(scores).shape[-1]
    if not (kept == -n or size_is(kept, sk)):
        return Reject(f"the probabilities are cut at {kept}, not where the {n} sink column(s) start", node)
    if len(value_users(node)) != 1 + len(allowed):
        return Reject(f"the scores with sinks at {node.name} are read elsewhere too", node)
    visited.append(node)
    return scores, sinks, ()


def _feeds_products(node: fx.Node, depth: int = 4) -> bool:
    """Every value user of ``node`` multiplies it into values (``matmul``/``bmm`` left operand), maybe after casts.

    Then the probabilities are not returned or read otherwise: each product
    is an attention of its own (CSE may have merged identical score chains).
    """
    users = value_users(node)
    return bool(users) and all(
        (u.target in (aten.matmul.default, aten.bmm.default) and u.args[0] is node and u.args[1] is not node)
        or (depth > 0 and (u.target in _CASTS or _is_flatten0(u) or _is_key_slice(u)) and u.args[0] is node
            and _feeds_products(u, depth - 1))
        for u in users
    )


def _is_key_slice(node: fx.Node) -> bool:
    """``x[..., :end]`` along the last dim with step 1."""
    if node.target is not aten.slice.Tensor or tensor(node.args[0]) is None:
        return False
    rank = tensor(node.args[0]).dim()
    dim, start = (list(node.args[1:3]) + [0, 0])[:2]
    step = node.args[4] if len(node.args) > 4 else 1
    return dim % rank == rank - 1 and start == 0 and step == 1


def _read_probs(probs: fx.Node, visited: list[fx.Node]) -> _Probs | Reject:
    """The softmax the output product's left operand comes from, through casts, a flatten and a key slice.

    Every node read is appended to ``visited``.
    """
    node, read = probs, _Probs(None, None)
    for _ in range(_MAX_CHAIN):
        if not isinstance(node, fx.Node):
            return Reject("the left operand of the output product is not a tensor", probs)
        visited.append(node)
        if not _feeds_products(node):
            users = ", ".join(u.name for u in value_users(node))
            return Reject(f"the attention probabilities at {node.name} are also read by {users} "
                          "(e.g. returned as attention weights)", node)
        if node.target in _SOFTMAX:
            read.softmax = node
            return read
        if node.target in _CASTS:
            node = node.args[0]
        elif _is_flatten0(node) and read.heads is None:
            read.heads = tensor(node.args[0]).shape[1]
            node = node.args[0]
        elif _is_key_slice(node) and read.kept is None:
            read.kept = node.args[3] if len(node.args) > 3 else None
            node = node.args[0]
        else:
            return Reject(f"the attention probabilities go through {node.target} at {node.name}", node)
    return Reject("the probability chain is too long", probs)


def _is_softmax_fed(node: fx.Node) -> bool:
    """A matmul/bmm whose left operand is (a cast, reshape or key slice of) a softmax: attention-like."""
    left = node.args[0] if node.args else None
    for _ in range(4):
        if not isinstance(left, fx.Node):
            return False
        if left.target in _SOFTMAX:
            return True
        if left.target not in (*_CASTS, aten.reshape.default, aten.dropout.default) and not _is_key_slice(left):
            return False
        left = left.args[0]
    return False


def _cast_mask(mask: fx.Node, dtype: torch.dtype, b: Builder) -> fx.Node:
    """A float mask in the query's dtype: finite fills below its range clamped so they stay finite, -inf kept.

    A row may mix -inf (a causal mask) with a finite fill (padding at
    ``finfo.min``): the model's softmax spreads over the finite entries only,
    so -inf must not become a finite fill too.
    """
    t = tensor(mask)
    if t.dtype == torch.bool or t.dtype == dtype:
        return mask
    if torch.finfo(t.dtype).max > torch.finfo(dtype).max:
        clamped = b.call(aten.clamp_min.default, mask, torch.finfo(dtype).min)
        mask = b.call(aten.where.self, b.call(aten.isneginf.default, mask), mask, clamped)
    return b.call(aten.to.dtype, mask, dtype)


@rule(EAGER, looks_like=_is_softmax_fed)
def eager_attention(m: Match, b: Builder) -> fx.Node | Reject | None:
    if not _is_softmax_fed(m.root):
        return None
    visited: list[fx.Node] = []
    read = _read_probs(m.probs, visited)
    if isinstance(read, Reject):
        return read
    softmax, probs_heads = read.softmax, read.heads
    rank = tensor(softmax).dim()
    if softmax.args[1] % rank != rank - 1:
        return Reject(f"softmax over dim {softmax.args[1]}, not the key dim", softmax)
    below = _read_sinks(softmax.args[0], read.kept, visited)
    if isinstance(below, Reject):
        return below
    top, sinks, allowed = below
    chain = _read_scores(top, visited, allowed)
    if isinstance(chain, Reject):
        return chain
    product, steps = chain
    if sinks is not None and tensor(product).dim() != 4:
        return Reject("sink logits on 3-D (batch·heads) scores", product)
    q, q_scale = _peel_scale(product.args[-2])
    kT, k_scale = _peel_scale(product.args[-1])
    scores = _replay(product, steps, q_scale * k_scale, b)
    if isinstance(scores, Reject):
        return scores
    if scores.heads is not None and probs_heads is not None and scores.heads != probs_heads:
        return Reject(f"the scores have {scores.heads} heads but the probabilities {probs_heads}", softmax)
    mask, k, v = scores.mask, _untranspose(kT, b), m.v
    lift = _Lifter(b, scores.heads or probs_heads or 1)
    if tensor(product).dim() == 3 and mask is not None and scores.heads is None:
        mask = lift(mask)
    q, k, v = lift(q), lift(k), lift(v)
    if tensor(q).dim() != 4 or tensor(m.root).dim() not in (3, 4):
        return Reject(f"q {tuple(tensor(q).shape)} is not 4-D (batch, heads, seq, dim)", product)
    k, v = _unrepeat(k, v)
    if (bad := _check_heads(q, k, v)) is not None:
        return bad
    sources = [product.args[-2], product.args[-1], *product.graph.find_nodes(op="placeholder")]
    if (blocked := detach_shape_readers(visited, sources, b)) is not None:
        return Reject(f"the shape of {blocked.name} is read, and no input has its dims", blocked)
    if mask is not None:
        mask = _cast_mask(mask, tensor(q).dtype, b)
    extra = () if sinks is None else (sinks,)
    out = b.call(OPS["attention"], q, k, v, mask, float(scores.scale), False, scores.softcap, *extra)
    if tensor(m.root).dim() == 3:
        out = b.call(aten.flatten.using_ints, out, 0, 1)
    b.consume(softmax, product)
    return out


@rule(SDPA, looks_like=lambda node: True)
def sdpa_attention(m: Match, b: Builder) -> fx.Node | Reject:
    if m.dropout_p:
        return Reject(f"attention dropout is active (p={m.dropout_p})")
    k, v = _unrepeat(m.k, m.v)
    if (bad := _check_heads(m.q, k, v)) is not None:
        return bad
    scale = m.scale
    if scale is None:
        head_dim = tensor(m.q).shape[-1]
        scale = 1.0 / math.sqrt(head_dim) if isinstance(head_dim, int) else None
    return b.call(OPS["attention"], m.q, k, v, m.mask, scale, bool(m.causal))


fuse_attention = RulePass([eager_attention, sdpa_attention])
"""The fuse-attention pass."""
