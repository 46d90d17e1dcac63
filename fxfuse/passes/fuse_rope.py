"""fuse-rope: the rotary embedding of q and k → one fxfuse.rope.

A rotation is ``x·cos + rot(x)·sin`` with ``rot`` in one of two spellings:

* ``rotate_half`` (LLaMA family): ``cat(-x[..., h:], x[..., :h])``, h half the rotary dim;
* interleaved pairs (GPT-J): ``flatten(stack(-x[..., 1::2], x[..., 0::2]), -2)``.

Partial rotary (GPT-NeoX, Phi, GPT-J) rotates only ``x = t[..., :r]`` and
appends the rest: ``cat(rotation, t[..., r:])``; that whole form is taken too.
The rotation of q is paired with the rotation of k that reads the same cos
and sin, and both become one ``fxfuse.rope(q, k, cos, sin, interleaved)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import size_is, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Pattern, Var, match

aten = torch.ops.aten

_x = Var("x")
_half = P.cat(
    [P.neg(P.slice(_x, Const("d2"), Const("h"), Const("end"))).single_use(), P.slice(_x, Const("d1"), 0, Const("h"))],
    Const("cat_dim"),
).bind("half").single_use()
_pairs = P.flatten(
    P.stack([P.neg(P.slice(_x, Const("d2"), 1, Const("end"), 2)).single_use(), P.slice(_x, Const("d1"), 0, Const("end2"), 2)],
            Const("stack_dim")).single_use(),
    Const("flat_start"), Const("flat_end"),
).bind("pairs").single_use()
ROTATION = P.add(P.mul(_x, Var("cos")).single_use(), P.mul(_half | _pairs, Var("sin")).single_use())
PARTIAL = P.cat([ROTATION.bind("rotation").single_use(), P.slice(Var("full"), Const("pass_dim"), Const("r"), Const("pass_end"))],
                Const("out_dim"))


def _last(dim: int, rank: int) -> bool:
    return dim % rank == rank - 1


def _to_end(end: int | None, size) -> bool:
    return end is None or (isinstance(end, int) and isinstance(size, int) and end >= size)


def _check_rotation(m: Match) -> Reject | None:
    """The rotation pairs dims within the last dim of x, and cos/sin span it."""
    x = tensor(m.x)
    rank, dim = x.dim(), x.shape[-1]
    if m.get("half") is not None:
        if any(not _last(d, rank) for d in (m.d1, m.d2, m.cat_dim)):
            return Reject("rotates along a dim other than the last", m.root)
        if not size_is(2 * m.h, dim) or not _to_end(m.end, dim):
            return Reject(f"splits the rotary dim {dim} at {m.h}, not in halves", m.root)
    else:
        if any(not _last(d, rank) for d in (m.d1, m.d2)) or not _last(m.stack_dim, rank + 1):
            return Reject("pairs dims other than neighbours of the last dim", m.root)
        if not (m.flat_start % (rank + 1) == rank - 1 and m.flat_end in (-1, rank)) or not (_to_end(m.end, dim) and _to_end(m.end2, dim)):
            return Reject("the interleaved pairs are not flattened back into the last dim", m.root)
    for name in ("cos", "sin"):
        t = tensor(m.get(name))
        if t is None or not size_is(t.shape[-1], dim):
            return Reject(f"{name} does not span the rotary dim {dim}", m.root)
    return None


def _check_partial(m: Match) -> Reject | None:
    """``x`` is ``full[..., :r]`` and the cat appends ``full[..., r:]``."""
    full, x = tensor(m.full), tensor(m.x)
    rank = full.dim()
    head = m.x
    if not (head.target is aten.slice.Tensor and head.args[0] is m.full and _last(head.args[1], rank)
            and (head.args[2] if len(head.args) > 2 else 0) == 0 and size_is(x.shape[-1], m.r)):
        return Reject("the rotated part is not the leading slice of the tensor the rest comes from", m.root)
    if not (_last(m.pass_dim, rank) and _last(m.out_dim, rank) and _to_end(m.pass_end, full.shape[-1])):
        return Reject("the pass-through part is not the rest of the last dim", m.root)
    return None


def _partners(m: Match, pattern: Pattern) -> list[Match]:
    """Rotations of other tensors that read the same cos and sin, nearest in the graph first.

    Every layer reads the same cos and sin, so the nearest rotation is the
    one of the same layer (k for q, q for k).
    """
    found = []
    for mul in m.cos.users:
        for add in mul.users:
            roots = list(add.users) if pattern is PARTIAL else [add]
            for root in roots:
                if root is m.root:
                    continue
                other = match(pattern, root)
                if (isinstance(other, Match) and other.cos is m.cos and other.sin is m.sin and other.x is not m.x
                        and (other.get("half") is None) == (m.get("half") is None)):
                    found.append(other)
    order = {n: i for i, n in enumerate(m.root.graph.nodes)}
    return sorted(found, key=lambda o: abs(order[o.root] - order[m.root]))


def _pair(m: Match, b: Builder, pattern: Pattern, source: str) -> fx.Node | Reject:
    candidates = _partners(m, pattern)
    if not candidates:
        return Reject("rotates one tensor alone; fxfuse.rope rotates q and k together", m.root)
    order = {n: i for i, n in enumerate(b.graph.nodes)}
    for other in candidates:
        first, second = sorted((m, other), key=lambda r: order[r.root])
        inputs = (first.get(source), second.get(source), m.cos, m.sin)
        if all(order[n] < order[first.root] for n in inputs):
            break
    else:
        return Reject("q and k are computed after the first rotation; they cannot be rotated together", m.root)
    with b.before(first.root):
        fused = b.call(OPS["rope"], *inputs, m.get("pairs") is not None)
        rotated = {first.root: b.item(fused, 0), second.root: b.item(fused, 1)}
    b.also_replace(other.root, rotated[other.root])
    return rotated[m.root]


def _looks_like_rope(node: fx.Node) -> bool:
    rotations = (aten.cat.default, aten.flatten.using_ints)
    return any(
        isinstance(a, fx.Node) and any(isinstance(i, fx.Node) and i.target in rotations for i in a.all_input_nodes)
        for a in node.all_input_nodes
    )


@rule(PARTIAL)
def partial_rotary_pair(m: Match, b: Builder) -> fx.Node | Reject:
    if (bad := _check_rotation(m) or _check_partial(m)) is not None:
        return bad
    return _pair(m, b, PARTIAL, "full")


@rule(ROTATION, looks_like=_looks_like_rope)
def rotary_pair(m: Match, b: Builder) -> fx.Node | Reject:
    if (bad := _check_rotation(m)) is not None:
        return bad
    return _pair(m, b, ROTATION, "x")


fuse_rope = RulePass([partial_rotary_pair, rotary_pair])
"""The fuse-rope pass."""
