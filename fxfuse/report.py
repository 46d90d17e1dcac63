"""The report ``optimize()`` returns: what each pass did, what was fused, what was not and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

from fxfuse.ir.dialect import is_dialect_op
from fxfuse.passes.manager import PassResult, Rejection


def count_dialect_ops(gm: fx.GraphModule) -> dict[str, int]:
    """How many times each fxfuse op is called in ``gm``, by short name."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_dialect_op(node.target):
            counts[node.target.overloadpacket.__name__] += 1
    return dict(sorted(counts.items()))


@dataclass
class Report:
    """What ``optimize()`` did to a model.

    ``ops`` counts the fused dialect ops in the graph; ``lowered`` counts what
    the back end's lowering did beyond them (the eager back end's oneDNN
    linears with fused epilogues, the Triton back end's kernels), by kind.
    ``validated_on`` names the inputs the final program was checked on (each
    pass's own list is in its ``PassResult``); ``max_error`` is the worst
    relative error over them.
    """

    model: str
    backend: str
    passes: list[PassResult]
    ops: dict[str, int]
    capture_seconds: float
    max_error: float | None = None
    lowered: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    validated_on: list[str] = field(default_factory=list)

    @property
    def rejections(self) -> list[Rejection]:
        """Blocks a fusion rule matched or nearly matched but left unfused, with the reason."""
        return [r for p in self.passes for r in p.rejections]

    @property
    def skipped(self) -> list[PassResult]:
        """Passes rolled back because they failed verification or validation."""
        return [p for p in self.passes if p.skipped]

    def __str__(self) -> str:
        rows = [("pass", "rewrites", "nodes", "ms", "max err", "status")]
        for p in self.passes:
            rewrites = ", ".join(f"{k}×{v}" for k, v in sorted(p.rewrites.items())) or "-"
            err = "-" if p.max_error is None else f"{p.max_error:.1e}"
            status = f"SKIPPED: {p.error}" if p.skipped else "ok"
            rows.append((p.name, rewrites, f"{p.nodes_before}→{p.nodes_after}", f"{p.seconds * 1e3:.0f}", err, status))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [f"fxfuse report for {self.model} (backend: {self.backend}, capture {self.capture_seconds:.1f} s)"]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        ops = ", ".join(f"{k}×{v}" for k, v in self.ops.items()) or "none"
        lines.append(f"fused ops: {ops}")
        if self.lowered:
            lowered = ", ".join(f"{k}×{v}" for k, v in self.lowered.items())
            lines.append(f"lowered by the {self.backend} back end: {lowered}")
        if self.max_error is not None:
            lines.append(f"max relative output error vs the original model: {self.max_error:.2e}")
        if self.validated_on:
            lines.append(f"validated on: {'; '.join(self.validated_on)}")
        if self.rejections:
            lines.append("not fused:")
            lines += [f"  - {r}" for r in self.rejections]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
