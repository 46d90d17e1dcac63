"""to-mla: grouped or multi-head attention rewritten as multi-head latent attention (a smaller KV cache).

Per attention op, the cache of Hkv·(D + Dv) numbers per token becomes a
latent c (``latent_dim`` numbers) plus one decoupled rotary key r
(``rope_dims``), shared by every query head (TransMLA 2502.07864, MHA2MLA
2502.14837):

1. **Rotary key (RoRoPE, partial RoPE).** For each RoPE frequency, the
   Hkv heads' key pairs are complex numbers rotating at the same rate, so any
   complex combination of them rotates at that rate too. Their weighted
   principal components (weights: what the queries reading each head see of
   it) are ranked across all frequencies; the top ``rope_dims / 2`` keep
   rotating, as the shared rotary key r, and each query head reads them
   with its own complex coefficient (exact for those components).
2. **Position-free rest.** What the kept components do not hold (the other
   components of every frequency, and the dims that never rotated) loses its
   rotation: its scores become q·k without the relative-position phase. This is
   the one approximation of partial RoPE; it is small for components of little
   energy.
3. **Joint low-rank K/V.** The position-free keys and the values of all
   heads are projected on their top ``latent_dim`` principal subspace, keys in
   the metric of the queries that read them and values in that of the output
   projection, the two balanced to equal energy (TransMLA's key/value norm
   balancing): the latent c. ``method="svd"`` (X-EcoMLA's data-free
   initialisation) takes the same steps with the weights' own second moments
   in place of the calibration activations.
4. **Absorbed up-projections.** Keys and values are never expanded: query head
   h's position-free query is multiplied by its key up-projection (R numbers
   per head), and its value up-projection is folded into the output projection,
   so attention runs on the cache itself: ``fxfuse.latent_attention(q_c, q_r,
   c, r)`` (multi-query attention on [c, r] with c as the value) with the
   source's scale.

With ``rope_dims`` = Hkv × the rotary dims and ``latent_dim`` = the rank of
the rest, the rewrite is exact (tested); smaller sizes trade quality for cache.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx
from torch import Tensor

from fxfuse.compress.calibrate import Batch, observe, token_mask
from fxfuse.compress.heads import Heads, _refresh_values, find_heads, refit_linears
from fxfuse.compress.kv_heads import _complex, _multiply, _pairs, _reader_metric, _root, _rotary
from fxfuse.compress.structure import linear_bias, linear_weight
from fxfuse.errors import InputError
from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import attr_of
from fxfuse.ir.verify import verify

aten = torch.ops.aten
LatentMethod = Literal["activation", "svd"]


@dataclass
class Statistics:
    """Second moments of one op's inputs to attention (pre-RoPE), over tokens: ``kv`` of the concatenated
    keys and values of all heads, ``queries`` of each query head."""

    kv: Tensor  # (Hkv·(D + Dv), Hkv·(D + Dv))
    queries: Tensor  # (Hq, D, D)


@dataclass
class Latent:
    """One op's latent form: every weight of the rewritten attention, as (out, in) matrices and biases."""

    rope_pairs: list[int]  # the source frequency pair of each rotary-key pair
    latent: tuple[Tensor, Optional[Tensor]]  # c = x·Wᵀ + b: (R, hidden)
    rope_key: tuple[Tensor, Optional[Tensor]]  # r before RoPE: (Dr, hidden)
    query_latent: tuple[Tensor, Optional[Tensor]]  # (Hq·R, hidden)
    query_rope: tuple[Tensor, Optional[Tensor]]  # (Hq·Dr, hidden)
    output: Tensor  # (hidden_out, Hq·R)


