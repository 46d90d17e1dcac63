"""prune-heads: remove attention heads from a fused graph, score them, refit the output projection.

The heads of an ``fxfuse.attention`` op are found from the graph alone: its
q, k and v inputs are walked back through views, permutes and
``fxfuse.rope`` to the linears that produce them, and its output forward
through the merging views to the linear that reads it (the output
projection). Query head h owns rows ``h·D .. (h+1)·D`` of the q projection
and columns ``h·Dv .. (h+1)·Dv`` of the output projection; with grouped-query
attention, query head h reads key/value head ``h // G``. Pruning slices those
weights (and biases) and any literal head count in the views, so the graph
stays an ordinary fused graph, verified and lowered like any other.

Grouped-query attention maps query head h to group ``h // G``, so every kept
group must keep the same number of query heads; a group that keeps none is
removed with its key/value head (a smaller KV cache).

Scores (low = remove first): ``"activation"``, the mean squared norm of a
head's contribution to the residual stream (its output times its columns of
the output projection); ``"gradient"``, Michel et al.'s expected
\\|∂L/∂gate\\| of a gate on the head's output, for language models, with L the
next-token loss; ``"loss"``, the quality loss of removing the head alone
(its output-projection columns zeroed: exact), measured like the held-out
quality on a few calibration batches, one forward pass per head;
``"greedy"``, the same loss re-measured after each removal with the removed
heads silenced (one forward pass per remaining head per removal). Scores
from activations and gradients are divided by their op's mean (Michel et al.
normalize per layer). Repair refits each pruned op's output projection by ridge
least squares so that the kept heads reproduce the original op's output on
the calibration tokens (:func:`refit_outputs`).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor
from tqdm.auto import tqdm

from fxfuse.compress.calibrate import Batch, observe, token_mask
from fxfuse.compress.quality import Judge, is_language_model, token_nll
from fxfuse.compress.repair import cross_validated_ridge, set_tensor, solve_ridge
from fxfuse.compress.structure import linear_bias, linear_weight
from fxfuse.errors import InputError
from fxfuse.ir.dialect import OPS
from fxfuse.ir.meta import attr_of, fake_mode_of, propagate
from fxfuse.ir.verify import verify

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_LAYOUT = {aten.permute.default, aten.transpose.int, aten.contiguous.default, aten.clone.default,
           aten.alias.default, *_VIEWS}


class Unprunable(InputError):
    """An attention op whose heads cannot be sliced; the message names the node and why."""


@dataclass
class Heads:
    """The heads of one attention op and the linears around them."""

    name: str
    attention: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    views: dict[str, list[fx.Node]]
    q_heads: int
    kv_heads: int
    head_dim: int
    v_dim: int
    rope: Optional[fx.Node] = None  # the ``fxfuse.rope`` op on the key path, if any

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.q_heads // self.kv_heads


def _producer(attention: fx.Node, node: fx.Node, what: str) -> tuple[fx.Node, list[fx.Node], Optional[fx.Node]]:
    """The linear that computes ``node`` (an attention input), the views between them, and the rope op
    on the way (None if there is none)."""
    views: list[fx.Node] = []
    rope = None
    n = node
    while True:
        if n.op == "call_function" and n.target is operator.getitem and n.args[0].target is OPS["rope"]:
            rope = n.args[0]
            n = rope.args[n.args[1]]
        elif n.op == "call_function" and n.target in _LAYOUT:
            if len(n.users) != 1:
                raise Unprunable(f"{attention.name}: the {what} view {n.name} has other readers")
            views.append(n)
            n = n.args[0]
        elif n.op == "call_function" and n.target is aten.linear.default and linear_weight(n) is not None:
            if len(n.users) != 1:
                raise Unprunable(f"{attention.name}: the {what} projection {n.name} has other readers")
            return n, views, rope
        else:
            raise Unprunable(f"{attention.name}: its {what} input is computed by {n.name} ({n.target}), "
                             "not by a linear through views (a fused qkv projection or a norm over heads)")


def _consumer(attention: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The linear that reads the attention output (the output projection) and the views between them."""
    views: list[fx.Node] = []
    n = attention
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise Unprunable(f"{attention.name}: its output {n.name} has {len(users)} readers, not one projection")
        user = users[0]
        if user.op == "call_function" and user.target in _LAYOUT:
            views.append(user)
            n = user
        elif user.op == "call_function" and user.target is aten.linear.default and user.args[0] is n \
                and linear_weight(user) is not None:
            return user, views
        else:
            raise Unprunable(f"{attention.name}: its output is read by {user.name} ({user.target}), "
                             "not by a linear through views")


