"""fuse-rope: the rotary embedding of q and k → one fxfuse.rope.

A rotation is ``x·cos + rot(x)·sin`` with ``rot`` in one of two spellings:

* ``rotate_half`` (LLaMA family): ``cat(-x[..., h:], x[..., :h])``, h half the rotary dim;
* interleaved pairs (GPT-J): ``flatten(stack(-x[..., 1::2], x[..., 0::2]), -2)``.

Partial rotary (GPT-NeoX, Phi, GPT-J) rotates only ``x = t[..., :r]`` and
appends the rest: ``cat(rotation, t[..., r:])``; that whole form is taken too.
A third spelling rotates the two halves with half-width tables c and s:
``cat(a·c - b·s, b·c + a·s)`` with (a, b) the first and second half of x
(GPT-OSS's ``chunk``), or its even and odd dims (DeepSeek-V3's interleaved
rope, whose output is de-interleaved): that is the ``rotate_half`` rope of
``x`` (or of ``cat(a, b)``) with the tables ``cat(c, c)`` and ``cat(s, s)``.
The rotation of q is paired with the rotation of k that reads the same cos
and sin, and both become one ``fxfuse.rope(q, k, cos, sin, interleaved)``.
"""

from __future__ import annotations

import operator

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
_a, _b, _c, _s = Var("a"), Var("b"), Var("cos"), Var("sin")
HALVES = P.cat(
    [P.sub(P.mul(_a, _c).single_use(), P.mul(_b, _s).single_use()).single_use(),
     P.add(P.mul(_b, _c).single_use(), P.mul(_a, _s).single_use()).single_use()],
    Const("cat_dim"),
)
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


def _halves(a: fx.Node, b: fx.Node) -> tuple[fx.Node, bool] | None:
    """(x, even_odd) if ``a`` and ``b`` are the two halves of ``x``'s last dim, or its even and odd dims."""
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if a.target is operator.getitem and b.target is operator.getitem and a.args[0] is b.args[0] \
            and (a.args[1], b.args[1]) == (0, 1):
        split = a.args[0]
        x = split.args[0] if split.op == "call_function" else None
        t = tensor(x)
        if t is None or len(split.users) != 2 or (split.args[2] if len(split.args) > 2 else 0) % t.dim() != t.dim() - 1:
            return None
        parts = split.args[1]
        if split.target is aten.chunk.default:
            halves = parts == 2
        elif split.target is aten.split.Tensor:
            halves = isinstance(parts, int) and size_is(2 * parts, t.shape[-1])
        else:
            halves = split.target is aten.split_with_sizes.default and len(parts) == 2 and parts[0] == parts[1]
        return (x, False) if halves else None
    if a.target is aten.slice.Tensor and b.target is aten.slice.Tensor and a.args[0] is b.args[0]:
        x, t = a.args[0], tensor(a.args[0])
        sa, sb = (list(n.args[1:]) + [0, 0, None, 1][len(n.args) - 1:] for n in (a, b))
        if t is None or sa[0] % t.dim() != t.dim() - 1 or sb[0] % t.dim() != t.dim() - 1:
            return None
        if sa[3] == 2 and sb[3] == 2 and (sa[1], sb[1]) == (0, 1) and _to_end(sa[2], t.shape[-1]) \
                and _to_end(sb[2], t.shape[-1]):
            return x, True
        if sa[3] == 1 and sb[3] == 1 and sa[1] == 0 and isinstance(sa[2], int) and sb[1] == sa[2] \
                and size_is(2 * sa[2], t.shape[-1]) and _to_end(sb[2], t.shape[-1]):
            return x, False
    return None


def _deinterleaved(x: fx.Node, b: Builder) -> fx.Node:
    """``cat(x[..., 0::2], x[..., 1::2], -1)``."""
    return b.call(aten.cat.default, [b.call(aten.slice.Tensor, x, -1, start, None, 2) for start in (0, 1)], -1)


def _half_partners(m: Match) -> list[tuple[Match, tuple[fx.Node, bool]]]:
    """Other half rotations reading the same tables, nearest first, with their halves."""
    found = []
    for mul in m.cos.users:
        for combine in mul.users:
            for root in combine.users:
                if root is m.root:
                    continue
                other = match(HALVES, root)
                if isinstance(other, Match) and other.cos is m.cos and other.sin is m.sin \
                        and (halves := _halves(other.a, other.b)) is not None:
                    found.append((other, halves))
    order = {n: i for i, n in enumerate(m.root.graph.nodes)}
    return sorted(found, key=lambda o: abs(order[o[0].root] - order[m.root]))


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


@rule(HALVES)
def half_rotation_pair(m: Match, b: Builder) -> fx.Node | Reject | None:
    mine = _halves(m.a, m.b)
    if mine is None or not _last(m.cat_dim, tensor(m.root).dim()):
        return None
    if not (size_is(tensor(m.cos).shape[-1], tensor(m.a).shape[-1]) and size_is(tensor(m.sin).shape[-1],
                                                                               tensor(m.a).shape[-1])):
        return Reject("the half-width cos/sin do not span half the rotary dim", m.root)
    partners = [(o, h) for o, h in _half_partners(m) if h[1] == mine[1]]
    if not partners:
        return Reject("rotates one tensor alone; fxfuse.rope rotates q and k together", m.root)
    order = {n: i for i, n in enumerate(b.graph.nodes)}
    for other, theirs in partners:
        (first, f_halves), (second, s_halves) = sorted(((m, mine), (other, theirs)), key=lambda r: order[r[0].root])
        if all(order[n] < order[first.root] for n in (f_halves[0], s_halves[0], m.cos, m.sin)):
            break
    else:
        return Reject("q and k are computed after the first rotation; they cannot be rotated together", m.root)
    with b.before(first.root):
        cos, sin = (b.call(aten.cat.default, [t, t], -1) for t in (m.cos, m.sin))
        # the rotate_half rope of x itself, or of its de-interleaved dims (the model's output is de-interleaved)
        sources = [_deinterleaved(x, b) if even_odd else x for x, even_odd in (f_halves, s_halves)]
        fused = b.call(OPS["rope"], *sources, cos, sin, False)
        rotated = {first.root: b.item(fused, 0), second.root: b.item(fused, 1)}
    b.also_replace(other.root, rotated[other.root])
    return rotated[m.root]


fuse_rope = RulePass([partial_rotary_pair, rotary_pair, half_rotation_pair])
"""The fuse-rope pass."""
