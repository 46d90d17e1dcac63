"""Calibration: run a fused graph on calibration batches and read values off it through observer nodes.

:func:`observe` runs a copy of the graph in which chosen nodes also hand
their value to a Python callback (an inserted ``call_function`` node), so the
statistics come from the graph itself, whatever the architecture.
:func:`batches` turns what users have (input dicts, a tokenizer and texts, a
``torch.utils.data`` loader) into a list of input dicts.
:func:`stream_statistics` computes the per-branch and per-layer similarity
scores and caches them on disk, keyed by the weights, the graph and the data.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch import Tensor
from tqdm.auto import tqdm

from fxfuse.compress.structure import Branch, Layer
from fxfuse.errors import InputError

Batch = dict[str, Any]


def batches(data: Any, *, seq_len: int = 256, batch_size: int = 4, max_batches: Optional[int] = None) -> list[Batch]:
    """Calibration batches from ``data``: a list of input dicts, ``(tokenizer, texts)``, or an iterable of dicts.

    Texts are tokenized, concatenated and cut into ``seq_len``-token rows
    (no padding), ``batch_size`` rows per batch.
    """
    if isinstance(data, tuple) and len(data) == 2 and callable(getattr(data[0], "__call__", None)) \
            and isinstance(data[1], (list, tuple)) and all(isinstance(t, str) for t in data[1]):
        return _token_batches(data[0], list(data[1]), seq_len, batch_size, max_batches)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InputError(f"calibration data must be a list of input dicts, (tokenizer, texts) or a data loader "
                         f"yielding dicts; got {type(data).__name__}")
    out: list[Batch] = []
    for item in data:
        if not isinstance(item, dict):
            raise InputError(f"calibration batches must be dicts of model inputs (e.g. input_ids, attention_mask); "
                             f"got a {type(item).__name__}")
        out.append(dict(item))
        if max_batches is not None and len(out) >= max_batches:
            break
    if not out:
        raise InputError("calibration data is empty: give at least one batch")
    return out


def _token_batches(tokenizer: Any, texts: list[str], seq_len: int, batch_size: int,
                   max_batches: Optional[int]) -> list[Batch]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = len(ids) // seq_len
    if rows == 0:
        raise InputError(f"the calibration texts give {len(ids)} tokens, fewer than one row of seq_len={seq_len}")
    table = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
    out = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in table.split(batch_size)]
    return out[:max_batches] if max_batches is not None else out


def observe(gm: fx.GraphModule, nodes: dict[str, fx.Node], data: list[Batch],
            callback: Callable[[int, dict[str, Tensor], Batch], None], *, desc: str = "calibrating") -> None:
    """Run ``gm`` on each batch; ``callback(i, values, batch)`` gets the values of ``nodes`` (by key) for batch i."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    seen: dict[str, Tensor] = {}

    def record(key: str, value: Tensor) -> None:
        seen[key] = value

    for key, node in nodes.items():
        copy_of = by_name[node.name]
        with graph.inserting_after(copy_of):
            graph.call_function(record, (key, copy_of))
    runner = fx.GraphModule(gm, graph)
    with torch.no_grad():
        for i, batch in enumerate(tqdm(data, desc=desc, leave=False, disable=None)):
            seen.clear()
            runner(**batch)
            callback(i, dict(seen), batch)


def token_mask(batch: Batch, value: Tensor) -> Tensor:
    """(B, S) bool: the real tokens of ``batch`` (its ``attention_mask``, if any) for a (B, S, D) value."""
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape == value.shape[:2]:
        return mask.bool()
    return torch.ones(value.shape[:2], dtype=torch.bool)


def mean_cosine_distance(a: Tensor, b: Tensor, mask: Tensor) -> tuple[float, int]:
    """(sum of 1 - cos(a, b) over the masked tokens, their count)."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float((1 - cos)[mask].sum()), int(mask.sum())


def stream_statistics(gm: fx.GraphModule, branches: list[Branch], layers: list[Layer],
                      data: list[Batch], cache_dir: Optional[str] = None) -> dict[str, float]:
    """Similarity scores, token means, by name: per branch (LLM-Drop's 1 - cos(x, x + f(x))) and per layer
    (ShortGPT's block influence, 1 - cos(layer input, layer output); named "attention[i]+mlp[i]")."""
    path = _cache_path(gm, [b.name for b in branches] + [layer.name for layer in layers], data, cache_dir)
    if path is not None and path.exists():
        return torch.load(path)
    nodes: dict[str, fx.Node] = {}
    for b in branches:  # the stream after a branch is read as the sum of its two operands
        nodes[f"in:{b.name}"] = b.stream
        nodes[f"f:{b.name}"] = b.output
    sums: dict[str, list[float]] = {}

    def add(key: str, a: Tensor, b: Tensor, batch: Batch) -> None:
        total, count = mean_cosine_distance(a, b, token_mask(batch, a))
        s = sums.setdefault(key, [0.0, 0])
        s[0] += total
        s[1] += count

    def on_batch(_: int, values: dict[str, Tensor], batch: Batch) -> None:
        after = {b.name: values[f"in:{b.name}"] + values[f"f:{b.name}"] for b in branches}
        for b in branches:
            add(b.name, values[f"in:{b.name}"], after[b.name], batch)
        for layer in layers:
            add(layer.name, values[f"in:{layer.attention.name}"], after[layer.mlp.name], batch)

    observe(gm, nodes, data, on_batch, desc="calibration statistics")
    stats = {k: total / max(count, 1) for k, (total, count) in sums.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(stats, path)
    return stats


def _cache_path(gm: fx.GraphModule, names: list[str], data: list[Batch], cache_dir: Optional[str]) -> Optional[Path]:
    """Where the statistics ``names`` of this graph, weights and data are cached (``FXFUSE_CACHE`` or
    ~/.cache/fxfuse); None when caching is off (``cache_dir=""``)."""
    root = cache_dir if cache_dir is not None else os.environ.get("FXFUSE_CACHE", str(Path.home() / ".cache/fxfuse"))
    if not root:
        return None
    h = hashlib.sha256(gm.code.encode())
    h.update(repr(names).encode())
    for name, t in sorted({**dict(gm.named_parameters()), **dict(gm.named_buffers())}.items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    for batch in data:
        for key in sorted(batch):
            h.update(key.encode())
            value = batch[key]
            if isinstance(value, Tensor):
                _hash_tensor(h, value)
            else:
                h.update(repr(value).encode())
    return Path(root) / "calibration" / f"{h.hexdigest()[:32]}.pt"


def _hash_tensor(h: Any, t: Tensor) -> None:
    """Feed ``t``'s shape, dtype and exact bytes to ``h`` (read in place, not copied)."""
    h.update(repr((tuple(t.shape), t.dtype)).encode())
    h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