def statistics(gm: fx.GraphModule, found: list[Heads], data: list[Batch]) -> dict[str, Statistics]:
    """The :class:`Statistics` of every op in ``found``, from one pass over ``data`` (padding left out)."""
    sums = {h.name: Statistics(torch.zeros(h.kv_heads * (h.head_dim + h.v_dim), h.kv_heads * (h.head_dim + h.v_dim),
                                           dtype=torch.float64),
                               torch.zeros(h.q_heads, h.head_dim, h.head_dim, dtype=torch.float64)) for h in found}
    tokens = [0]

    def on_batch(_: int, values: dict[str, Tensor], batch: Batch) -> None:
        for h in found:
            mask = token_mask(batch, values[f"k:{h.name}"])
            kv = torch.cat([values[f"k:{h.name}"][mask], values[f"v:{h.name}"][mask]], dim=-1).double()
            sums[h.name].kv += kv.T @ kv
            q = values[f"q:{h.name}"][mask].double().view(-1, h.q_heads, h.head_dim)
            sums[h.name].queries += torch.einsum("nhd,nhe->hde", q, q)
        tokens[0] += int(token_mask(batch, values[f"k:{found[0].name}"]).sum())

    observe(gm, {f"{w}:{h.name}": getattr(h, w) for h in found for w in "kvq"}, data, on_batch,
            desc="latent-attention statistics")
    n = max(tokens[0], 1)
    return {name: Statistics(s.kv / n, s.queries / n) for name, s in sums.items()}


def weight_statistics(gm: fx.GraphModule, h: Heads) -> Statistics:
    """:class:`Statistics` as if the input were white noise: the weights' own second moments (X-EcoMLA's
    data-free SVD initialisation)."""
    k, v, q = (_stacked(gm, linear) for linear in (h.k, h.v, h.q))
    kv = torch.cat([k, v])
    queries = q.view(h.q_heads, h.head_dim, -1)
    return Statistics(kv @ kv.T, torch.einsum("hdi,hei->hde", queries, queries))


def _floored(measured: Statistics, weights: Statistics, floor: float = 1e-6) -> Statistics:
    """``measured`` plus a trace-relative ``floor`` of ``weights``: a direction the calibration tokens never
    reach (fewer tokens than dims) still ranks by its weight, so a full-size latent stays exact off them."""
    def add(a: Tensor, b: Tensor) -> Tensor:
        return a + floor * float(a.diagonal(dim1=-2, dim2=-1).sum()) / max(float(b.diagonal(dim1=-2, dim2=-1).sum()),
                                                                           1e-30) * b
    return Statistics(add(measured.kv, weights.kv), add(measured.queries, weights.queries))


def _stacked(gm: fx.GraphModule, linear: fx.Node) -> Tensor:
    """A linear's weight with its bias as one more input column (an input that is always 1)."""
    weight = attr_of(gm, linear_weight(linear).target).detach().double()
    bias = linear_bias(linear)
    column = attr_of(gm, bias.target).detach().double()[:, None] if bias is not None else \
        torch.zeros(len(weight), 1, dtype=torch.float64)
    return torch.cat([weight, column], dim=1)


