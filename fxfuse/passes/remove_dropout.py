"""remove-dropout: dropout that is off (eval mode, or p = 0) is the identity."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.passes.manager import PassResult

aten = torch.ops.aten


def remove_dropout(gm: fx.GraphModule) -> PassResult:
    """Replace ``dropout(x, p, train)`` by ``x`` where ``train`` is False or ``p`` is 0.

    Dropout that is active (a model captured in training mode) is left alone:
    it is random, and removing it would change what the model computes.
    """
    result = PassResult(name="remove-dropout")
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.dropout.default, aten.feature_dropout.default):
            continue
        x, p, train = node.args[0], node.args[1], node.args[2]
        if train is False or p == 0:
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            result.rewrites["inactive_dropout"] += 1
    result.changed = sum(result.rewrites.values()) > 0
    return result
