"""The residual stream of a fused graph: its branches (attention and MLP sublayers) and layers.

A transformer block adds branches to a residual stream: ``s' = s + f(s)``.
In a fused graph that add is an ``aten.add`` or the sum inside a fused
``fxfuse.add_rms_norm`` / ``fxfuse.add_layer_norm``. An add is a *residual
add* when one operand (the stream) is computed before the other (the branch)
and the branch is computed from it; the branch is an *attention* sublayer
when an ``fxfuse.attention`` lies between the two, an *MLP* sublayer when an
activation does. Nothing is read from module names, so any architecture the
fusion passes understand is understood here.

A *layer* is an attention branch followed by an MLP branch (a pre- or
post-norm block; parallel blocks, where both read the same stream value,
are layers too).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from fxfuse.ir.dialect import OPS
from fxfuse.passes.residual import residual_operands

_ADD_NORMS = {OPS["add_rms_norm"]: OPS["rms_norm"], OPS["add_layer_norm"]: OPS["layer_norm"]}
_ACTIVATIONS = {
    OPS["gated_mlp_act"], OPS["gelu"], torch.ops.aten.gelu.default, torch.ops.aten.relu.default,
    torch.ops.aten.silu.default, torch.ops.aten.tanh.default, torch.ops.aten.sigmoid.default,
}
# The meta key under which a branch's first name is kept on its add node.
BRANCH_TAG = "fxfuse_branch"
_LINEARS = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)


def linear_weight(linear: fx.Node) -> Optional[fx.Node]:
    """The stored weight (a ``get_attr`` node) an ``aten.linear`` node reads, or None (computed or absent)."""
    weight = linear.args[1] if len(linear.args) > 1 else None
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def linear_bias(linear: fx.Node) -> Optional[fx.Node]:
    """The bias node an ``aten.linear`` node reads, or None."""
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) else None


@dataclass
class Branch:
    """One sublayer: ``add`` sums the residual ``stream`` and the branch's ``output``.

    ``kind`` is "attention" or "mlp"; ``nodes`` are the branch's own nodes (those
    nothing else reads); ``parameters`` the attribute targets only they read;
    ``projection`` is the linear that produces ``output``, if one does.
    """

    index: int
    kind: str
    add: fx.Node
    stream: fx.Node
    output: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    projection: Optional[fx.Node] = None

    @property
    def name(self) -> str:
        """``kind[index]`` in the graph it was first found in (kept on the add node across removals)."""
        return self.add.meta.get(BRANCH_TAG) or f"{self.kind}[{self.index}]"


@dataclass
class Layer:
    """A transformer block: its attention branch and its MLP branch."""

    index: int
    attention: Branch
    mlp: Branch

    @property
    def branches(self) -> tuple[Branch, Branch]:
        return self.attention, self.mlp

    @property
    def name(self) -> str:
        """The names of its two branches, joined by "+"."""
        return f"{self.attention.name}+{self.mlp.name}"


def _source(node: fx.Node) -> fx.Node:
    """The node that computes ``node``: a multi-output op for a ``getitem`` of it."""
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0]
    return node


def _ancestors(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    """Nodes ``node`` is computed from, not walking past ``stop``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in stop:
            todo.extend(n.all_input_nodes)
    return seen


def _classify(stream: fx.Node, branch: fx.Node) -> Optional[tuple[str, set[fx.Node]]]:
    """The kind of the branch from ``stream`` to ``branch`` and the nodes between them, or None."""
    start = _source(stream)
    above = _ancestors(branch, {start})
    if start not in above:
        return None
    inner: set[fx.Node] = set()
    todo = list(start.users)
    while todo:
        n = todo.pop()
        if n in above and n not in inner:
            inner.add(n)
            todo.extend(n.users)
    targets = {n.target for n in inner if n.op == "call_function"}
    if OPS["attention"] in targets:
        return "attention", inner
    if targets & _ACTIVATIONS:
        return "mlp", inner
    return None


def find_branches(graph: fx.Graph) -> list[Branch]:
    """Every residual branch of ``graph``, in graph order."""
    branches: list[Branch] = []
    for node in graph.nodes:
        if node.op != "call_function" or not (node.target in _ADD_NORMS or residual_operands(node)):
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for stream, output in ((a, b), (b, a)):
            found = _classify(stream, output)
            if found is None:
                continue
            kind, inner = found
            own = _own_nodes(output, inner)
            branches.append(Branch(
                index=sum(br.kind == kind for br in branches), kind=kind, add=node, stream=stream, output=output,
                nodes=own,
                parameters=sorted({str(p.target) for n in own for p in n.all_input_nodes
                                   if p.op == "get_attr" and all(u in own for u in p.users)}),
                projection=output if output.target in _LINEARS else None,
            ))
            break
    return branches


def _own_nodes(output: fx.Node, inner: set[fx.Node]) -> list[fx.Node]:
    """The nodes of ``inner`` that only the branch reads (shared masks and rotary tables excluded)."""
    own: set[fx.Node] = {output}
    for n in reversed(output.graph.nodes):  # a node's users come after it: one backward pass settles it
        if n in inner and n.users and all(u in own for u in n.users):
            own.add(n)
    return [n for n in output.graph.nodes if n in own]


def tag_branches(branches: list[Branch]) -> None:
    """Keep each branch's name on its add node, so copies of the graph know it after other removals."""
    for branch in branches:
        branch.add.meta[BRANCH_TAG] = branch.name


def find_layers(branches: list[Branch]) -> list[Layer]:
    """The layers: each attention branch with the MLP branch that follows it."""
    layers: list[Layer] = []
    pending: Optional[Branch] = None
    for branch in branches:
        if branch.kind == "attention":
            pending = branch
        elif pending is not None:
            layers.append(Layer(len(layers), pending, branch))
            pending = None
    return layers