def find_heads(gm: fx.GraphModule) -> list[Heads]:
    """Every attention op of ``gm`` whose heads can be sliced, in graph order; :class:`Unprunable` otherwise."""
    found: list[Heads] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not OPS["attention"]:
            continue
        q_val, k_val, v_val = (a.meta["val"] for a in node.args[:3])
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("mask")
        if isinstance(mask, fx.Node) and mask.meta["val"].dim() == 4 and mask.meta["val"].shape[1] != 1:
            raise Unprunable(f"{node.name}: its mask differs per head (ALiBi or a head bias)")
        if (node.args[7] if len(node.args) > 7 else node.kwargs.get("sinks")) is not None:
            raise Unprunable(f"{node.name}: it has per-head attention sinks")
        views = {}
        q, views["q"], _ = _producer(node, node.args[0], "query")
        k, views["k"], rope = _producer(node, node.args[1], "key")
        v, views["v"], _ = _producer(node, node.args[2], "value")
        out, views["out"] = _consumer(node)
        found.append(Heads(f"heads[{len(found)}]", node, q, k, v, out, views, int(q_val.shape[1]),
                           int(k_val.shape[1]), int(q_val.shape[-1]), int(v_val.shape[-1]), rope))
    return found


def check_keep(heads: Heads, keep: list[int]) -> list[int]:
    """The kept key/value groups for keeping query heads ``keep``; ``InputError`` when GQA cannot express it."""
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= heads.q_heads:
        raise InputError(f"{heads.name}: keep 1 to {heads.q_heads} of its query heads, got {keep}")
    per_group: dict[int, int] = {}
    for h in keep:
        per_group[h // heads.group] = per_group.get(h // heads.group, 0) + 1
    if len(set(per_group.values())) != 1:
        raise InputError(f"{heads.name}: grouped-query attention needs the same number of query heads kept in "
                         f"every kept group (groups of {heads.group}); keeping {keep} gives {per_group}")
    return sorted(per_group)


def prune_heads(gm: fx.GraphModule, keep: dict[str, list[int]]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing the weights it does not slice) keeping, per :class:`Heads` name in
    ``keep``, those query heads (and the key/value heads their groups read)."""
    graph = copy.deepcopy(gm.graph)
    work = fx.GraphModule(gm, graph)  # its own module tree: sliced weights replace tensors there only
    by_name = {h.name: h for h in find_heads(work)}
    unknown = set(keep) - set(by_name)
    if unknown:
        raise InputError(f"no attention op named {sorted(unknown)}; this graph has {sorted(by_name)}")
    for name, kept in keep.items():
        heads = by_name[name]
        groups = check_keep(heads, kept)
        kept = sorted(set(kept))
        if len(kept) == heads.q_heads:
            continue
        q_rows = _blocks(kept, heads.head_dim)
        kv_rows, v_rows = _blocks(groups, heads.head_dim), _blocks(groups, heads.v_dim)
        _slice_linear(work, heads.q, q_rows)
        _slice_linear(work, heads.k, kv_rows)
        _slice_linear(work, heads.v, v_rows)
        weight = linear_weight(heads.out)
        set_tensor(work, weight.target, attr_of(work, weight.target)[:, _blocks(kept, heads.v_dim)].contiguous())
        weight.meta.pop("val", None)
        _resize_views(heads.views["q"], heads.q_heads, len(kept), heads.head_dim)
        _resize_views(heads.views["k"], heads.kv_heads, len(groups), heads.head_dim)
        _resize_views(heads.views["v"], heads.kv_heads, len(groups), heads.v_dim)
        _resize_views(heads.views["out"], heads.q_heads, len(kept), heads.v_dim)
    _refresh_values(work)
    result = fx.GraphModule(work, graph)
    verify(result)
    return result


def _blocks(indices: list[int], size: int) -> Tensor:
    return torch.cat([torch.arange(i * size, (i + 1) * size) for i in indices])


def _slice_linear(gm: fx.GraphModule, linear: fx.Node, rows: Tensor) -> None:
    for node in (linear_weight(linear), linear_bias(linear)):
        if node is None:
            continue
        if node.op != "get_attr":
            raise Unprunable(f"{linear.name}: its bias {node.name} is computed, not stored")
        set_tensor(gm, node.target, attr_of(gm, node.target)[rows].contiguous())
        node.meta.pop("val", None)


def _resize_views(views: list[fx.Node], old: int, new: int, dim: int) -> None:
    """A literal head count in a view's size (``old`` next to the head dim ``dim``, or the width ``old·dim``
    last) becomes ``new`` (``new·dim``); -1 and symbolic sizes are left as they are."""
    for view in views:
        if view.target not in _VIEWS:
            continue
        sizes = list(view.args[1])
        if len(sizes) >= 2 and sizes[-2] == old and sizes[-1] == dim and isinstance(sizes[-2], int):
            sizes[-2] = new
        elif sizes and isinstance(sizes[-1], int) and sizes[-1] == old * dim:
            sizes[-1] = new * dim
        view.args = (view.args[0], sizes, *view.args[2:])


def _refresh_values(gm: fx.GraphModule) -> None:
    """Recompute every fake value after slicing (the shapes downstream of a sliced weight changed)."""
    mode = fake_mode_of(gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "val" not in node.meta:
            node.meta["val"] = mode.from_tensor(attr_of(gm, node.target), static_shapes=True)
        elif node.op == "call_function":
            propagate(node, mode)


def head_scores(gm: fx.GraphModule, heads: list[Heads], data: list[Batch], scorer: str,
                judge: Optional[Judge] = None, greedy: int = 0) -> dict[str, Tensor]:
    """Per :class:`Heads` name, a (q_heads,) score, low = remove first: "activation" or "gradient" (divided by
    the op's mean: Michel et al. normalize per layer), or "loss": the quality loss ``judge`` measures with
    the head's output-projection columns zeroed (its exact removal, one head at a time); "greedy": the
    first ``greedy`` removals chosen one by one, each loss measured with the earlier ones removed."""
    if scorer in ("loss", "greedy"):
        if judge is None:
            raise InputError(f"the {scorer} head scorer needs a Judge of the calibration batches")
        return _loss_scores(gm, heads, judge, greedy)
    if scorer == "activation":
        raw = _activation_scores(gm, heads, data)
    elif scorer == "gradient":
        raw = _gradient_scores(gm, heads, data)
    else:
        raise InputError(f"head scorer must be 'loss', 'greedy', 'activation' or 'gradient', not {scorer!r}")
    return {name: s / s.mean().clamp_min(1e-30) for name, s in raw.items()}


def _loss_scores(gm: fx.GraphModule, heads: list[Heads], judge: Judge, greedy: int = 0) -> dict[str, Tensor]:
    """Each head's exact-removal loss; with ``greedy`` = k, the first k removals are chosen one at a time,
    each measured with the heads chosen before it already removed, and get scores below every other."""
    trial = fx.GraphModule(gm, gm.graph)  # its own module tree over the same graph and tensors
    weights = {h.name: attr_of(gm, linear_weight(h.out).target).detach().clone() for h in heads}
    chosen: list[tuple[str, int]] = []
    losses: dict[tuple[str, int], float] = {}
    for _ in tqdm(range(max(greedy, 1)), desc="head removal losses", leave=False, disable=None):
        for h in heads:
            target = linear_weight(h.out).target
            alive = [i for i in range(h.q_heads) if (h.name, i) not in chosen]
            for head in alive if len(alive) > 1 or not greedy else []:
                silenced = weights[h.name].clone()
                silenced[:, head * h.v_dim:(head + 1) * h.v_dim] = 0
                set_tensor(trial, target, silenced)
                losses[(h.name, head)] = judge.measure(trial).loss_against(judge.original)
            set_tensor(trial, target, weights[h.name])
        if not greedy:
            break
        alive_count = {h.name: h.q_heads - sum(name == h.name for name, _ in chosen) for h in heads}
        candidates = [key for key in losses if key not in chosen and alive_count[key[0]] > 1]
        if not candidates:
            break
        name, head = min(candidates, key=losses.__getitem__)
        chosen.append((name, head))
        v_dim = next(h.v_dim for h in heads if h.name == name)
        weights[name][:, head * v_dim:(head + 1) * v_dim] = 0
    floor = min(losses.values()) - len(chosen) - 1.0
    scores = {h.name: torch.tensor([losses[(h.name, i)] for i in range(h.q_heads)], dtype=torch.float64)
              for h in heads}
    for rank, (name, head) in enumerate(chosen):  # in the order chosen, below every measured loss
        scores[name][head] = floor + rank
    return scores


def _activation_scores(gm: fx.GraphModule, heads: list[Heads], data: list[Batch]) -> dict[str, Tensor]:
    sums = {h.name: torch.zeros(h.q_heads, dtype=torch.float64) for h in heads}
    tokens = [0]
    weights = {h.name: attr_of(gm, linear_weight(h.out).target).detach() for h in heads}

    def on_batch(_: int, values: dict[str, Tensor], batch: Batch) -> None:
        for h in heads:
            o = values[h.name]  # (B, H, S, Dv)
            mask = token_mask(batch, o.transpose(1, 2).flatten(2)).unsqueeze(1).unsqueeze(-1)
            w = weights[h.name].view(weights[h.name].shape[0], h.q_heads, h.v_dim)  # (hidden, H, Dv)
            contribution = torch.einsum("bhsd,ohd->bhso", o * mask, w)
            sums[h.name] += contribution.double().square().sum(dim=(0, 2, 3))
        tokens[0] += int(token_mask(batch, values[heads[0].name].transpose(1, 2).flatten(2)).sum())

    observe(gm, {h.name: h.attention for h in heads}, data, on_batch, desc="head activations")
    return {name: s / max(tokens[0], 1) for name, s in sums.items()}


def _gradient_scores(gm: fx.GraphModule, heads: list[Heads], data: list[Batch]) -> dict[str, Tensor]:
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    gates: dict[str, Tensor] = {}

    def gate(name: str, out: Tensor) -> Tensor:
        gates[name] = torch.ones(out.shape[0], out.shape[1], 1, 1, dtype=out.dtype, requires_grad=True)
        return out * gates[name]

    for h in heads:
        node = by_name[h.attention.name]
        with graph.inserting_after(node):
            gated = graph.call_function(gate, (h.name, node))
        node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
    runner = fx.GraphModule(gm, graph)
    sums = {h.name: torch.zeros(h.q_heads, dtype=torch.float64) for h in heads}
    rows = 0
    for batch in data:
        output = runner(**batch)
        if not is_language_model(output, batch):
            raise InputError("the gradient head scorer needs a language model (logits and input_ids); "
                             "use scorer='activation'")
        # autograd.grad, not backward(): only the gates' gradients, nothing accumulated on the weights
        nll = token_nll(output, batch)
        grads = torch.autograd.grad(nll.sum() / max(nll.numel(), 1), [gates[h.name] for h in heads])
        for h, grad in zip(heads, grads):
            sums[h.name] += grad.double().abs().sum(dim=(0, 2, 3))
        rows += batch["input_ids"].shape[0]
    return {name: s / max(rows, 1) for name, s in sums.items()}


def refit_outputs(original: fx.GraphModule, pruned: fx.GraphModule, names: list[str], data: list[Batch],
                  ridge: Optional[float] = None) -> list[str]:
    """Refit the output projections of ops ``names`` in ``pruned`` (in place) so that each op's kept heads
    reproduce the original op's projected output on ``data`` (:func:`refit_linears`)."""
    before = {h.name: h for h in find_heads(original)}
    after = {h.name: h for h in find_heads(pruned)}
    return refit_linears(original, pruned, {n: (before[n].out, after[n].out) for n in names}, data, ridge)


def refit_linears(original: fx.GraphModule, changed: fx.GraphModule, pairs: dict[str, tuple[fx.Node, fx.Node]],
                  data: list[Batch], ridge: Optional[float] = None) -> list[str]:
    """For each name → (a node of ``original``, a linear of ``changed``), refit the linear's weight (in place)
    so that its output reproduces the original node's value on ``data``: W ← W + Δᵀ (and the bias, where
    there is one, by the intercept of the fit), Δ the ridge least-squares fit of the shortfall on the changed
    model's own inputs to the linear (all fitted from one pass per model); returns one note per linear.
    ``ridge`` (relative λ) defaults to the best on left-out batches."""
    names = list(pairs)
    folds: dict[str, list[tuple[Tensor, Tensor, float]]] = {name: [] for name in names}
    linears = {}
    for name in names:
        weight, bias = linear_weight(pairs[name][1]), linear_bias(pairs[name][1])
        linears[name] = (attr_of(changed, weight.target).detach().double(),
                         attr_of(changed, bias.target).detach().double() if bias is not None else None)
    for batch in data:
        targets: dict[str, Tensor] = {}
        observe(original, {n: pairs[n][0] for n in names}, [batch], lambda i, v, b: targets.update(v),
                desc="refit: original")

        def accumulate(_: int, values: dict[str, Tensor], batch: Batch) -> None:
            for name in names:
                mask = token_mask(batch, values[name])
                z = values[name][mask].double()
                weight, bias = linears[name]
                residual = targets[name][mask].double() - z @ weight.T - (bias if bias is not None else 0)
                if bias is not None:  # fit the bias too: it takes the mean of what the removed heads added
                    z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
                folds[name].append((z.T @ z, z.T @ residual, float((residual * residual).sum())))

        observe(changed, {n: pairs[n][1].args[0] for n in names}, [batch], accumulate, desc="refit: changed")
    notes = []
    for name in names:
        chosen_ridge, chosen = ridge, f"λ={ridge:g}" if ridge is not None else ""
        if ridge is None:
            chosen_ridge, gain = cross_validated_ridge(folds[name])
            if chosen_ridge is None:
                notes.append(f"{name}: no refit (no ridge λ beat none on held-out batches)")
                continue
            chosen = f"λ={chosen_ridge:g}, held-out error ×{gain:.3f}"
        delta = solve_ridge(sum(f[0] for f in folds[name]), sum(f[1] for f in folds[name]), chosen_ridge)
        weight, bias = linears[name]
        linear = pairs[name][1]
        target = linear_weight(linear).target
        set_tensor(changed, target, (weight + delta[:weight.shape[1]].T).to(attr_of(changed, target).dtype))
        if bias is not None:
            bias_target = linear_bias(linear).target
            set_tensor(changed, bias_target, (bias + delta[-1]).to(attr_of(changed, bias_target).dtype))
        notes.append(f"{name}: refit {target}{' and its bias' if bias is not None else ''} ({chosen})")
    return notes


def removal_units(heads: Heads, scores: Tensor, tp_degree: int = 1) -> list[tuple[float, list[int]]]:
    """The op's removals in the order they should happen, each (mean score, query heads removed).

    Multi-head attention removes ``tp_degree`` heads at a time (one at a time
    without tensor parallelism) and keeps as many; grouped-query attention
    removes one head from every group at a time (its lowest-scoring one),
    keeping the groups uniform and at least one head each, so the head count
    stays a multiple of the KV-head count (and of ``tp_degree`` when that is).
    """
    normalized = scores.double()
    if heads.group == 1:
        order = sorted(range(heads.q_heads), key=lambda h: float(normalized[h]))[:heads.q_heads - tp_degree]
        chunks = [order[i:i + tp_degree] for i in range(0, len(order) - tp_degree + 1, tp_degree)]
        return [(float(normalized[c].mean()), c) for c in chunks]
    ranked = [sorted(range(g * heads.group, (g + 1) * heads.group), key=lambda h: float(normalized[h]))
              for g in range(heads.kv_heads)]
    units = []
    for step in range(heads.group - 1):
        removed = [group[step] for group in ranked]
        units.append((float(normalized[removed].mean()), removed))
    return units


def check_tp_degree(found: list[Heads], tp_degree: int) -> None:
    """Refuse a tensor-parallel degree the graph's heads cannot be split into (query and KV heads per op)."""
    if not isinstance(tp_degree, int) or tp_degree < 1:
        raise InputError(f"tp_degree must be a positive whole number, got {tp_degree!r}")
    for h in found:
        if h.q_heads % tp_degree or h.kv_heads % tp_degree:
            raise InputError(f"{h.name} has {h.q_heads} query and {h.kv_heads} key/value heads, which do not split "
                             f"evenly over tp_degree={tp_degree}; the model itself cannot be sharded that way")


def choose_heads(found: list[Heads], scores: dict[str, Tensor], count: int,
                 uniform: bool = False, tp_degree: int = 1) -> dict[str, list[int]]:
    """Query heads to keep per op so that at least ``count`` are removed, lowest scores first;
    ``uniform``: the same number from every op (what a config with one head count can express), the
    multiple of one unit per op nearest to ``count``; ``tp_degree``: every op keeps query and KV head
    counts divisible by it (checked on the result too)."""
    check_tp_degree(found, tp_degree)
    units = {h.name: removal_units(h, scores[h.name], tp_degree) for h in found}
    taken = dict.fromkeys(units, 0)
    removed = 0
    if uniform:  # whole rounds of one unit from every op: the number of rounds nearest to ``count``
        per_round = sum(len(u[0][1]) for u in units.values() if u)
        rounds = round(count / per_round) if per_round else 0
        if rounds == 0 or any(len(u) < rounds for u in units.values()):
            raise InputError(f"uniform=True removes heads in rounds of {per_round} (one unit from every op); "
                             f"{count} is not near a feasible number of rounds; ask for a multiple of {per_round}")
        for name in units:
            taken[name] = rounds
            removed += sum(len(unit) for _, unit in units[name][:rounds])
    else:
        while removed < count:
            open_ops = [n for n in units if taken[n] < len(units[n])]
            if not open_ops:
                break
            name = min(open_ops, key=lambda n: units[n][taken[n]][0])
            removed += len(units[name][taken[name]][1])
            taken[name] += 1
    if removed < count and not uniform:
        raise InputError(f"only {removed} query heads can be removed (keeping every op and group at least one), "
                         f"fewer than the {count} asked for")
    keep = {}
    for h in found:
        gone = {i for _, unit in units[h.name][:taken[h.name]] for i in unit}
        keep[h.name] = [i for i in range(h.q_heads) if i not in gone]
        if len(keep[h.name]) % tp_degree:
            raise InputError(f"{h.name} would keep {len(keep[h.name])} query heads, not divisible by "
                             f"tp_degree={tp_degree}")
    return keep
