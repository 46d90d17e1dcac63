"""dce: erase nodes whose results nothing uses, and parameters nothing reads."""

from __future__ import annotations

import torch.fx as fx

from fxfuse.passes.manager import PassResult


def dce(gm: fx.GraphModule) -> PassResult:
    """Dead-code elimination; side-effecting nodes (asserts, guards) are kept."""
    result = PassResult(name="dce")
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    erased = before - len(gm.graph.nodes)
    if erased:
        gm.delete_all_unused_submodules()
        result.rewrites["dead_node"] = erased
        result.changed = True
    return result
