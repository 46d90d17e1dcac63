"""Example inputs, and the probes derived from them that exercise what the example may not.

A rewrite that is right only on the example's values passes a check on the
example alone: a boolean mask added to the scores looks like a keep-mask
when the example keeps every position. Validation therefore also runs on
probes, derived from the example generically (from its dtypes, shapes and
values, never per model):

* masks (boolean tensors, and integer or float tensors of 0s and 1s) and
  additive masks (float tensors of 0s and large negative fills) get padding:
  the last batch row loses its trailing third of positions along the last
  dim, the first row (when there are two or more) its leading third; every
  row keeps the rest;
* integer tensors that count up by one along the last dim (position ids)
  keep counting; other integer tensors (token ids, labels) are redrawn from
  the example's own values, so they stay in range;
* other float tensors are redrawn around the example's mean at twice its
  spread (another scale);
* the ``shape`` probe also grows every dynamic dim of the inputs (a batch
  dim by one, others by three), tiling the example along it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree


@dataclass
class Probe:
    """One input a graph is validated on: a label, the call's args and kwargs, and the model's outputs on it.

    ``float64`` computes the model's outputs on it in float64 (a
    :class:`~fxfuse.ir.numerics.Float64Replay` call), for judging where the
    float32 reference itself strays: :meth:`exact`.
    """

    label: str
    args: tuple
    kwargs: dict
    reference: Any = None
    float64: Callable[[], Any] | None = None
    _exact: Any = field(default=None, init=False, repr=False)

    def exact(self) -> Any:
        """The outputs in float64, computed on first use; None without ``float64`` or where it fails to run."""
        if self._exact is None and self.float64 is not None:
            try:
                self._exact = self.float64()
            except Exception:  # an op without a float64 kernel: the float32 reference alone judges
                self.float64 = None
        return self._exact


_BATCH_GROWTH, _OTHER_GROWTH = 1, 3


def role(t: torch.Tensor) -> str:
    """What a tensor input looks like: "mask", "additive_mask", "positions", "ids" or "float"."""
    if t.dtype == torch.bool:
        return "mask"
    if t.numel() and not t.is_floating_point() and not t.is_complex():
        if t.dim() >= 1 and t.shape[-1] >= 2 and bool((t.diff(dim=-1) == 1).all()):
            return "positions"
        return "mask" if bool(((t == 0) | (t == 1)).all()) else "ids"
    if t.is_floating_point() and t.numel():
        if t.dim() >= 2 and bool(((t == 0) | (t <= torch.finfo(t.dtype).min / 2)).all()):
            return "additive_mask"  # all zeros too: an additive mask that drops nothing
        if bool(((t == 0) | (t == 1)).all()):
            return "mask"
    return "float"


def input_name(path: tuple) -> str:
    """A readable name for the input at ``path`` in ``(args, kwargs)``: ``'input_ids'``, ``args[0]``."""
    text = pytree.keystr(path)
    if text.startswith("[1]"):
        return text[3:]
    return "args" + text[3:] if text.startswith("[0]") else text


def standalone(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example with every tensor leaf contiguous and its own tensor.

    A slice such as ``ids[:2, :16]`` becomes contiguous; a tensor passed
    twice (``attn(x, x, x)``) becomes copies, since ``torch.export`` would
    otherwise build a graph that is right only when they are one tensor.
    """
    seen: set[int] = set()

    def own(_i: int, t: torch.Tensor) -> torch.Tensor:
        copy = id(t) in seen
        seen.add(id(t))
        return t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()

    return _map_tensors(args, kwargs, own)


def _pad_value(t: torch.Tensor, kind: str) -> Any:
    if kind == "mask":
        return False if t.dtype == torch.bool else 0
    dropped = t[t != 0]
    return dropped.min().item() if dropped.numel() else torch.finfo(t.dtype).min


