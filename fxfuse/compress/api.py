"""``fxfuse.compress``: remove layers or sublayers greedily, repair in closed form, hold a quality budget."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.fx as fx
from torch import nn

from fxfuse.api import OptimizedModule, optimize
from fxfuse.codegen import lower
from fxfuse.compress.calibrate import Batch, batches, stream_statistics
from fxfuse.compress.checkpoint import rebuild, save_pretrained
from fxfuse.compress.drop import drop_branches
from fxfuse.compress.heads import check_tp_degree, choose_heads, find_heads, head_scores, prune_heads, refit_outputs
from fxfuse.compress.kv_heads import Grouping, Method, merge_kv_heads
from fxfuse.compress.latent import (LatentMethod, fit_statistics, latent_rotary_dims, refit_latent_outputs,
                                   rope_candidates, to_latent)
from fxfuse.compress.latent_cache import with_latent_attention
from fxfuse.compress.quality import Judge, Quality
from fxfuse.compress.repair import repair_gap
from fxfuse.compress.structure import Branch, find_branches, find_layers, tag_branches
from fxfuse.errors import InputError
from fxfuse.ir.dialect import OPS
from fxfuse.report import count_dialect_ops

Scorer = Literal["loss", "similarity", "greedy", "gradient", "activation"]
HEAD_SCORERS = ("loss", "greedy", "gradient", "activation")
Unit = Literal["layers", "attention_sublayers", "mlp_sublayers"]


@dataclass
class Step:
    """One greedy removal: what, its score, held-out quality after it, size after it, repair notes."""

    removed: tuple[str, ...]
    score: float
    quality: Quality
    quality_loss: float
    parameters: int
    kv_bytes_per_token: int
    latency_ms: float
    repairs: list[str] = field(default_factory=list)
    accepted: bool = True
    seconds: float = 0.0


@dataclass
class CompressReport:
    """What ``compress()`` removed, step by step, and what the budget allowed."""

    unit: str
    scorer: str
    repair: bool
    original: Quality
    original_parameters: int
    original_kv_bytes_per_token: int
    original_latency_ms: float
    budget: Optional[float]
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> list[Step]:
        return [s for s in self.steps if s.accepted]

    def __str__(self) -> str:
        rows = [("step", "removed", "score", "held-out", "loss", "params", "KV B/token", "ms", "repair", "")]
        rows.append(("0", "-", "-", f"{self.original.value:.4g}", "-", f"{self.original_parameters:,}",
                     f"{self.original_kv_bytes_per_token:,}", f"{self.original_latency_ms:.3g}", "-", ""))
        for i, s in enumerate(self.steps, 1):
            rows.append((str(i), "+".join(s.removed), f"{s.score:.4g}", f"{s.quality.value:.4g}",
                         f"{s.quality_loss:+.2%}" if self.original.metric == "perplexity" else f"{s.quality_loss:.4f}",
                         f"{s.parameters:,}", f"{s.kv_bytes_per_token:,}", f"{s.latency_ms:.3g}",
                         "; ".join(s.repairs) or "-",
                         "" if s.accepted else "REFUSED: over budget"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        budget = "none" if self.budget is None else f"{self.budget:g}"
        lines = [f"fxfuse compress: {self.unit} by {self.scorer} scores, repair {'on' if self.repair else 'off'}, "
                 f"quality = held-out {self.original.metric}, budget (max quality loss) {budget}"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("ms: one call on the first held-out batch, lowered for the back end (median of 3)")
        return "\n".join(lines)


class CompressedModule(OptimizedModule):
    """A compressed, fused model: called like the original; ``compress_report`` says what was removed."""

    def __init__(self, optimized: OptimizedModule, compress_report: CompressReport,
                 source: Optional[nn.Module] = None) -> None:
        super().__init__(optimized.graph_module, optimized.report, optimized.fixed_kwargs, optimized.program,
                         optimized.static_dims)
        self.compress_report = compress_report
        self._source = (source,)  # a tuple: the source model is not a submodule of this one

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face checkpoint that ``from_pretrained`` loads as the compressed model.

        Whole layers, heads pruned alike in every layer and merged key/value
        heads can be written (the config has one count of each); removed
        sublayers raise ``InputError`` saying so.
        """
        save_pretrained(self._transformers_source(), self.graph_module, self.compress_report.unit,
                        len(self.compress_report.accepted), directory)

    def to_transformers(self) -> nn.Module:
        """The compressed model as a ``transformers`` model of the source's class (what :meth:`save_pretrained`
        writes), in memory: ``generate()`` on it, or on ``torch.compile(it, backend="fxfuse")``, keeps a
        cache of the compressed size (fewer layers or key/value heads). After ``latent_kv``, its attention
        modules are :class:`~fxfuse.compress.latent_cache.LatentSelfAttention`, whose dynamic cache holds the
        latent and the rotary key."""
        if self.compress_report.unit == "latent_kv" and self.compress_report.accepted:
            return with_latent_attention(self._transformers_source(), self.graph_module)
        return rebuild(self._transformers_source(), self.graph_module, self.compress_report.unit,
                       len(self.compress_report.accepted))

    def _transformers_source(self) -> nn.Module:
        source = self._source[0]
        if source is None:
            raise InputError("this model was compressed from an OptimizedModule; compress the transformers model "
                             "itself to save or rebuild a checkpoint")
        return source


