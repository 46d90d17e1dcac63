"""merge-projections: linears that read the same input → one linear on concatenated weights.

    y₁ = linear(x, W₁, b₁) … yₙ = linear(x, Wₙ, bₙ)          (n ≥ 2, the same x)
  → y = linear(x, [W₁; …; Wₙ], [b₁; …; bₙ]);  y₁ … yₙ = split_with_sizes(y, [o₁ … oₙ], -1)

The Q, K and V projections of an attention layer become one GEMM, the gate
and up projections of a gated MLP another. The weights are concatenated once,
here, and registered on the graph module as a new parameter
(``<common path>_<distinct names>_<weight|bias>``, e.g.
``layers_0_self_attn_q_k_v_proj_weight``) read by a ``get_attr`` node; no
``cat`` runs per call. A weight or bias that no node reads any more is
deleted from its module (with the unused ``get_attr`` aliases export leaves
for tied weights), so the merged module does not hold it twice. A weight or
bias that anything outside its projection reads (a tied or shared weight,
DeBERTa's key projection applied to both hidden states and relative
positions) would then be stored twice, so its projection is silently left out.

Projections are grouped by input node, weight dtype, device and in-features.
Every weight must be a 2-D ``get_attr`` tensor and every bias a ``get_attr``
tensor or absent; where some members have a bias and others not, the missing
biases are zero-filled (adding 0 is exact). A linear whose weight or bias is
computed, or whose output is ``view``-ed in a way a slice of a wider output
cannot be (its last dim merged with another), stays as it is; that is reported
as a rejection when the linear has siblings it could have joined. Only
``aten.linear`` is merged (GPT-2's Conv1D ``addmm`` already computes QKV at once).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fxfuse.ir.meta import attr_of, fake_mode_of, tensor, val
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.manager import PassResult, Rejection
from fxfuse.passes.rules import module_path

aten = torch.ops.aten
# Ops whose result shares the projection's memory, strides included: a view among them may
# be invalid on a slice of a wider output (it may merge the sliced last dim with another).
_VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.alias.default, aten.detach.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.slice.Tensor, aten.select.int, aten.expand.default,
}


@dataclass
class _Projection:
    """One ``aten.linear`` with constant weight (and bias)."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    w: torch.Tensor
    b: torch.Tensor | None

    @property
    def key(self) -> tuple[fx.Node, fx.Node | None]:
        return self.weight, self.bias