def plan_latent(gm: fx.GraphModule, h: Heads, stats: Statistics, rope_dims: int, latent_dim: int) -> Latent:
    """The :class:`Latent` form of op ``h`` with a rotary key of ``rope_dims`` and a latent of ``latent_dim``."""
    d, dv, g = h.head_dim, h.v_dim, h.group
    nk = h.kv_heads * d
    rot, interleaved = _rotary(h)
    pairs = _pairs(rot, interleaved)
    query_metric = [stats.queries[i * g:(i + 1) * g].sum(0) for i in range(h.kv_heads)]

    # 1. principal complex components of each frequency across the heads, ranked over all frequencies
    components = []  # (weighted energy, pair index, scale (Hkv,), eigenvector (Hkv,))
    for j, (re, im) in enumerate(pairs):
        weights = torch.stack([q[re, re] + q[im, im] for q in query_metric])
        scale = weights.clamp_min(1e-12 * float(weights.mean()) + 1e-30).sqrt()
        hermitian = _complex(stats.kv, [i * d + re for i in range(h.kv_heads)], [i * d + im for i in range(h.kv_heads)])
        evals, evecs = torch.linalg.eigh(hermitian * scale[:, None] * scale[None, :])
        components += [(float(evals[l]), j, scale, evecs[:, l]) for l in range(h.kv_heads)]
    kept = sorted(components, key=lambda c: -c[0])[:rope_dims // 2]
    kept.sort(key=lambda c: c[1])  # by frequency: the rotary key's pairs in the source's order

    # 2. the rotary key r (Dr, as a map of the keys) and each KV head's position-free rest (a map of the keys)
    k_to_rope = torch.zeros(nk, 2 * len(kept), dtype=torch.float64)  # r = k·this, in rotate_half layout
    rest = torch.eye(nk, dtype=torch.float64)  # position-free keys = k·rest
    query_rope = []  # per kept component: (Hkv,) complex coefficient query heads of each group apply
    half = len(kept)
    for n, (_, j, scale, u) in enumerate(kept):
        re, im = pairs[j]
        coefficient = scale * u  # y = Σ_i coefficient_i · z_i
        back = u.conj() / scale  # z_i ⊇ y · back_i
        for i in range(h.kv_heads):
            src = torch.tensor([i * d + re, i * d + im])
            k_to_rope[src[:, None], torch.tensor([n, n + half])] = _multiply(complex(coefficient[i]))
            for i2 in range(h.kv_heads):  # remove y·back_i2 from head i2's pair: rest -= (k → y) · (y → z_i2)
                dst = torch.tensor([i2 * d + re, i2 * d + im])
                rest[src[:, None], dst] -= _multiply(complex(coefficient[i])) @ _multiply(complex(back[i2]))
        query_rope.append(u / scale)

    # 3. joint low-rank latent of [position-free keys, values], balanced, in the readers' metrics
    roots = [_root(q) for q in query_metric]
    columns = attr_of(gm, linear_weight(h.out).target).detach().double().view(-1, h.q_heads, dv)
    value_roots = [_root(_reader_metric(columns, h, i)) for i in range(h.kv_heads)]
    key_white = rest @ torch.block_diag(*(r[0] for r in roots))
    value_white = torch.block_diag(*(r[0] for r in value_roots))
    k_cov, v_cov = stats.kv[:nk, :nk], stats.kv[nk:, nk:]
    key_energy = float((key_white.T @ k_cov @ key_white).diagonal().sum())
    value_energy = float((value_white.T @ v_cov @ value_white).diagonal().sum())
    # Capped: with (almost) every key component rotating, the position-free keys are rounding noise,
    # which an uncapped balance would blow up to outrank the values.
    balance = min(max(math.sqrt(value_energy / max(key_energy, 1e-300)), 1e-3), 1e3)
    to_white = torch.block_diag(key_white * balance, value_white)  # [k, v] → balanced, whitened [rest, v]
    evals, evecs = torch.linalg.eigh(to_white.T @ stats.kv @ to_white)
    basis = evecs[:, -latent_dim:] if latent_dim else evecs[:, :0]
    kv_to_latent = to_white @ basis  # c = [k, v]·this
    # read back: rest_i ≈ c·(basisᵀ)_keys·(balance·L_i)⁻¹, v_i ≈ c·(basisᵀ)_values·Lv_i⁻¹
    key_back = basis[:nk].T @ torch.block_diag(*(r[1] for r in roots)) / balance  # (R, nk)
    value_back = basis[nk:].T @ torch.block_diag(*(r[1] for r in value_roots))  # (R, Hkv·dv)

    # 4. weights of the rewritten op
    kv_weights = torch.cat([_stacked(gm, h.k), _stacked(gm, h.v)])  # (nk + nv, hidden + 1)
    latent = kv_to_latent.T @ kv_weights
    rope_key = k_to_rope.T @ _stacked(gm, h.k)
    queries = _stacked(gm, h.q).view(h.q_heads, d, -1)
    query_latent, query_rot = [], []
    for head in range(h.q_heads):
        i = head // g
        query_latent.append(key_back[:, i * d:(i + 1) * d] @ queries[head])  # q_c = q·(key_back block)ᵀ
        rows = torch.zeros(2 * half, queries.shape[-1], dtype=torch.float64)
        for n, (_, j, _, _) in enumerate(kept):
            re, im = pairs[j]
            pair = _multiply(complex(query_rope[n][i])).T @ queries[head][[re, im]]
            rows[n], rows[n + half] = pair[0], pair[1]
        query_rot.append(rows)
    out = columns.new_empty(columns.shape[0], h.q_heads, latent_dim)
    for head in range(h.q_heads):
        i = head // g
        out[:, head] = columns[:, head] @ value_back[:, i * dv:(i + 1) * dv].T
    return Latent([kept_pair for _, kept_pair, _, _ in kept], _split(latent, h.k, h.v), _split(rope_key, h.k),
                  _split(torch.cat(query_latent), h.q), _split(torch.cat(query_rot), h.q), out.flatten(1))


def _split(stacked: Tensor, *sources: fx.Node) -> tuple[Tensor, Optional[Tensor]]:
    """(weight, bias) from a weight with its bias column; no bias where none of the source linears has one."""
    return stacked[:, :-1], (stacked[:, -1] if any(linear_bias(s) is not None for s in sources) else None)


def check_sizes(h: Heads, rope_dims: int, latent_dim: int) -> None:
    """Refuse sizes the op cannot have."""
    rot = _rotary(h)[0]
    if rope_dims % 2 or not 0 <= rope_dims <= h.kv_heads * rot:
        raise InputError(f"{h.name}: rope_dims must be even and at most {h.kv_heads * rot} (its {h.kv_heads} key "
                         f"heads × {rot} rotary dims), got {rope_dims}")
    full = h.kv_heads * (h.head_dim + h.v_dim)
    if not 0 < latent_dim <= full:
        raise InputError(f"{h.name}: latent_dim must be between 1 and {full}, got {latent_dim}")


def to_latent(gm: fx.GraphModule, data: list[Batch], rope_dims: int, latent_dim: int,
              method: LatentMethod = "activation",
              stats: Optional[dict[str, Statistics]] = None) -> fx.GraphModule:
    """A copy of ``gm`` whose every attention op is latent attention with a ``rope_dims`` rotary key and a
    ``latent_dim`` latent (the cache per token: ``rope_dims + latent_dim`` numbers per op), fitted on
    ``data`` (``method="activation"``) or on the weights alone (``"svd"``); ``stats``: those of
    :func:`fit_statistics`, when several sizes are tried."""
    found = find_heads(gm)
    for h in found:
        check_sizes(h, rope_dims, latent_dim)
    stats = stats if stats is not None else fit_statistics(gm, data, method)
    plans = {h.name: plan_latent(gm, h, stats[h.name], rope_dims, latent_dim) for h in found}
    graph = copy.deepcopy(gm.graph)
    work = fx.GraphModule(gm, graph)
    for h in find_heads(work):
        _rewrite(work, h, plans[h.name])
    graph.eliminate_dead_code()
    _refresh_values(work)
    result = fx.GraphModule(work, graph)
    verify(result)
    return result


def fit_statistics(gm: fx.GraphModule, data: list[Batch], method: LatentMethod = "activation") -> dict[str, Statistics]:
    """Per op, what the latent form is fitted to: calibration moments (floored by the weights') for
    ``"activation"``, the weights' own for ``"svd"``; ``InputError`` for an op latent attention cannot take."""
    found = find_heads(gm)
    if not found:
        raise InputError("the graph has no attention op whose heads can be rewritten")
    if method not in ("activation", "svd"):
        raise InputError(f"latent method must be 'activation' or 'svd', not {method!r}")
    for h in found:
        if (h.attention.args[6] if len(h.attention.args) > 6 else h.attention.kwargs.get("softcap")) is not None:
            raise InputError(f"{h.name}: its scores are soft-capped (Gemma 2), which latent attention does not do")
        if not (h.q.args[0] is h.k.args[0] is h.v.args[0]):
            raise InputError(f"{h.name}: its q, k and v projections read different inputs (cross-attention); "
                             "only self-attention can share one latent")
    stats = {h.name: weight_statistics(gm, h) for h in found}
    if method == "activation":
        stats = {name: _floored(s, stats[name]) for name, s in statistics(gm, found, data).items()}
    return stats


def rope_candidates(numbers: int, most: int) -> list[int]:
    """Rotary-key sizes worth trying for ``numbers`` cache numbers per token: 1/8 to 1/2 of them (even, at
    most ``most``, leaving a latent of at least 1)."""
    sizes = {min(2 * round(numbers * f / 2), most) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2)}
    return sorted(s for s in sizes if numbers - s >= 1)


