"""fuse-rope: the rotate_half rotary embedding of q and k → one fxfuse.rope.

Matches, for each tensor, ``x·cos + cat(-x[..., h:], x[..., :h])·sin`` with
h half the head dim (the ``rotate_half`` spelling of LLaMA-family models),
then pairs the rotation of q with the rotation of k that reads the same
cos and sin, and replaces both with one ``fxfuse.rope(q, k, cos, sin)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import size_is, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var, match

aten = torch.ops.aten

_x = Var("x")
_rotated = P.cat(
    [P.neg(P.slice(_x, Const("d2"), Const("h"), Const("end"))).single_use(), P.slice(_x, Const("d1"), 0, Const("h"))],
    Const("cat_dim"),
).single_use()
ROTATION = P.add(P.mul(_x, Var("cos")).single_use(), P.mul(_rotated, Var("sin")).single_use())


def _check_halves(m: Match) -> Reject | None:
    x = tensor(m.x)
    rank, dim = x.dim(), x.shape[-1]
    if any(d % rank != rank - 1 for d in (m.d1, m.d2, m.cat_dim)):
        return Reject("rotates along a dim other than the last", m.root)
    to_end = m.end is None or (isinstance(m.end, int) and isinstance(dim, int) and m.end >= dim)
    if not size_is(2 * m.h, dim) or not to_end:
        return Reject(f"splits the head dim {dim} at {m.h}, not in halves (partial rotary is not fused yet)", m.root)
    for name in ("cos", "sin"):
        t = tensor(m.get(name))
        if t is None or not size_is(t.shape[-1], dim):
            return Reject(f"{name} does not span the head dim {dim}", m.root)
    return None


def _partner(m: Match) -> Match | None:
    """The rotation of another tensor that reads the same cos and sin (k for q, q for k)."""
    for mul in m.cos.users:
        for add in mul.users:
            if add is m.root:
                continue
            other = match(ROTATION, add)
            if isinstance(other, Match) and other.cos is m.cos and other.sin is m.sin and other.x is not m.x:
                return other
    return None


def _looks_like_rope(node: fx.Node) -> bool:
    return any(
        isinstance(a, fx.Node) and any(isinstance(i, fx.Node) and i.target is aten.cat.default for i in a.all_input_nodes)
        for a in node.all_input_nodes
    )


@rule(ROTATION, looks_like=_looks_like_rope)
def rotate_half_pair(m: Match, b: Builder) -> fx.Node | Reject:
    if (bad := _check_halves(m)) is not None:
        return bad
    other = _partner(m)
    if other is None:
        return Reject("rotates one tensor alone; fxfuse.rope rotates q and k together", m.root)
    order = {n: i for i, n in enumerate(b.graph.nodes)}
    first, second = sorted((m, other), key=lambda r: order[r.root])
    if any(order[n] >= order[first.root] for n in (first.x, second.x, m.cos, m.sin)):
        return Reject("q and k are computed after the first rotation; they cannot be rotated together", m.root)
    with b.before(first.root):
        fused = b.call(OPS["rope"], first.x, second.x, m.cos, m.sin, False)
        rotated = {first.root: b.item(fused, 0), second.root: b.item(fused, 1)}
    b.also_replace(other.root, rotated[other.root])
    return rotated[m.root]


fuse_rope = RulePass([rotate_half_pair])
"""The fuse-rope pass."""
