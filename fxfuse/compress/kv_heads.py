"""merge-kv-heads: fewer key/value heads (MHA → GQA, GQA → fewer groups or MQA), merged in closed form.

Each attention op's key/value heads are split into groups of m; a group
becomes one key/value head, and the query heads that read the group's heads
read the merged one (they are reordered so that each new group's query heads
are adjacent, as grouped-query attention needs; a permutation of query heads
with their output-projection columns changes nothing).

A merge is linear: the merged key is k̄ = Σᵢ kᵢ·Aᵢ and each original key is
read back as kᵢ ≈ k̄·Pᵢ, so query head h (which read key head i) becomes
q_h·Pᵢᵀ (its q-projection rows times Pᵢ): the scores q_h·kᵢ are kept as
far as k̄ can carry them. Values likewise, v̄ = Σᵢ vᵢ·Bᵢ, vᵢ ≈ v̄·Qᵢ, and
head h's output-projection columns become W_o,h·Qᵢᵀ.

- ``"mean"`` (Ainslie et al., GQA): Aᵢ = I/m, Pᵢ = I, the same for values.
- ``"aligned"``: the best common subspace of the group's heads on the
  calibration tokens. Keys are weighted by what the scores see of them (the
  second moment of the queries that read them) and values by the output
  projection that reads them; the merged head is the top principal
  subspace of the weighted, concatenated heads (Aᵢ, Pᵢ from its basis). This
  contains the orthogonal (Procrustes) alignment before averaging of Jin et
  al. (2412.20677) as a special case, and is exact whenever the group's heads
  span no more than one head's dimensions: identical heads, or heads that are
  rotations of one another. With RoPE, a transform of the rotary dims must
  commute with the position rotation, so each frequency pair is merged as one
  complex number (a 2×2 rotation and scale per head and pair: the best
  rank-one complex fit across the group), and the dims that do not rotate
  (partial RoPE) as a real subspace.

Groups are adjacent heads (``grouping="neighbours"``) or chosen from the
calibration statistics (``"activation"``, as AsymGQA groups by activations):
starting from neighbours, heads are swapped between groups while that lowers
the merged groups' weighted residual energy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import Tensor

from fxfuse.compress.calibrate import Batch, observe, token_mask
from fxfuse.compress.heads import Heads, _refresh_values, _resize_views, find_heads
from fxfuse.compress.repair import set_tensor
from fxfuse.compress.structure import linear_bias, linear_weight
from fxfuse.errors import InputError
from fxfuse.ir.meta import attr_of
from fxfuse.ir.verify import verify

Method = Literal["aligned", "mean"]
Grouping = Literal["activation", "neighbours"]
METHODS = ("aligned", "mean")
GROUPINGS = ("activation", "neighbours")
# Relative floor added to a metric before its square root: a query or output dim that is never
# used must not make the whitening singular.
_EPSILON = 1e-6


@dataclass
class Moments:
    """Second moments over the calibration tokens of one op: keys and values (all heads, before RoPE),
    and each query head's own (before RoPE)."""

    keys: Tensor  # (Hkv·D, Hkv·D)
    values: Tensor  # (Hkv·Dv, Hkv·Dv)
    queries: Tensor  # (Hq, D, D)


@dataclass
class Merge:
    """One op's merge: groups of original KV heads, and per original KV head the maps in and out."""

    groups: list[list[int]]
    key_in: list[Tensor]  # Aᵢ (D, D): k̄ = Σ kᵢ·Aᵢ over the group
    key_out: list[Tensor]  # Pᵢ (D, D): kᵢ ≈ k̄·Pᵢ
    value_in: list[Tensor]  # Bᵢ (Dv, Dv)
    value_out: list[Tensor]  # Qᵢ (Dv, Dv)


