"""The lowered copy of an optimized graph that a back end runs, reading parameters through the original.

A back end retargets nodes of a copy of the graph, never the optimized graph
itself, and the copy reads parameters and buffers through the optimized
module (``_root``), so ``.to(device)`` and ``state_dict`` of the optimized
module stay the one source of truth.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn


def graph_reading_root(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm.graph`` whose attribute and submodule reads go through ``_root``."""
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            node.target = f"_root.{node.target}"
    return graph


def module_reading_root(gm: fx.GraphModule, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """The ``fx.GraphModule`` that runs ``graph`` (from :func:`graph_reading_root`) over ``gm``'s parameters."""
    holder = nn.Module()
    holder._root = gm
    module = fx.GraphModule(holder, graph, class_name=class_name)
    module._root = gm  # read through the optimized module, not copies of its tables
    return module