def compress(
    model: nn.Module,
    calibration: Any,
    *,
    layers: int = 0,
    attention_sublayers: int = 0,
    mlp_sublayers: int = 0,
    heads: float = 0,
    kv_heads: int = 0,
    merge: Method = "aligned",
    grouping: Grouping = "activation",
    latent_kv: float = 0,
    rope_dims: Optional[int] = None,
    fit: LatentMethod = "activation",
    params: Optional[float] = None,
    kv_bytes: Optional[float] = None,
    unit: Optional[Unit] = None,
    uniform: bool = False,
    tp_degree: int = 1,
    scorer: Optional[Scorer] = None,
    repair: bool = True,
    ridge: Optional[float] = None,
    max_quality_loss: Optional[float] = None,
    held_out: Any = None,
    score_batches: int = 2,
    cache_dir: Optional[str] = None,
) -> CompressedModule:
    """Remove ``layers`` whole layers, ``attention_sublayers`` / ``mlp_sublayers`` sublayers (one at a
    time), or ``heads`` query heads (a fraction of all, or a count; :mod:`fxfuse.compress.heads`);
    or, instead of a count, remove until a size target is met: ``params`` (the fraction of the
    parameters to keep at most) or ``kv_bytes`` (the fraction of KV-cache bytes per token), by
    whole layers unless ``unit`` names another ("attention_sublayers"; "mlp_sublayers" for ``params``).

    ``calibration`` (input dicts, ``(tokenizer, texts)`` or a loader of dicts,
    see :func:`fxfuse.compress.calibrate.batches`) drives the scores and the
    repair; ``held_out`` (same forms, disjoint from it) measures quality after
    each step. Each step removes the candidate with the lowest score:
    ``scorer="loss"`` measures the quality loss of each candidate removal on
    the first ``score_batches`` calibration batches (SLEB-style, slower);
    ``"similarity"`` takes 1 - cos(stream in, stream out) over the candidate
    (ShortGPT's block influence for layers, LLM-Drop's for sublayers),
    recomputed on the current model each step. With ``repair``, the projection
    before each gap is refitted in closed form (:mod:`fxfuse.compress.repair`;
    ``ridge``: its relative λ, by default chosen on left-out calibration batches,
    with no refit where none pays).
    Heads are scored once on the calibration data (``scorer="gradient"``,
    Michel et al.'s, the default for language models; ``"activation"``, the
    default otherwise; ``"loss"``, each head's exact removal measured on
    ``score_batches`` batches; ``"greedy"``, the same re-measured after each
    removal, slower), removed lowest first (``uniform``: as many from every
    layer) and, with ``repair``, each pruned op's output projection is refitted
    to its original output; with a budget they go in four increments. With
    ``tp_degree`` (the tensor-parallel degree the result will be sharded over),
    every op keeps query and KV head counts divisible by it; a model that is
    not divisible to begin with is refused. Layer and sublayer removal keep
    every head count.
    ``kv_heads`` merges every attention op's key/value heads down to that many
    (MHA → GQA, or fewer groups; :mod:`fxfuse.compress.kv_heads`): ``merge="aligned"``
    (the group's best common subspace on the calibration tokens, RoPE-aware) or
    ``"mean"`` (mean-pooling), groups chosen from the calibration statistics
    (``grouping="activation"``) or adjacent (``"neighbours"``); with ``repair``,
    the output projections are then refitted as after head pruning.
    ``latent_kv`` (a fraction of the KV-cache bytes per token, below 1) rewrites
    every attention op as multi-head latent attention (:mod:`fxfuse.compress.latent`):
    a decoupled rotary key of ``rope_dims`` (by default the size from 1/8 to 1/2
    of the budget with the best quality on ``score_batches`` calibration
    batches, fitted on the others) plus a latent of the rest, fitted on the calibration tokens
    (``fit="activation"``) or on the weights alone (``"svd"``, X-EcoMLA's
    initialisation); with ``repair``, the output projections are refitted.
    Quality is perplexity for a language model (loss = relative rise) or the
    cosine of pooled outputs to the original's (loss = 1 - cosine). With
    ``max_quality_loss``, a step whose held-out loss would exceed it is refused
    and removal stops there; the report says so. ``model`` may be an
    ``OptimizedModule`` already (its fused graph is reused, not changed).
    """
    counts = {"layers": layers, "attention_sublayers": attention_sublayers, "mlp_sublayers": mlp_sublayers,
              "heads": heads, "kv_heads": kv_heads, "latent_kv": latent_kv}
    asked = {k: v for k, v in counts.items() if v}
    target = _size_target(asked, params, kv_bytes, unit)
    if target is not None:
        asked = {target.unit: 0}
    elif unit is not None:
        raise InputError(f"unit= chooses what params= or kv_bytes= removes; with a count, name the unit itself "
                         f"(e.g. attention_sublayers=2), got unit={unit!r}")
    bad_count = any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for k, v in counts.items()
                    if k not in ("heads", "latent_kv"))
    bad_heads = not isinstance(heads, (int, float)) or heads < 0 or (isinstance(heads, float) and heads >= 1)
    bad_latent = not isinstance(latent_kv, (int, float)) or not 0 <= latent_kv < 1
    if len(asked) != 1 or bad_count or bad_heads or bad_latent:
        raise InputError(f"ask for one kind of removal with a positive count (layers=, attention_sublayers=, "
                         f"mlp_sublayers=, kv_heads=, heads= as a count or a fraction below 1, or latent_kv= as a "
                         f"fraction below 1); got {counts}")
    unit, count = next(iter(asked.items()))
    allowed = {"heads": HEAD_SCORERS, "kv_heads": (), "latent_kv": ()}.get(unit, ("loss", "similarity"))
    if scorer is not None and scorer not in allowed:
        raise InputError(f"scorer for {unit} must be one of {allowed}, not {scorer!r}")
    cal = batches(calibration)
    held = batches(held_out) if held_out is not None else None
    if held is None:
        if len(cal) < 2:
            raise InputError("give held_out= data, or at least 2 calibration batches (the last quarter is held out)")
        split = max(1, len(cal) // 4)
        cal, held = cal[:-split], cal[-split:]

    optimized = model if isinstance(model, OptimizedModule) else optimize(model, example_kwargs=cal[0], backend="eager")
    fixed = optimized.fixed_kwargs
    cal = [{**b, **fixed} for b in cal]
    held = [{**b, **fixed} for b in held]
    original = optimized.graph_module
    timer = Timer(held[0], optimized.report.backend)
    if unit == "kv_heads":
        report, current = _compress_kv_heads(original, kv_heads, merge, grouping, tp_degree, repair, ridge, cal, held,
                                             max_quality_loss, timer)
        return CompressedModule(_finish(current, optimized), report, None if model is optimized else model)
    if unit == "latent_kv":
        report, current = _compress_latent(original, latent_kv, rope_dims, fit, repair, ridge, cal, held,
                                           max_quality_loss, score_batches, timer)
        return CompressedModule(_finish(current, optimized), report, None if model is optimized else model)
    if unit == "heads":
        report, current = _compress_heads(original, heads, uniform, tp_degree, scorer, repair, ridge, cal, held,
                                          max_quality_loss, score_batches, timer)
        return CompressedModule(_finish(current, optimized), report, None if model is optimized else model)
    scorer = scorer or "loss"
    branches = find_branches(original.graph)
    tag_branches(branches)
    candidates = _candidates(unit, branches)
    if count > len(candidates):
        raise InputError(f"asked to remove {count} {unit}, but the graph has {len(candidates)}")
    if target is not None:
        count = len(candidates)  # as many as it takes: the loop stops when the target is met

    judge = Judge(original, held)
    scoring = Judge(original, cal[:score_batches]) if scorer == "loss" else None
    report = _report(unit, scorer, repair, judge, original, timer, max_quality_loss)
    order = [b.name for b in branches]
    current, removed = original, set()
    for _ in range(count):
        if target is not None and target.met(current, original):
            break
        start = time.perf_counter()
        remaining = [c for c in candidates if not set(c) & removed]
        scores = _score(scorer, current, remaining, scoring, cal, cache_dir)
        best = min(remaining, key=lambda c: scores[c])
        trial = drop_branches(current, set(best))
        notes: list[str] = []
        if repair:
            trial, notes = _repair(original, trial, order, removed | set(best), set(best), cal, ridge)
        step = _step(report, judge, timer, trial, best, scores[best], notes, start, max_quality_loss)
        if not step.accepted:
            allowed = (f"{len(report.accepted)} {unit} toward {target}" if target is not None
                       else f"{len(report.accepted)} of the {count} {unit} asked for")
            report.notes.append(f"the budget ({max_quality_loss:g}) allowed {allowed}: removing {'+'.join(best)} "
                                f"would lose {step.quality_loss:.4g}")
            break
        current, removed = trial, removed | set(best)
    if target is not None and not target.met(current, original) and all(s.accepted for s in report.steps):
        report.notes.append(f"{target} is not reached by removing {unit} alone: every one of them was removed")
    return CompressedModule(_finish(current, optimized), report, None if model is optimized else model)


def _report(unit: str, scorer: str, repair: bool, judge: Judge, original: fx.GraphModule, timer: "Timer",
            budget: Optional[float]) -> CompressReport:
    """An empty report of compressing ``original``, with its quality (``judge``), size and latency."""
    return CompressReport(unit=unit, scorer=scorer, repair=repair, original=judge.original,
                          original_parameters=parameter_count(original),
                          original_kv_bytes_per_token=kv_bytes_per_token(original), original_latency_ms=timer(original),
                          budget=budget)


def _step(report: CompressReport, judge: Judge, timer: "Timer", trial: fx.GraphModule, removed: tuple[str, ...],
          score: float, notes: list[str], start: float, budget: Optional[float]) -> Step:
    """Measure ``trial`` on the held-out batches, and time it, and record it as the report's next step,
    refused when its quality loss is over ``budget``."""
    quality = judge.measure(trial)
    seconds = time.perf_counter() - start
    step = Step(removed=removed, score=score, quality=quality, quality_loss=quality.loss_against(judge.original),
                parameters=parameter_count(trial), kv_bytes_per_token=kv_bytes_per_token(trial),
                latency_ms=timer(trial), repairs=notes, seconds=seconds)
    step.accepted = budget is None or step.quality_loss <= budget
    report.steps.append(step)
    return step


def _compress_heads(original: fx.GraphModule, heads: float, uniform: bool, tp_degree: int, scorer: Optional[str],
                    repair: bool, ridge: Optional[float], cal: list[Batch], held: list[Batch],
                    budget: Optional[float], score_batches: int,
                    timer: "Timer") -> tuple[CompressReport, fx.GraphModule]:
    """Score every query head once, then remove the lowest (in four increments under a budget)."""
    found = find_heads(original)
    check_tp_degree(found, tp_degree)
    total = sum(h.q_heads for h in found)
    count = round(heads * total) if isinstance(heads, float) else heads
    if not 0 < count < total:
        raise InputError(f"heads={heads} asks for {count} of the graph's {total} query heads; ask for 1 to {total - 1}")
    judge = Judge(original, held)
    scorer = scorer or ("gradient" if judge.language_model else "activation")
    scoring = Judge(original, cal[:score_batches]) if scorer in ("loss", "greedy") else None
    scores = head_scores(original, found, cal, scorer, scoring, greedy=count if scorer == "greedy" else 0)
    report = _report("heads", scorer, repair, judge, original, timer, budget)
    current, accepted = original, 0
    increments = [count] if budget is None else sorted({max(1, round(count * i / 4)) for i in range(1, 5)})
    previous: Optional[dict[str, list[int]]] = None
    for target in increments:
        start = time.perf_counter()
        keep = choose_heads(found, scores, target, uniform, tp_degree)
        if keep == previous:  # removal units (one head per KV group) can cover two increments
            continue
        previous = keep
        trial = prune_heads(original, keep)
        pruned = [h.name for h in found if len(keep[h.name]) < h.q_heads]
        notes = refit_outputs(original, trial, pruned, cal, ridge) if repair else []
        gone = {h.name: sorted(set(range(h.q_heads)) - set(keep[h.name])) for h in found}
        removed = sum(len(idx) for idx in gone.values())
        removed_scores = [float(scores[n][i]) for n, idx in gone.items() for i in idx]
        step = _step(report, judge, timer, trial, tuple(f"{n}-{idx}" for n, idx in gone.items() if idx),
                     sum(removed_scores) / len(removed_scores), notes, start, budget)
        if not step.accepted:
            report.notes.append(f"the budget ({budget:g}) allowed {accepted} of the {count} query heads asked for: "
                                f"removing {removed} would lose {step.quality_loss:.4g}")
            break
        current, accepted = trial, removed
    return report, current


def _compress_kv_heads(original: fx.GraphModule, kv_heads: int, merge: Method, grouping: Grouping, tp_degree: int,
                       repair: bool, ridge: Optional[float], cal: list[Batch], held: list[Batch],
                       budget: Optional[float], timer: "Timer") -> tuple[CompressReport, fx.GraphModule]:
    """Merge every op's key/value heads down to ``kv_heads`` in one step, refit the output projections."""
    start = time.perf_counter()
    judge = Judge(original, held)
    report = _report("kv_heads", f"{merge} merge, {grouping} groups", repair, judge, original, timer, budget)
    merged, notes = merge_kv_heads(original, kv_heads, cal, merge, grouping, tp_degree)
    if repair:
        notes += refit_outputs(original, merged, [h.name for h in find_heads(merged)], cal, ridge)
    return _one_step(report, judge, timer, original, merged, f"kv_heads→{kv_heads}", notes, start, budget,
                     f"merging to {kv_heads} key/value heads")


def _compress_latent(original: fx.GraphModule, fraction: float, rope_dims: Optional[int], fit: LatentMethod,
                     repair: bool, ridge: Optional[float], cal: list[Batch], held: list[Batch],
                     budget: Optional[float], score_batches: int,
                     timer: "Timer") -> tuple[CompressReport, fx.GraphModule]:
    """Rewrite every attention op as latent attention holding ``fraction`` of its KV bytes, in one step; without
    ``rope_dims``, the split between rotary key and latent with the best quality on the calibration batches."""
    start = time.perf_counter()
    found = find_heads(original)
    if not found:
        raise InputError("the graph has no attention op whose heads can be rewritten as latent attention")
    sizes = {h.kv_heads * (h.head_dim + h.v_dim) for h in found}
    if len(sizes) != 1:
        raise InputError(f"the attention ops hold different KV sizes per token ({sorted(sizes)}); latent_kv needs one")
    numbers = int(fraction * sizes.pop())  # cache numbers per token and op: rope_dims + latent_dim
    most = min(h.kv_heads * latent_rotary_dims(h) for h in found)
    candidates = [rope_dims] if rope_dims is not None else rope_candidates(numbers, most)
    if not candidates or numbers - candidates[0] < 1:
        raise InputError(f"latent_kv={fraction:g} leaves {numbers} numbers per token and op, not more than "
                         f"rope_dims={rope_dims}; ask for a larger fraction or fewer rope_dims")
    notes = []
    if len(candidates) > 1 and len(cal) > score_batches:
        # The split is chosen on calibration batches the trial fits did not see (the held-out ones judge
        # the result); the final fit then reads every calibration batch.
        scoring = Judge(original, cal[:score_batches])
        trial_stats = fit_statistics(original, cal[score_batches:], fit)
        losses = {size: scoring.measure(to_latent(original, cal, size, numbers - size, fit, trial_stats))
                  .loss_against(scoring.original) for size in candidates}
        rope_dims = min(losses, key=losses.__getitem__)
        notes.append("rotary key chosen on calibration batches left out of its trial fits: " +
                     ", ".join(f"{size}: {loss:+.4g}" for size, loss in losses.items()))
    else:
        rope_dims = candidates[min(1, len(candidates) - 1)]  # a quarter, or the size asked for
    judge = Judge(original, held)
    report = _report("latent_kv", f"{fit} fit, rope_dims={rope_dims}", repair, judge, original, timer, budget)
    rewritten = to_latent(original, cal, rope_dims, numbers - rope_dims, fit)
    notes.append(f"every op: a rotary key of {rope_dims} and a latent of {numbers - rope_dims} per token")
    if repair:
        notes += refit_latent_outputs(original, rewritten, cal, ridge)
    return _one_step(report, judge, timer, original, rewritten, f"latent_kv={fraction:g}", notes, start, budget,
                     f"latent attention at {fraction:g} of the KV bytes")


def _one_step(report: CompressReport, judge: Judge, timer: "Timer", original: fx.GraphModule,
              trial: fx.GraphModule, removed: str, notes: list[str], start: float, budget: Optional[float],
              what: str) -> tuple[CompressReport, fx.GraphModule]:
    """Record a single-step rewrite (``trial``) and return it, or ``original`` when the budget refuses ``what``."""
    step = _step(report, judge, timer, trial, (removed,), 0.0, notes, start, budget)
    if not step.accepted:
        report.notes.append(f"the budget ({budget:g}) refused {what}: it would lose {step.quality_loss:.4g}; "
                            f"the model is returned unchanged")
        return report, original
    return report, trial


@dataclass(frozen=True)
class SizeTarget:
    """Remove ``unit``s until the model holds at most ``fraction`` of the original's ``measure``."""

    measure: str  # "params" or "kv_bytes"
    fraction: float
    unit: str

    def size(self, gm: fx.GraphModule) -> int:
        return parameter_count(gm) if self.measure == "params" else kv_bytes_per_token(gm)

    def met(self, current: fx.GraphModule, original: fx.GraphModule) -> bool:
        return self.size(current) <= self.fraction * self.size(original)

    def __str__(self) -> str:
        return f"{self.measure}={self.fraction:g} (at most {self.fraction:.0%} of the original's)"


def _size_target(asked: dict[str, float], params: Optional[float], kv_bytes: Optional[float],
                 unit: Optional[str]) -> Optional[SizeTarget]:
    """The size target asked for with ``params=`` or ``kv_bytes=``, checked; None when a count was given."""
    given = {k: v for k, v in (("params", params), ("kv_bytes", kv_bytes)) if v is not None}
    if not given:
        return None
    if len(given) > 1 or asked:
        raise InputError(f"ask for a count (layers=, attention_sublayers=, mlp_sublayers=, heads=) or one size "
                         f"target (params= or kv_bytes=), not several; got {asked or ''} {given}")
    (measure, fraction), = given.items()
    if not isinstance(fraction, float) or not 0 < fraction < 1:
        raise InputError(f"{measure}= is the fraction of the original to keep at most, between 0 and 1; got {fraction!r}")
    unit = unit or "layers"
    allowed = ("layers", "attention_sublayers") + (("mlp_sublayers",) if measure == "params" else ())
    if unit not in allowed:
        raise InputError(f"{measure}= removes one of {allowed} (unit=), not {unit!r}")
    return SizeTarget(measure, fraction, unit)


def _candidates(unit: str, branches: list[Branch]) -> list[tuple[str, ...]]:
    if unit == "layers":
        return [tuple(b.name for b in layer.branches) for layer in find_layers(branches)]
    kind = "attention" if unit == "attention_sublayers" else "mlp"
    return [(b.name,) for b in branches if b.kind == kind]


def _score(scorer: str, current: fx.GraphModule, candidates: list[tuple[str, ...]], scoring: Optional[Judge],
           cal: list[Batch], cache_dir: Optional[str]) -> dict[tuple[str, ...], float]:
    if scorer == "loss":
        return {c: scoring.measure(drop_branches(current, set(c))).loss_against(scoring.original) for c in candidates}
    branches = find_branches(current.graph)
    stats = stream_statistics(current, branches, find_layers(branches), cal, cache_dir)
    return {c: stats["+".join(c)] for c in candidates}


def _repair(original: fx.GraphModule, trial: fx.GraphModule, order: list[str], removed: set[str], new: set[str],
            cal: list[Batch], ridge: Optional[float]) -> tuple[fx.GraphModule, list[str]]:
    """Repair the gap (run of removed branches, in graph order) that holds the newly removed ones."""
    positions = sorted(order.index(n) for n in new)
    start = positions[0]
    while start > 0 and order[start - 1] in removed:
        start -= 1
    end = positions[-1]
    while end + 1 < len(order) and order[end + 1] in removed:
        end += 1
    if start == 0:
        return trial, [f"no repair of {order[0]}…: no branch before it"]
    repaired, note = repair_gap(original, trial, order[start - 1], order[end], cal, ridge)
    return (repaired if repaired is not None else trial), [note]


def _finish(gm: fx.GraphModule, optimized: OptimizedModule) -> OptimizedModule:
    report = dataclasses.replace(optimized.report, ops=count_dialect_ops(gm))  # the source's report is left as it is
    program = lower(gm, report.backend)
    report.lowered = dict(getattr(program, "lowered", {}))
    return OptimizedModule(gm, report, optimized.fixed_kwargs, program, optimized.static_dims)


@dataclass(frozen=True)
class Timer:
    """Latency of a graph as the compressed module will run it: lowered for ``backend``, called on ``batch``."""

    batch: Batch
    backend: str
    rounds: int = 3

    def __call__(self, gm: fx.GraphModule) -> float:
        """Median milliseconds of one call, after a warm-up call."""
        program = lower(gm, self.backend)
        times = []
        with torch.no_grad():
            program(**self.batch)
            for _ in range(self.rounds):
                start = time.perf_counter()
                program(**self.batch)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3


def parameter_count(gm: nn.Module) -> int:
    """Number of weights the module holds (each tensor once)."""
    return sum(p.numel() for p in gm.parameters())  # parameters() yields a shared tensor once


def kv_bytes_per_token(gm: fx.GraphModule) -> int:
    """Bytes of K and V one token adds to a KV cache: over the graph's attention ops, Hkv·(Dk + Dv)·itemsize,
    and over its latent-attention ops, G·(R + Dr)·itemsize (the latent and the rotary key)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is OPS["attention"]:
            k, v = node.args[1].meta["val"], node.args[2].meta["val"]
            total += k.shape[1] * (k.shape[-1] + v.shape[-1]) * k.element_size()
        elif node.op == "call_function" and node.target is OPS["latent_attention"]:
            latent, rope = node.args[2].meta["val"], node.args[3].meta["val"]
            total += latent.shape[1] * (latent.shape[-1] + rope.shape[-1]) * latent.element_size()
    return total