def _constant(gm: fx.GraphModule, arg: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None for anything else."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = attr_of(gm, arg.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _slices_fit(node: fx.Node, mode: FakeTensorMode) -> bool:
    """Whether the views of ``node``'s output (through other views) stay valid on a last-dim slice."""
    out = tensor(node)
    if out is None or out.dim() == 0:
        return True
    with mode:
        wider = torch.empty(*out.shape[:-1], out.shape[-1] + 1, dtype=out.dtype, device=out.device)
    fakes: dict[fx.Node, torch.Tensor] = {node: wider[..., : out.shape[-1]]}
    pending = [node]
    while pending:
        for user in pending.pop().users:
            if user.target is aten.as_strided.default:
                return False
            if user.target not in _VIEWS or user in fakes:
                continue
            args = fx.node.map_arg(user.args, lambda a: fakes.get(a, val(a)))
            kwargs = fx.node.map_arg(user.kwargs, lambda a: fakes.get(a, val(a)))
            try:
                with mode:
                    fakes[user] = user.target(*args, **kwargs)
            except Exception:
                return False
            pending.append(user)
    return True


def _projection(gm: fx.GraphModule, node: fx.Node, mode: FakeTensorMode) -> _Projection | str:
    """The projection ``node`` computes, or why it cannot join a merge."""
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    w = _constant(gm, weight)
    if w is None or w.dim() != 2:
        return f"its weight {getattr(weight, 'name', weight)} is computed, not a 2-D parameter"
    b = None if bias is None else _constant(gm, bias)
    if bias is not None and (b is None or b.shape != (w.shape[0],) or b.dtype != w.dtype or b.device != w.device):
        return f"its bias {getattr(bias, 'name', bias)} is computed or does not fit its weight"
    if not _slices_fit(node, mode):
        return "a view of its output would not be valid on a slice of a merged output"
    return _Projection(node, weight, bias, w, b)


def _merged_name(gm: fx.GraphModule, targets: list[str], kind: str) -> str:
    """``<common path>_<distinct parts>_<kind>``, e.g. ``layers_0_mlp_gate_up_proj_weight``, made unique."""
    paths = [t.split(".") for t in targets]
    if all(len(p) > 1 and p[-1] == paths[0][-1] for p in paths):
        paths = [p[:-1] for p in paths]
    common = 0
    while all(len(p) > common + 1 and p[common] == paths[0][common] for p in paths):
        common += 1
    stems = ["_".join(p[common:]) for p in paths]
    suffix = stems[0]
    for stem in stems[1:]:
        while not stem.endswith(suffix):
            suffix = suffix[1:]
    suffix = suffix[suffix.find("_"):] if "_" in suffix else ""
    parts = [s[: len(s) - len(suffix)] or s for s in stems]
    base = "_".join([*paths[0][:common], "_".join(parts) + suffix, kind])
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _register(gm: fx.GraphModule, mode: FakeTensorMode, anchor: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    """A new parameter ``name`` of ``gm`` and a ``get_attr`` node for it, placed before ``anchor``."""
    gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(name)
    node.meta["val"] = mode.from_tensor(getattr(gm, name), static_shapes=True)
    return node


def _merge(gm: fx.GraphModule, mode: FakeTensorMode, group: list[_Projection]) -> None:
    """Replace the projections of ``group`` (in graph order) by one linear and a split."""
    first = group[0].node
    parts = list({p.key: p for p in group}.values())
    with torch.no_grad():
        weight = torch.cat([p.w.detach() for p in parts])
        bias = None
        if any(p.b is not None for p in parts):
            bias = torch.cat([p.w.new_zeros(p.w.shape[0]) if p.b is None else p.b.detach() for p in parts])
    w_node = _register(gm, mode, first, _merged_name(gm, [p.weight.target for p in parts], "weight"), weight)
    args: list[fx.Node] = [first.args[0], w_node]
    if bias is not None:
        args.append(_register(gm, mode, first, _merged_name(gm, [p.weight.target for p in parts], "bias"), bias))
    b = Builder(gm.graph, mode, first)
    merged = b.call(aten.linear.default, *args)
    pieces = b.call(aten.split_with_sizes.default, merged, [p.w.shape[0] for p in parts], -1)
    slices = {p.key: b.item(pieces, i) for i, p in enumerate(parts)}
    for p in group:
        p.node.replace_all_uses_with(slices[p.key])
        gm.graph.erase_node(p.node)


def _drop_unread(gm: fx.GraphModule, attrs: list[fx.Node]) -> None:
    """Erase ``get_attr`` nodes nothing uses, then delete the attributes no node reads any more."""
    for node in dict.fromkeys(attrs):
        if not node.users and not getattr(node, "_erased", False):
            gm.graph.erase_node(node)
    read = [n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
    for target in dict.fromkeys(n.target for n in attrs):
        if any(target == r or target.startswith(r + ".") for r in read):
            continue
        owner, _, name = target.rpartition(".")
        delattr(attr_of(gm, owner) if owner else gm, name)


def _attr_nodes(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """The ``get_attr`` nodes of each tensor, by tensor identity (tied weights have several)."""
    nodes: dict[int, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.find_nodes(op="get_attr"):
        value = _constant(gm, node)
        if value is not None:
            nodes[id(value)].append(node)
    return nodes


def _owned(p: _Projection, group: list[_Projection], attrs: dict[int, list[fx.Node]]) -> bool:
    """Whether only ``p`` (and identical linears of its group) read its weight and bias."""
    same = {q.node for q in group if q.key == p.key}
    return all({u for n in attrs[id(t)] for u in n.users} <= same for t in (p.w, p.b) if t is not None)


def merge_projections(gm: fx.GraphModule) -> PassResult:
    """Merge the linears that read the same input into one linear per group."""
    mode = fake_mode_of(gm)
    result = PassResult(name="merge-projections")
    linears = [
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target is aten.linear.default and n.users and tensor(n.args[0]) is not None
    ]
    readers: dict[fx.Node, int] = defaultdict(int)
    for node in linears:
        readers[node.args[0]] += 1
    groups: dict[tuple, list[_Projection]] = defaultdict(list)
    for node in linears:
        if readers[node.args[0]] < 2:
            continue
        p = _projection(gm, node, mode)
        if isinstance(p, str):
            result.rejections.append(Rejection("merge_projections", node.name, p, module_path(node)))
            continue
        groups[(node.args[0], p.w.dtype, p.w.device, p.w.shape[1])].append(p)
    attrs = _attr_nodes(gm)
    old: list[fx.Node] = []
    for group in groups.values():
        group = [p for p in group if _owned(p, group, attrs)]
        if len({p.key for p in group}) < 2:
            continue
        _merge(gm, mode, group)
        old += [n for p in group for t in (p.w, p.b) if t is not None for n in attrs[id(t)]]
        result.rewrites[f"group_of_{len(group)}"] += 1
    _drop_unread(gm, old)
    result.changed = bool(old)
    return result
