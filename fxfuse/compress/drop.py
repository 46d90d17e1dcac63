"""drop-branches: remove attention or MLP sublayers (or whole layers) from a fused graph.

Removing branch f from ``s' = s + f(s)`` leaves ``s' = s``:

* an ``aten.add`` is replaced by its stream operand;
* a fused ``add_rms_norm(a, b, w, eps)`` / ``add_layer_norm(a, b, w, bias, eps)``
  becomes the plain norm of the stream operand, whose sum output is the stream.

The branch's own nodes are then dead and erased; a fused add-norm whose
normalized output nothing reads any more becomes a plain add (its norm
weight goes with it). The result is a new graph module that shares the
remaining weights with the input one and is checked by the IR verifier.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from fxfuse.compress.structure import _ADD_NORMS, BRANCH_TAG, Branch, find_branches
from fxfuse.ir.meta import fake_mode_of
from fxfuse.ir.rewrite import Builder
from fxfuse.ir.verify import verify


def drop_branches(gm: fx.GraphModule, names: set[str]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its weights) without the tagged branches in ``names``."""
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # a graph needs an owning module for dead-code checks
    graph = work.graph
    mode = fake_mode_of(gm)
    adds = {n.meta.get(BRANCH_TAG): n for n in graph.nodes if n.meta.get(BRANCH_TAG)}
    missing = names - set(adds)
    if missing:
        raise KeyError(f"no branch named {sorted(missing)} in this graph; it has {sorted(adds)}")
    for name in sorted(names):
        branch = next(b for b in find_branches(graph) if b.name == name)
        _bypass(graph, mode, branch)
    graph.eliminate_dead_code()
    _unfuse_unused_norms(graph, mode)
    graph.eliminate_dead_code()
    result = fx.GraphModule(work, graph)  # holds only the weights the graph still reads
    verify(result)
    return result


def _bypass(graph: fx.Graph, mode, branch: Branch) -> None:
    add, stream = branch.add, branch.stream
    if add.target not in _ADD_NORMS:
        add.replace_all_uses_with(stream)
        graph.erase_node(add)
        return
    norm_args = (stream, *add.args[2:])
    b = Builder(graph, mode, add)
    norm = b.call(_ADD_NORMS[add.target], *norm_args, **add.kwargs)
    for user in list(add.users):
        user.replace_all_uses_with(norm if user.args[1] == 0 else stream)
        graph.erase_node(user)
    graph.erase_node(add)


def _unfuse_unused_norms(graph: fx.Graph, mode) -> None:
    """A fused add-norm whose normalized output is unused is a plain add of its two inputs."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ADD_NORMS:
            continue
        outputs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if 0 in outputs or 1 not in outputs:
            continue
        b = Builder(graph, mode, node)
        total = b.call(torch.ops.aten.add.Tensor, node.args[0], node.args[1])
        if BRANCH_TAG in node.meta:
            total.meta[BRANCH_TAG] = node.meta[BRANCH_TAG]
        outputs[1].replace_all_uses_with(total)
        graph.erase_node(outputs[1])
        graph.erase_node(node)