def attention_module(h: Heads) -> str:
    """The module path that holds op ``h``'s output projection (``model.layers.3.self_attn``), or "" (the
    root) for a graph whose weights have no module path: the latent weights are stored there."""
    return linear_weight(h.out).target.rpartition(".")[0].rpartition(".")[0]


def _rewrite(gm: fx.GraphModule, h: Heads, plan: Latent) -> None:
    """Replace op ``h`` (its projections, RoPE and attention) by the latent form ``plan``, whose weights are
    stored as ``latent_*`` next to the source op's, in its attention module."""
    graph = gm.graph
    x = h.k.args[0]
    dtype = attr_of(gm, linear_weight(h.k).target).dtype
    old = h.attention
    scale = old.args[4] if len(old.args) > 4 else old.kwargs.get("scale")
    scale = scale if scale is not None else 1.0 / math.sqrt(h.head_dim)
    causal = old.args[5] if len(old.args) > 5 else old.kwargs.get("causal", False)
    mask = old.args[3] if len(old.args) > 3 else old.kwargs.get("mask")

    path = attention_module(h)
    owner = gm.get_submodule(path)
    prefix = f"{path}.latent_" if path else "latent_"

    def parameter(name: str, value: Optional[Tensor]) -> Optional[fx.Node]:
        if value is None:
            return None
        owner.register_parameter(f"latent_{name}", torch.nn.Parameter(value.to(dtype).contiguous(), requires_grad=False))
        return graph.get_attr(f"{prefix}{name}")

    def project(name: str, weights: tuple[Tensor, Optional[Tensor]], heads: int) -> fx.Node:
        """linear(x) as (B, heads, S, width)."""
        out = graph.call_function(aten.linear.default, (x, parameter(f"{name}_weight", weights[0]),
                                                         parameter(f"{name}_bias", weights[1])))
        split = graph.call_function(aten.unflatten.int, (out, -1, [heads, weights[0].shape[0] // heads]))
        return graph.call_function(aten.transpose.int, (split, 1, 2))

    with graph.inserting_before(old):
        latent = project("latent", plan.latent, 1)
        query = project("query_latent", plan.query_latent, h.q_heads)
        query_rope = project("query_rope", plan.query_rope, h.q_heads)
        key_rope = project("rope_key", plan.rope_key, 1)
        if plan.rope_pairs:
            rot, interleaved = _rotary(h)
            pairs = _pairs(rot, interleaved)
            index = torch.tensor([pairs[j][0] for j in plan.rope_pairs] + [pairs[j][1] for j in plan.rope_pairs])
            owner.register_buffer("latent_rope_index", index)
            index_node = graph.get_attr(f"{prefix}rope_index")
            cos, sin = (graph.call_function(aten.index_select.default, (t, -1, index_node)) for t in h.rope.args[2:4])
            roped = graph.call_function(OPS["rope"], (query_rope, key_rope, cos, sin))
            query_rope = graph.call_function(operator.getitem, (roped, 0))
            key_rope = graph.call_function(operator.getitem, (roped, 1))
        attention = graph.call_function(OPS["latent_attention"], (query, query_rope, latent, key_rope, mask, scale,
                                                                  causal))
        merged = graph.call_function(aten.flatten.using_ints, (graph.call_function(aten.transpose.int,
                                                                                   (attention, 1, 2)), 2))
    with graph.inserting_before(h.out):
        out = graph.call_function(aten.linear.default, (merged, parameter("output_weight", plan.output),
                                                        linear_bias(h.out)))
    h.out.replace_all_uses_with(out)


def latent_rotary_dims(h: Heads) -> int:
    """The rotary dims of each key head of op ``h`` (0 without RoPE)."""
    return _rotary(h)[0]


def latent_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The output projections :func:`to_latent` wrote, in graph order."""
    return [next(iter(node.users)) for node in gm.graph.nodes
            if node.op == "get_attr" and node.target.rpartition(".")[2] == "latent_output_weight"]


def refit_latent_outputs(original: fx.GraphModule, rewritten: fx.GraphModule, data: list[Batch],
                         ridge: Optional[float] = None) -> list[str]:
    """Refit each latent op's output projection (in place) to reproduce the original op's output on ``data``."""
    pairs = {h.name: (h.out, out) for h, out in zip(find_heads(original), latent_outputs(rewritten))}
    return refit_linears(original, rewritten, pairs, data, ridge)
