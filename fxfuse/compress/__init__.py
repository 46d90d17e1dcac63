"""Structural rewrites: calibrate, score, remove, repair, measured against a quality budget."""

from fxfuse.compress.api import CompressedModule, CompressReport, Step, compress
from fxfuse.compress.calibrate import batches
from fxfuse.compress.drop import drop_branches
from fxfuse.compress.structure import Branch, Layer, find_branches, find_layers

__all__ = ["Branch", "CompressReport", "CompressedModule", "Layer", "Step", "batches", "compress", "drop_branches",
           "find_branches", "find_layers"]