def check_kv_target(found: list[Heads], kv_heads: int, tp_degree: int = 1) -> None:
    """Refuse a KV-head count that some op cannot be merged to (it must divide the op's KV heads)."""
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads < 1:
        raise InputError(f"kv_heads is the number of key/value heads to keep per attention op, a positive whole "
                         f"number; got {kv_heads!r}")
    for h in found:
        if kv_heads >= h.kv_heads or h.kv_heads % kv_heads:
            raise InputError(f"{h.name} has {h.kv_heads} key/value heads; kv_heads={kv_heads} must be fewer and "
                             f"divide them (groups of equal size): try one of "
                             f"{[d for d in range(1, h.kv_heads) if h.kv_heads % d == 0]}")
        if kv_heads % tp_degree:
            raise InputError(f"kv_heads={kv_heads} does not split over tp_degree={tp_degree}")


def kv_moments(gm: fx.GraphModule, found: list[Heads], data: list[Batch]) -> dict[str, Moments]:
    """The :class:`Moments` of every op in ``found``, from one pass over ``data`` (padding tokens left out)."""
    sums = {h.name: Moments(torch.zeros(h.kv_heads * h.head_dim, h.kv_heads * h.head_dim, dtype=torch.float64),
                            torch.zeros(h.kv_heads * h.v_dim, h.kv_heads * h.v_dim, dtype=torch.float64),
                            torch.zeros(h.q_heads, h.head_dim, h.head_dim, dtype=torch.float64)) for h in found}
    tokens = [0]

    def on_batch(_: int, values: dict[str, Tensor], batch: Batch) -> None:
        for h in found:
            mask = token_mask(batch, values[f"k:{h.name}"])
            k, v, q = (values[f"{w}:{h.name}"][mask].double() for w in "kvq")
            m = sums[h.name]
            m.keys += k.T @ k
            m.values += v.T @ v
            q = q.view(len(q), h.q_heads, h.head_dim)
            m.queries += torch.einsum("nhd,nhe->hde", q, q)
        tokens[0] += int(token_mask(batch, values[f"k:{found[0].name}"]).sum())

    nodes = {f"{w}:{h.name}": getattr(h, w) for h in found for w in "kvq"}
    observe(gm, nodes, data, on_batch, desc="KV-head statistics")
    n = max(tokens[0], 1)
    return {name: Moments(m.keys / n, m.values / n, m.queries / n) for name, m in sums.items()}


def _rotary(h: Heads) -> tuple[int, bool]:
    """(rotary dims, interleaved) of the op's RoPE; (0, False) without RoPE."""
    if h.rope is None:
        return 0, False
    interleaved = h.rope.args[4] if len(h.rope.args) > 4 else h.rope.kwargs.get("interleaved", False)
    return int(h.rope.args[2].meta["val"].shape[-1]), bool(interleaved)


