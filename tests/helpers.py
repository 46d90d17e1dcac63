"""Shared test helpers: capture a small module, run passes on it, count ops."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
import torch.fx as fx

from fxfuse.ir.capture import capture
from fxfuse.ir.numerics import compare
from fxfuse.ir.verify import verify
from fxfuse.passes import PassManager, resolve


def captured(module: torch.nn.Module, *args: torch.Tensor, dynamic_shapes=None) -> fx.GraphModule:
    """The ATen graph module of ``module`` called on ``args``."""
    return capture(module.eval(), args, dynamic_shapes=dynamic_shapes).graph_module


def run_pipeline(gm: fx.GraphModule, names: list[str], *args: torch.Tensor):
    """Run the named passes with verification and numeric validation on ``args``; the results."""
    with torch.no_grad():
        reference = gm(*args)
    results = PassManager(resolve(names)).run(gm, (args, {}), reference)
    verify(gm)
    with torch.no_grad():
        assert compare(reference, gm(*args)).ok
    return results


def count(gm: fx.GraphModule, target) -> int:
    """How many nodes of ``gm`` call ``target`` (an op overload)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def benchmark_script(file: str, module_name: str) -> Iterator[ModuleType]:
    """``benchmarks/<file>`` imported as ``module_name``, for a fixture to ``yield from``; unregistered after."""
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parents[1] / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