def _padded(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The mask with the last row right-padded and the first row left-padded (a third of the last dim each)."""
    if t.dim() == 0 or t.shape[-1] < 2:
        return t
    n = t.shape[-1]
    k = max(1, n // 3)
    out = t.clone()
    rows = out if out.dim() >= 2 else out.unsqueeze(0)
    value = _pad_value(t, kind)
    rows[-1, ..., n - k:] = value
    if rows.shape[0] >= 2:
        rows[0, ..., :k] = value
    return out


def _tiled(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """``t`` tiled (or cut) along the given dims to the given sizes."""
    for dim, new in sizes.items():
        index = torch.arange(new, device=t.device) % t.shape[dim]
        t = t.index_select(dim, index)
    return t


def _derive(t: torch.Tensor, sizes: dict[int, int], gen: torch.Generator, pad: bool) -> torch.Tensor:
    """One probe tensor from an example tensor: resized to ``sizes``, then treated by its role."""
    kind = role(t)
    last = t.dim() - 1
    if kind == "positions" and last in sizes:
        start = t.narrow(last, 0, 1)
        out = _tiled(t, {d: s for d, s in sizes.items() if d != last})
        start = _tiled(start, {d: s for d, s in sizes.items() if d != last})
        steps = torch.arange(sizes[last], dtype=t.dtype, device=t.device)
        return (start + steps).contiguous()
    out = _tiled(t, sizes).contiguous()
    if kind in ("mask", "additive_mask"):
        return _padded(out, kind) if pad else out
    if kind == "ids" and pad:
        values = t.flatten()
        picks = torch.randint(0, values.numel(), out.shape, generator=gen)
        return values[picks.to(values.device)]
    if kind == "float" and pad and out.numel() > 1:
        x = t.double()
        spread = x.std().item() if x.numel() > 1 else 0.0
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(t.device)
        return (x.mean() + 2 * spread * noise).to(t.dtype)
    return out


def _map_tensors(args: tuple, kwargs: dict, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    """(args, kwargs) with each tensor leaf replaced by ``fn(leaf index, leaf)``."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    out = [fn(i, x) if isinstance(x, torch.Tensor) else x for i, x in enumerate(leaves)]
    new_args, new_kwargs = pytree.tree_unflatten(out, spec)
    return tuple(new_args), dict(new_kwargs)


def grown_sizes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[dict[int, int]] | None:
    """For each input leaf, the new size of each of its dynamic dims in the ``shape`` probe.

    A dim's size is a symbol of the captured graph; every dim with the same
    symbol grows alike (by one where the symbol first appears as a dim 0, by
    three elsewhere). None when the graph's inputs do not line up with the
    example or a dim is an expression of symbols (it cannot grow on its own).
    """
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(leaves) != len(placeholders):
        return None
    growth: dict[sympy.Symbol, int] = {}
    sizes: list[dict[int, int]] = []
    for leaf, node in zip(leaves, placeholders):
        value = node.meta.get("val")
        dims: dict[int, int] = {}
        if isinstance(leaf, torch.Tensor) and isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                if isinstance(size, int) or size.node.expr.is_number:
                    continue  # static (export may keep a specialized dim as a constant SymInt)
                expr = size.node.expr
                if not isinstance(expr, sympy.Symbol):
                    return None
                growth.setdefault(expr, _BATCH_GROWTH if d == 0 else _OTHER_GROWTH)
                dims[d] = leaf.shape[d] + growth[expr]
        sizes.append(dims)
    return sizes


def derive_probes(args: tuple, kwargs: dict, sizes: list[dict[int, int]] | None, seed: int = 0) -> list[Probe]:
    """The probes for an example: ``padded`` at the example's shape, and ``shape`` at grown dynamic dims.

    ``sizes`` is ``grown_sizes(...)``; without any dynamic dim there is no
    ``shape`` probe. A probe that would equal the example is left out.
    """
    gen = torch.Generator().manual_seed(seed)
    probes = []
    padded = _map_tensors(args, kwargs, lambda i, t: _derive(t, {}, gen, pad=True))
    if not _same(padded, (args, kwargs)):
        probes.append(Probe("padded/rescaled", *padded))
    if sizes and any(sizes):
        grown = _map_tensors(args, kwargs, lambda i, t: _derive(t, sizes[i], gen, pad=True))
        probes.append(Probe(f"padded/rescaled at {_describe_growth(args, kwargs, sizes)}", *grown))
    return probes


def _same(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return all(
        (x is y) or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                     and torch.equal(x, y))
        for x, y in zip(la, lb)
    )


def _describe_growth(args: tuple, kwargs: dict, sizes: list[dict[int, int]]) -> str:
    leaves = pytree.tree_leaves((args, kwargs))
    for leaf, dims in zip(leaves, sizes):
        if dims:
            old = "×".join(str(s) for s in leaf.shape)
            new = "×".join(str(dims.get(d, s)) for d, s in enumerate(leaf.shape))
            return f"{old} → {new}"
    return "other shapes"


def grow_unit_dims(args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """The example with its size-1 dims grown to 2, in the ways worth trying, boldest first.

    ``torch.export`` specializes a dim whose example size is 0 or 1; a graph
    captured from a grown example keeps it dynamic and still runs at size 1.
    A size-1 dim may also be a broadcast dim that must stay 1 (the heads dim
    of a (batch, 1, query, key) mask), so three growths are offered: every
    size-1 dim; all but dim 1 of 4-D and larger inputs; dim 0 of every input
    and dim 1 of 2-D and 3-D ones (batch and sequence). Tensors are tiled
    (positions keep counting). Empty when no dim has size 1.
    """
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    rules: list[Callable[[torch.Tensor, int], bool]] = [
        lambda t, d: True,
        lambda t, d: not (d == 1 and t.dim() >= 4),
        lambda t, d: d == 0 or (d == 1 and t.dim() in (2, 3)),
    ]
    growths, seen = [], set()
    for grows in rules:
        plan = tuple(tuple(d for d in range(t.dim()) if t.shape[d] == 1 and grows(t, d)) for t in tensors)
        if any(plan) and plan not in seen:
            seen.add(plan)
            dims = {id(t): p for t, p in zip(tensors, plan)}
            growths.append(_map_tensors(args, kwargs, lambda _i, t, dims=dims: _derive(
                t, {d: 2 for d in dims[id(t)]}, torch.Generator(), pad=False)))
    return growths