def _pairs(rot: int, interleaved: bool) -> list[tuple[int, int]]:
    """The (real, imaginary) dims of each rotating frequency pair."""
    return [(2 * j, 2 * j + 1) if interleaved else (j, j + rot // 2) for j in range(rot // 2)]


def _root(c: Tensor) -> tuple[Tensor, Tensor]:
    """(L, L⁻¹), L the symmetric square root of ``c`` (made positive definite by a relative floor)."""
    floor = _EPSILON * float(c.diagonal().sum()) / len(c) + 1e-30
    evals, evecs = torch.linalg.eigh(c + floor * torch.eye(len(c), dtype=c.dtype))
    roots = evals.clamp_min(floor).sqrt()
    return (evecs * roots) @ evecs.T, (evecs / roots) @ evecs.T


def _block(m: Tensor, heads: list[int], dims: list[int], size: int) -> Tensor:
    """The rows and columns of dims ``dims`` of each head in ``heads`` (heads of ``size`` dims) of ``m``."""
    index = torch.tensor([i * size + d for i in heads for d in dims])
    return m[index][:, index]


def _real_merge(cov: Tensor, metrics: list[Tensor]) -> tuple[list[Tensor], list[Tensor], float]:
    """The best d-dim subspace of m heads of d dims each, in the metric Lᵢ·Lᵢᵀ = ``metrics[i]`` per head:
    (Aᵢ, Pᵢ, residual energy) with k̄ = Σ kᵢ·Aᵢ, kᵢ ≈ k̄·Pᵢ; ``cov`` the heads' joint second moment."""
    d = len(metrics[0])
    roots = [_root(c) for c in metrics]
    whiten = torch.block_diag(*(r[0] for r in roots))
    evals, evecs = torch.linalg.eigh(whiten.T @ cov @ whiten)
    basis = evecs[:, -d:]
    parts = basis.split(d)
    return ([root @ u for (root, _), u in zip(roots, parts)], [u.T @ inverse for (_, inverse), u in zip(roots, parts)],
            float(evals[:-d].clamp_min(0).sum()))


def _complex(cov: Tensor, re: list[int], im: list[int]) -> Tensor:
    """E[conj(zᵢ)·zₗ] of the complex numbers zᵢ = x[re[i]] + i·x[im[i]], from the real second moment ``cov``."""
    re_, im_ = torch.tensor(re), torch.tensor(im)
    a, b = cov[re_][:, re_], cov[im_][:, im_]
    ab = cov[re_][:, im_]
    return torch.complex(a + b, ab - ab.T)


def _complex_merge(cov: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, float]:
    """One rotary frequency pair of m heads merged into one complex number: ``cov`` the (2m, 2m) joint
    second moment of the heads' (real, imaginary) parts, ``weights`` (m,) what the scores see of each head.
    Returns (cᵢ, pᵢ, residual) with z̄ = Σ cᵢ·zᵢ and zᵢ ≈ pᵢ·z̄ (complex), the best rank-one fit."""
    hermitian = _complex(cov, list(range(0, len(cov), 2)), list(range(1, len(cov), 2)))
    scale = weights.clamp_min(_EPSILON * float(weights.mean()) + 1e-30).sqrt()
    weighted = hermitian * scale[:, None] * scale[None, :]
    evals, evecs = torch.linalg.eigh(weighted)
    u = evecs[:, -1]
    return scale * u, u.conj() / scale, float(evals[:-1].clamp_min(0).sum())


def _multiply(c: complex) -> Tensor:
    """The 2×2 map of row vectors (re, im) ↦ (re, im)·M that multiplies by the complex number ``c``."""
    return torch.tensor([[c.real, c.imag], [-c.imag, c.real]], dtype=torch.float64)


def _key_merge(h: Heads, m: Moments, group: list[int]) -> tuple[list[Tensor], list[Tensor], float]:
    """(Aᵢ, Pᵢ, residual) for the keys of ``group``: rotary pairs as complex numbers, other dims as a subspace,
    each weighted by the second moment of the queries that read them."""
    d = h.head_dim
    rot, interleaved = _rotary(h)
    query_metric = [m.queries[i * h.group:(i + 1) * h.group].sum(0) for i in group]
    key_in = [torch.zeros(d, d, dtype=torch.float64) for _ in group]
    key_out = [torch.zeros(d, d, dtype=torch.float64) for _ in group]
    residual = 0.0
    for re, im in _pairs(rot, interleaved):
        weights = torch.stack([q[re, re] + q[im, im] for q in query_metric])
        c, p, r = _complex_merge(_block(m.keys, group, [re, im], d), weights)
        residual += r
        for j in range(len(group)):
            pair = torch.tensor([re, im])
            key_in[j][pair[:, None], pair] = _multiply(complex(c[j]))
            key_out[j][pair[:, None], pair] = _multiply(complex(p[j]))
    rest = list(range(rot, d))  # the dims that do not rotate (partial RoPE; all of them without RoPE)
    if rest:
        index = torch.tensor(rest)
        a, p, r = _real_merge(_block(m.keys, group, rest, d), [q[index][:, index] for q in query_metric])
        residual += r
        for j in range(len(group)):
            key_in[j][index[:, None], index] = a[j]
            key_out[j][index[:, None], index] = p[j]
    return key_in, key_out, residual


def _value_merge(h: Heads, m: Moments, group: list[int], out_weight: Tensor) -> tuple[list[Tensor], list[Tensor], float]:
    """(Bᵢ, Qᵢ, residual) for the values of ``group``, weighted by the output-projection columns that read them."""
    dv = h.v_dim
    columns = out_weight.double().view(out_weight.shape[0], h.q_heads, dv)
    return _real_merge(_block(m.values, group, list(range(dv)), dv), [_reader_metric(columns, h, i) for i in group])


def _reader_metric(columns: Tensor, h: Heads, kv_head: int) -> Tensor:
    """(Dv, Dv): Σ W_o,hᵀ·W_o,h over the query heads h that read value head ``kv_head``; ``columns`` is the
    output projection as (hidden, Hq, Dv)."""
    heads = columns[:, kv_head * h.group:(kv_head + 1) * h.group]
    return torch.einsum("ohd,ohe->de", heads, heads)


def _mean_merge(group: list[int], d: int) -> tuple[list[Tensor], list[Tensor]]:
    eye = torch.eye(d, dtype=torch.float64)
    return [eye / len(group)] * len(group), [eye] * len(group)


def _cost(h: Heads, m: Moments, group: list[int], out_weight: Tensor, totals: tuple[float, float]) -> float:
    """The relative residual energy of merging ``group`` (keys and values, each over the op's total)."""
    return _key_merge(h, m, group)[2] / totals[0] + _value_merge(h, m, group, out_weight)[2] / totals[1]


def _energy(h: Heads, m: Moments, out_weight: Tensor) -> tuple[float, float]:
    """The op's total key and value energy in the metrics of :func:`_key_merge` / :func:`_value_merge`."""
    d, dv = h.head_dim, h.v_dim
    columns = out_weight.double().view(out_weight.shape[0], h.q_heads, dv)
    keys = values = 1e-30
    for i in range(h.kv_heads):
        keys += float((m.queries[i * h.group:(i + 1) * h.group].sum(0) * m.keys[i * d:(i + 1) * d, i * d:(i + 1) * d])
                      .sum())
        values += float((_reader_metric(columns, h, i) * m.values[i * dv:(i + 1) * dv, i * dv:(i + 1) * dv]).sum())
    return keys, values


def choose_groups(h: Heads, m: Moments, kv_heads: int, out_weight: Tensor, grouping: Grouping) -> list[list[int]]:
    """Groups of ``h.kv_heads // kv_heads`` original KV heads: adjacent ones, or (``"activation"``) the
    neighbours improved by swapping heads between groups while the summed merge cost falls."""
    size = h.kv_heads // kv_heads
    groups = [list(range(g * size, (g + 1) * size)) for g in range(kv_heads)]
    if grouping == "neighbours" or kv_heads == 1:
        return groups
    if grouping != "activation":
        raise InputError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
    totals = _energy(h, m, out_weight)
    costs = [_cost(h, m, g, out_weight, totals) for g in groups]
    while True:
        best = None
        for a in range(kv_heads):
            for b in range(a + 1, kv_heads):
                for i in range(size):
                    for j in range(size):
                        ga, gb = list(groups[a]), list(groups[b])
                        ga[i], gb[j] = gb[j], ga[i]
                        ca, cb = _cost(h, m, sorted(ga), out_weight, totals), _cost(h, m, sorted(gb), out_weight, totals)
                        gain = costs[a] + costs[b] - ca - cb
                        if gain > 1e-9 * (costs[a] + costs[b]) and (best is None or gain > best[0]):
                            best = (gain, a, b, sorted(ga), sorted(gb), ca, cb)
        if best is None:
            return [sorted(g) for g in sorted(groups)]
        _, a, b, groups[a], groups[b], costs[a], costs[b] = best


def plan_merge(h: Heads, m: Moments, kv_heads: int, out_weight: Tensor, method: Method,
               grouping: Grouping) -> Merge:
    """The :class:`Merge` of op ``h`` down to ``kv_heads`` key/value heads."""
    if method not in METHODS:
        raise InputError(f"merge method must be one of {METHODS}, not {method!r}")
    groups = choose_groups(h, m, kv_heads, out_weight, grouping)
    merge = Merge(groups, [None] * h.kv_heads, [None] * h.kv_heads, [None] * h.kv_heads, [None] * h.kv_heads)
    for group in groups:
        if method == "mean":
            key_in, key_out = _mean_merge(group, h.head_dim)
            value_in, value_out = _mean_merge(group, h.v_dim)
        else:
            key_in, key_out, _ = _key_merge(h, m, group)
            value_in, value_out, _ = _value_merge(h, m, group, out_weight)
        for j, i in enumerate(group):
            merge.key_in[i], merge.key_out[i] = key_in[j], key_out[j]
            merge.value_in[i], merge.value_out[i] = value_in[j], value_out[j]
    return merge


def merge_kv_heads(gm: fx.GraphModule, kv_heads: int, data: list[Batch], method: Method = "aligned",
                   grouping: Grouping = "activation", tp_degree: int = 1) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` (sharing the weights it does not rewrite) whose every attention op reads
    ``kv_heads`` key/value heads, merged by ``method`` from groups chosen by ``grouping`` on ``data``;
    and one note per op naming its groups."""
    found = find_heads(gm)
    if not found:
        raise InputError("the graph has no attention op whose heads can be merged")
    check_kv_target(found, kv_heads, tp_degree)
    if method not in METHODS:
        raise InputError(f"merge method must be one of {METHODS}, not {method!r}")
    moments = kv_moments(gm, found, data)
    plans = {h.name: plan_merge(h, moments[h.name], kv_heads, attr_of(gm, linear_weight(h.out).target).detach(),
                                method, grouping) for h in found}
    graph = copy.deepcopy(gm.graph)
    work = fx.GraphModule(gm, graph)
    for h in find_heads(work):
        _rewrite(work, h, plans[h.name], kv_heads)
    _refresh_values(work)
    result = fx.GraphModule(work, graph)
    verify(result)
    notes = [f"{name}: {method} merge of KV heads {plan.groups}" for name, plan in plans.items()]
    return result, notes


def _rewrite(gm: fx.GraphModule, h: Heads, merge: Merge, kv_heads: int) -> None:
    """Store the merged K/V projections, and the reordered, transformed Q rows and output columns."""
    d, dv = h.head_dim, h.v_dim
    order = [i for group in merge.groups for i in group]  # old KV heads in the new query order
    for linear, maps, size in ((h.k, merge.key_in, d), (h.v, merge.value_in, dv)):
        for node in (linear_weight(linear), linear_bias(linear)):
            if node is None:
                continue
            old = attr_of(gm, node.target).double()
            heads = old.view(h.kv_heads, size, *old.shape[1:])
            merged = [sum(maps[i].T @ heads[i].reshape(size, -1) for i in group) for group in merge.groups]
            new = torch.cat(merged).reshape(kv_heads * size, *old.shape[1:])
            set_tensor(gm, node.target, new.to(attr_of(gm, node.target).dtype).contiguous())
            node.meta.pop("val", None)
    for node in (linear_weight(h.q), linear_bias(h.q)):
        if node is None:
            continue
        old = attr_of(gm, node.target).double()
        heads = old.view(h.q_heads, d, -1)
        rows = [merge.key_out[i] @ heads[i * h.group + r] for i in order for r in range(h.group)]
        set_tensor(gm, node.target, torch.cat(rows).reshape(old.shape).to(attr_of(gm, node.target).dtype))
        node.meta.pop("val", None)
    weight = linear_weight(h.out)
    old = attr_of(gm, weight.target).double()
    columns = old.view(old.shape[0], h.q_heads, dv)
    new = [columns[:, i * h.group + r] @ merge.value_out[i].T for i in order for r in range(h.group)]
    set_tensor(gm, weight.target, torch.cat(new, dim=1).to(attr_of(gm, weight.target).dtype).contiguous())
    weight.meta.pop("val", None)
    _resize_views(h.views["k"], h.kv_heads, kv_heads, d)
    _resize_views(h.views["v"], h.kv_heads, kv_heads, dv)
