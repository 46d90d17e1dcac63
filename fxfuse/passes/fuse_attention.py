"""fuse-attention: softmax(q·kᵀ·s + mask)·v and SDPA calls → fxfuse.attention.

Two rules, on the canonical form:

* ``eager_attention``: ``matmul(cast?(softmax(add?(mul?(matmul(q, kᵀ), s), mask))), v)``
  (the eager attention of BERT, GPT-2, LLaMA-family models, …);
* ``sdpa_attention``: an existing ``scaled_dot_product_attention`` call.

In both, the ``repeat_kv`` expansion of grouped-query attention
(``reshape(expand(unsqueeze(kv, 2)))``) is folded into the op, which reads
the shared key/value heads without copying them.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import same_shape, size_is, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var, maybe

aten = torch.ops.aten


def _cast(inner):
    return maybe(P.cast(inner).single_use(), inner)


_scores = P.matmul(Var("q"), Var("kT")).single_use()
_scaled = maybe(P.mul(_scores, Const("scale", lambda c: isinstance(c, (int, float)))).single_use(), _scores)
_masked = maybe(P.add(_scaled, Var("mask")).bind("masked").single_use(), _scaled)
_probs = _cast(P.softmax(_masked, Const("dim"), Var("softmax_dtype")).bind("softmax").single_use())
EAGER = P.matmul(_probs, Var("v"))

SDPA = P.scaled_dot_product_attention(
    Var("q"), Var("k"), Var("v"), Var("mask"), Const("dropout_p"), Const("causal"),
    scale=Var("scale"), enable_gqa=Const("enable_gqa"),
)


def strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """(kv, n_rep) if ``node`` is ``repeat_kv(kv, n_rep)`` spelled expand+reshape, else (node, 1)."""
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


def _untranspose(kT: fx.Node, b: Builder) -> fx.Node:
    """k from kᵀ: undo a permute that swapped the last two dims, or add one."""
    if kT.target is aten.permute.default:
        perm = list(kT.args[1])
        rank = len(perm)
        swapped = perm[: rank - 2] + [perm[rank - 1], perm[rank - 2]]
        if swapped == list(range(rank)):
            return kT.args[0]
        return b.call(aten.permute.default, kT.args[0], swapped)
    return b.call(aten.permute.default, kT, [0, 1, 3, 2])


def _check_4d(*nodes: fx.Node) -> Reject | None:
    for node in nodes:
        t = tensor(node)
        if t is None or t.dim() != 4:
            shape = None if t is None else tuple(t.shape)
            return Reject(f"{node.name} has shape {shape}; only 4-D (batch, heads, seq, dim) attention is fused", node)
    return None


def _check_heads(q: fx.Node, k: fx.Node, v: fx.Node) -> Reject | None:
    hq, hk, hv = tensor(q).shape[1], tensor(k).shape[1], tensor(v).shape[1]
    grouped = isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0
    if not size_is(hk, hv) or not (size_is(hq, hk) or grouped):
        return Reject(f"query heads {hq} are not a multiple of key/value heads {hk}/{hv}", q)
    return None


def _is_softmax_fed(node: fx.Node) -> bool:
    """A matmul whose left operand is (a cast of) a softmax: attention-like."""
    left = node.args[0] if node.args else None
    while isinstance(left, fx.Node) and left.target in (aten.to.dtype, aten._to_copy.default, aten.dropout.default):
        left = left.args[0]
    return isinstance(left, fx.Node) and left.target is aten.softmax.int


@rule(EAGER, looks_like=_is_softmax_fed)
def eager_attention(m: Match, b: Builder) -> fx.Node | Reject:
    q, v = m.q, m.v
    scores = tensor(m.softmax)
    if m.dim % scores.dim() != scores.dim() - 1:
        return Reject(f"softmax over dim {m.dim}, not the key dim", m.softmax)
    if (bad := _check_4d(q, m.kT, v)) is not None:
        return bad
    mask = m.get("mask")
    if mask is not None:
        mask_t = tensor(mask)
        if mask_t is None or mask_t.dim() > 4:
            return Reject("the score bias is not a tensor of at most 4 dims", m.masked)
        if not same_shape(tensor(m.masked), scores) or mask_t.dtype != tensor(q).dtype:
            return Reject(
                f"the mask {tuple(mask_t.shape)} {mask_t.dtype} does not broadcast into the "
                f"scores {tuple(scores.shape)} {tensor(q).dtype}", m.masked)
    k, v = _unrepeat(_untranspose(m.kT, b), v)
    if (bad := _check_heads(q, k, v)) is not None:
        return bad
    return b.call(OPS["attention"], q, k, v, mask, float(m.get("scale", 1.0)), False)


@rule(SDPA, looks_like=lambda node: True)
def sdpa_attention(m: Match, b: Builder) -> fx.Node | Reject:
    if m.dropout_p:
        return Reject(f"attention dropout is active (p={m.dropout_p})")
    if (bad := _check_4d(m.q, m.k, m.v)) is not None:
        return bad
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
