"""Fusion coverage of fxfuse, Inductor and ONNX Runtime on the model zoo.

Run from the repository root:

    python benchmarks/coverage.py [--only bert,llama] [--no-inductor] [--no-ort] [--out PATH]

For every zoo architecture × attention implementation (``tests/zoo/models.py``
``CASES``) it reports how many attention blocks, norms (and of those, norms
fused with their residual add), MLP activations and rotary embeddings fxfuse
fused against the count a full fusion gives, fxfuse's max relative error on
the example input and on an input of another batch and sequence size; how many
attention blocks end up as an SDPA-family op in the post-grad graph that
Inductor lowers (default ``torch.compile`` config); and how many attention
blocks and norms ONNX Runtime's transformers optimizer fuses in the ONNX
graph of the eager-attention model exported with ``torch.onnx.export(...,
dynamo=True)``. Below the table, every row with fewer fused blocks than
expected lists fxfuse's rejections (rule, node, reason). The markdown goes to
``benchmarks/results/coverage.md``.

One function per column source: ``fxfuse_columns``, ``inductor_columns``,
``ort_columns``; each returns a ``Columns`` (cells, tallies, reasons) and never
raises for one model.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import io
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.ir.numerics import compare  # noqa: E402
from tests.zoo.models import CASES, LAYERS  # noqa: E402

COMMAND = "python benchmarks/coverage.py"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "coverage.md"
EXAMPLE_SHAPE = (2, 8)  # (batch, seq) fxfuse optimizes with
OTHER_SHAPE = (3, 11)  # a second input fxfuse's graph must also get right (seed 1)


@dataclass
class Columns:
    """What one column source says about one row: table cells, fused/expected tallies, and why not fused."""

    cells: dict[str, str]
    fused: Counter = field(default_factory=Counter)
    expected: Counter = field(default_factory=Counter)
    why: list[str] = field(default_factory=list)

    def count(self, key: str, got: int, expected: int) -> str:
        """Record ``got`` of ``expected`` under ``key`` and return the ``got/expected`` cell."""
        self.fused[key] += got
        self.expected[key] += expected
        return mark(got, expected)


# ONNX Runtime transformers optimizer: the closest entry of
# onnxruntime.transformers.optimizer.MODEL_TYPES for each zoo architecture.
# ORT's own LLaMA conversion script uses "gpt2" for decoder-only models; encoders
# without a type of their own get "bert". Architectures not named here use their
# config.model_type when ORT knows it, else "bert".
ORT_MODEL_TYPE = {
    "bert": "bert", "distilbert": "bert", "deberta-v2": "bert", "whisper": "bert",
    "gpt2": "gpt2", "opt": "gpt2", "llama": "gpt2", "mistral": "gpt2", "qwen2": "gpt2", "mixtral": "gpt2",
    "phi3": "gpt2", "gemma": "gpt2", "gemma2": "gpt2", "falcon": "gpt2", "bloom": "gpt2", "gptj": "gpt2",
    "gpt_neox": "gpt_neox", "qwen3": "qwen3", "phi": "phi",
    "t5": "t5", "bart": "bart", "vit": "vit", "clip_text": "clip", "clip_vision": "vit",
}
ORT_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                     "PackedMultiHeadAttention", "DecoderAttention", "DecoderMaskedMultiHeadAttention",
                     "DecoderMaskedSelfAttention", "PagedAttention", "SparseAttention"}
ORT_NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization"}
ORT_SKIP_NORM_OPS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}


# --------------------------------------------------------------------------- helpers


def quiet() -> None:
    """Silence the warnings and log chatter of torch.export, the ONNX exporter, ORT and transformers."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch", "torch.onnx", "torch._dynamo", "torch._inductor", "torch.export", "onnxscript",
                 "onnx_ir", "onnxruntime", "onnxruntime.transformers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # onnxruntime.transformers modules log through their own module-named loggers.
    logging.getLogger().setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Swallow what a third-party call prints to stdout/stderr (exporter progress, optimizer notes)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def short(exc: BaseException, limit: int = 120) -> str:
    """One line naming the exception: the innermost cause's type and first line (wrappers say less)."""
    text = str(exc)
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if missing:  # the dynamo exporter's root cause is buried in a chained message
        return f"no ONNX function for {missing.group(1)}"
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def call_kwargs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """The zoo inputs plus ``use_cache=False`` where the model takes it (as fxfuse's capture does)."""
    kwargs = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return kwargs


def ratio(got: int, expected: int) -> str:
    return f"{got}/{expected}"


def mark(got: int, expected: int) -> str:
    """``got/expected``, bold when it differs from the expected count."""
    text = ratio(got, expected)
    return f"**{text}**" if got != expected else text


# --------------------------------------------------------------------------- fxfuse


def fxfuse_columns(spec: Any, impl: str) -> Columns:
    """Optimize one zoo case with fxfuse: fused/expected counts, errors on two inputs, and why not fused.

    ``why`` lists fxfuse's rejections (rule, node, reason) and skipped
    passes when the row is short of an expected count, and any failure.
    """
    col = Columns({})
    model = spec.build(impl)
    try:
        with muted():
            opt = fxfuse.optimize(model, example_kwargs=spec.inputs(*EXAMPLE_SHAPE), on_failure="skip")
    except Exception as exc:  # one model's failure is a cell, not a crash
        reason = short(exc)
        col.cells.update(attention=f"failed: {reason}", norms="-", mlp="-", rope="-", err_example="-", err_other="-")
        col.count("attention", 0, spec.attention)
        col.why.append(f"optimize() failed: {reason}")
        return col
    report = opt.report
    ops = report.ops
    residual = ops.get(f"add_{spec.norm_op}", 0)
    norms = ops.get(spec.norm_op, 0) + residual
    col.cells["attention"] = col.count("attention", ops.get("attention", 0), spec.attention)
    col.cells["norms"] = (f"{col.count('norms', norms, spec.norms)} "
                          f"({col.count('residual norms', residual, spec.residual_norms)} residual)")
    if spec.mlp_op is None:
        col.cells["mlp"] = "-"
    else:
        expected = LAYERS + getattr(spec, "extra_mlp_ops", 0)  # one per layer, plus any outside the layers
        col.cells["mlp"] = f"{col.count('MLP activations', ops.get(spec.mlp_op, 0), expected)} {spec.mlp_op}"
    rope = ops.get("rope", 0)
    col.cells["rope"] = "-" if spec.rope == 0 and rope == 0 else col.count("rope", rope, spec.rope)
    col.cells["err_example"] = "-" if report.max_error is None else f"{report.max_error:.1e}"

    inputs = spec.inputs(*OTHER_SHAPE, seed=1)
    try:
        with torch.no_grad():
            outcome = compare(model(**inputs, **opt.fixed_kwargs), opt(**inputs))
        col.cells["err_other"] = f"{outcome.max_error:.1e}" if outcome.ok else f"**FAIL** {outcome.detail}"
        if not outcome.ok:
            col.why.append(f"outputs differ on the {OTHER_SHAPE[0]}×{OTHER_SHAPE[1]} input: {outcome.detail}")
    except Exception as exc:
        col.cells["err_other"] = f"failed: {short(exc)}"
        col.why.append(f"the optimized module failed on the {OTHER_SHAPE[0]}×{OTHER_SHAPE[1]} input: {short(exc)}")

    short_of = any(col.fused[k] < col.expected[k] for k in col.expected)
    if short_of:
        col.why += [f"`{r.rule}` at `{r.node}`{f' in `{r.module}`' if r.module else ''}: {r.reason}"
                    for r in report.rejections]
    col.why += [f"pass `{p.name}` skipped: {p.error}" for p in report.skipped]
    if short_of and not col.why:
        col.why.append("no rejection recorded (no rule came close to matching the missing blocks)")
    col.why += [f"more {k} fused than the zoo expects ({col.fused[k]}/{col.expected[k]}): "
                "a fusion the zoo's count does not know of, or a stale expected count"
                for k in col.expected if col.fused[k] > col.expected[k]]
    return col


# --------------------------------------------------------------------------- Inductor


def inductor_columns(spec: Any, impl: str) -> Columns:
    """Compile one zoo case with Inductor (default config) and count SDPA-family ops it lowers.

    A ``post_grad_custom_post_pass`` sees each inference graph after all of
    Inductor's FX passes (its joint-graph pattern matcher, which holds the
    ``fuse_attention`` SDPA patterns, runs on inference graphs too), just
    before lowering. Its ``uuid()`` is None, which turns off the FX graph
    cache, so the passes really run on every compile.
    """
    from torch._dynamo.utils import counters
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass

    class CountSdpa(CustomInferenceAwareGraphPass):
        def __init__(self) -> None:
            self.counts: Counter = Counter()
            self.graphs = 0

        def __call__(self, graph: torch.fx.Graph, is_inference: bool) -> None:
            if not is_inference:
                return
            self.graphs += 1
            for node in graph.nodes:
                if node.op == "call_function" and "scaled_dot_product" in str(node.target):
                    name = str(node.target).removeprefix("aten.").removesuffix(".default")
                    self.counts[name.removeprefix("_scaled_dot_product_") or name] += 1

        def uuid(self) -> Any:
            return None

    torch._dynamo.reset()
    counters.clear()
    counter = CountSdpa()
    model = spec.build(impl)
    try:
        with config.patch(post_grad_custom_post_pass=counter), muted(), torch.no_grad():
            compiled = torch.compile(model, backend="inductor")
            compiled(**call_kwargs(model, spec.inputs(*EXAMPLE_SHAPE)))
    except Exception as exc:
        col = Columns({"inductor": f"compile failed: {short(exc)}"})
        col.count(f"attention ({impl} rows)", 0, spec.attention)
        return col
    finally:
        torch._dynamo.reset()
    col = Columns({})
    cell = col.count(f"attention ({impl} rows)", sum(counter.counts.values()), spec.attention)
    rewrites = counters["inductor"].get("fuse_attention", 0)
    col.fused[f"pattern-matcher rewrites ({impl} rows)"] += rewrites
    details = [", ".join(f"{k}×{v}" for k, v in sorted(counter.counts.items()))] if counter.counts else []
    if rewrites:
        details.append(f"{rewrites} by pattern matcher")
    if counter.graphs != 1:
        details.append(f"{counter.graphs} graphs")
    col.cells["inductor"] = cell + (f" ({'; '.join(details)})" if details else "")
    return col


# --------------------------------------------------------------------------- ONNX Runtime


def ort_model_type(spec: Any, model: nn.Module) -> str:
    """The ORT optimizer model type closest to this architecture."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    if spec.name in ORT_MODEL_TYPE:
        return ORT_MODEL_TYPE[spec.name]
    hf_type = getattr(getattr(model, "config", None), "model_type", "")
    return hf_type if hf_type in MODEL_TYPES else "bert"


def ort_impl(spec: Any) -> str:
    """The attention implementation ORT is measured on: eager (plain ops ORT can pattern-match) where built."""
    impls = tuple(getattr(spec, "impls", ("eager",)))
    return "eager" if "eager" in impls or not impls else impls[0]


def ort_columns(spec: Any, workdir: str) -> Columns:
    """Export the eager-attention model with the dynamo ONNX exporter and run ORT's transformers optimizer.

    Counts attention (Attention, MultiHeadAttention, GroupQueryAttention, …)
    and normalization nodes (LayerNormalization, SimplifiedLayerNormalization,
    their Skip* residual forms, EmbedLayerNormalization) in the optimized
    graph. If the optimizer crashes with the closest model type, it is run
    again with "bert" and the cell says so.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = spec.build(ort_impl(spec))
    path = os.path.join(workdir, f"{spec.name}.onnx")
    try:
        with muted(), torch.no_grad():
            torch.onnx.export(model, (), path, kwargs=call_kwargs(model, spec.inputs(*EXAMPLE_SHAPE)), dynamo=True)
    except Exception as exc:
        col = Columns({"ort_attention": f"export failed: {short(exc)}", "ort_norms": "-"})
        col.fused["export failures"] += 1
        return col
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    model_type = ort_model_type(spec, model)
    note = model_type
    try:
        with muted():
            optimized = optimize_model(path, model_type=model_type, num_heads=heads, hidden_size=hidden)
    except Exception as exc:
        note = f"{model_type} crashed ({short(exc, 60)}); bert"
        try:
            with muted():
                optimized = optimize_model(path, model_type="bert", num_heads=heads, hidden_size=hidden)
        except Exception as exc2:
            col = Columns({"ort_attention": f"optimizer failed: {short(exc2)}", "ort_norms": "-"})
            col.fused["optimizer failures"] += 1
            return col
    ops = Counter(node.op_type for node in optimized.model.graph.node)
    attention = sum(n for op, n in ops.items() if op in ORT_ATTENTION_OPS)
    norms = sum(n for op, n in ops.items() if op in ORT_NORM_OPS)
    skip = sum(n for op, n in ops.items() if op in ORT_SKIP_NORM_OPS)
    col = Columns({})
    col.cells["ort_attention"] = f"{col.count('attention', attention, spec.attention)} ({note})"
    col.cells["ort_norms"] = f"{col.count('norms', norms, spec.norms)} ({skip} skip)"
    col.fused["Skip* (residual) norms"] += skip
    return col


# --------------------------------------------------------------------------- report


COLUMNS = [
    ("arch", "arch"), ("impl", "impl"), ("attention", "attention"), ("norms", "norms (residual-fused)"),
    ("mlp", "MLP act"), ("rope", "rope"), ("err_example", f"max err {EXAMPLE_SHAPE[0]}×{EXAMPLE_SHAPE[1]}"),
    ("err_other", f"max err {OTHER_SHAPE[0]}×{OTHER_SHAPE[1]}"), ("inductor", "Inductor SDPA"),
    ("ort_attention", "ORT attention (model type)"), ("ort_norms", "ORT norms"),
]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def header(seconds: float, argv: list[str]) -> list[str]:
    cpu = platform.processor() or platform.machine()
    versions = ", ".join(f"{m} {_version(m)}" for m in ("torch", "transformers", "onnxruntime", "onnx", "onnxscript"))
    command = " ".join([COMMAND, *argv])
    return [
        "# Fusion coverage on the model zoo",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {platform.system()} {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        f"- versions: python {platform.python_version()}, {versions}",
        f"- command (from the repository root): `{command}` ({seconds / 60:.1f} min)",
        "",
        "Counts are fused/expected (the expected counts are the zoo's, `tests/zoo/models.py`); **bold** differs "
        "from the expected count. Columns:",
        "",
        f"- *attention, norms, MLP act, rope*: fxfuse ops in `opt.report.ops` after "
        f"`fxfuse.optimize(model, example_kwargs=spec.inputs({EXAMPLE_SHAPE[0]}, {EXAMPLE_SHAPE[1]}))` "
        "(norms = plain + residual-fused; MLP act: one per layer, plus any outside the layers).",
        f"- *max err*: max relative output error of the optimized module vs the model, on the example input "
        f"and on a {OTHER_SHAPE[0]}×{OTHER_SHAPE[1]} input (seed 1; image and audio inputs have a fixed "
        "length, so only the batch size changes).",
        "- *Inductor SDPA*: SDPA-family ATen ops in the post-grad inference graph Inductor lowers, with "
        "`torch.compile(model, backend=\"inductor\")` and the default config, run once under `no_grad`; "
        "\"by pattern matcher\" counts Inductor's `fuse_attention` rewrites.",
        "- *ORT*: ONNX Runtime's `onnxruntime.transformers.optimizer.optimize_model` on the **eager**-attention "
        "model exported with `torch.onnx.export(..., dynamo=True)` (shown on the eager row; per architecture). "
        "Attention = Attention/MultiHeadAttention/GroupQueryAttention/…; norms = LayerNormalization, "
        "SimplifiedLayerNormalization, EmbedLayerNormalization and the Skip* (residual-fused) forms "
        "(the exporter itself already emits LayerNormalization for `aten.layer_norm`; ORT fuses the RMS norms "
        "and the residual adds). If the optimizer crashes with the closest model type, the cell says so and "
        "shows the counts with `bert`.",
        "",
    ]


@dataclass
class Row:
    """One table row: a zoo case and the ``Columns`` each source contributed."""

    arch: str
    impl: str
    sources: dict[str, Columns] = field(default_factory=dict)

    @property
    def cells(self) -> dict[str, str]:
        cells = {"arch": self.arch, "impl": self.impl}
        for col in self.sources.values():
            cells.update(col.cells)
        return cells


def table(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = row.cells
        lines.append("| " + " | ".join(cells.get(key, "-") for key, _ in COLUMNS) + " |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    """Fused/expected totals per source over all rows it ran on."""
    lines = ["", "## Totals", ""]
    for source in ("fxfuse", "Inductor", "ORT"):
        cols = [row.sources[source] for row in rows if source in row.sources]
        if not cols:
            continue
        fused: Counter = sum((c.fused for c in cols), Counter())
        expected: Counter = sum((c.expected for c in cols), Counter())
        parts = [f"{key} {fused[key]}/{expected[key]}" for key in expected]
        parts += [f"{key} {fused[key]}" for key in fused if key not in expected]
        what = "architectures" if source == "ORT" else "rows"
        line = f"- **{source}** ({len(cols)} {what}): " + ", ".join(parts)
        if source == "fxfuse":
            full = sum(all(c.fused[k] >= c.expected[k] for k in c.expected) for c in cols)
            line += f"; rows fully fused {full}/{len(cols)}"
        lines.append(line)
    return lines


def not_fused(rows: list[Row]) -> list[str]:
    lines = ["", "## Not fused, and why (fxfuse)", "",
             "Rows whose fxfuse counts differ from the zoo's, with fxfuse's rejections (rule, node, reason) "
             "and skipped passes.", ""]
    listed = [(row, row.sources["fxfuse"].why) for row in rows if row.sources["fxfuse"].why]
    if not listed:
        return lines + ["None: every row has its expected counts, and fxfuse skipped no pass."]
    for row, why in listed:
        lines.append(f"- **{row.arch}-{row.impl}**")
        lines += [f"  - {w}" for w in why]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated zoo names (default: the whole zoo)")
    parser.add_argument("--no-inductor", action="store_true", help="skip the Inductor column")
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime columns")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else argv
    quiet()

    names = [n for n in args.only.split(",") if n]
    known = {spec.name for spec, _ in CASES}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown zoo names {unknown}; known: {sorted(known)}")
    cases = [(spec, impl) for spec, impl in CASES if not names or spec.name in names]

    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fxfuse-coverage-") as workdir:
        for i, (spec, impl) in enumerate(cases, 1):
            row = Row(spec.name, impl)
            times = []
            t0 = time.perf_counter()
            row.sources["fxfuse"] = fxfuse_columns(spec, impl)
            times.append(f"fxfuse {time.perf_counter() - t0:.1f}s")
            if not args.no_inductor:
                t0 = time.perf_counter()
                row.sources["Inductor"] = inductor_columns(spec, impl)
                times.append(f"inductor {time.perf_counter() - t0:.1f}s")
            if not args.no_ort and impl == ort_impl(spec):
                t0 = time.perf_counter()
                row.sources["ORT"] = ort_columns(spec, workdir)
                times.append(f"ort {time.perf_counter() - t0:.1f}s")
            rows.append(row)
            cells = row.cells
            print(f"[{i}/{len(cases)}] {spec.name}-{impl}: attention {cells['attention']}, norms {cells['norms']}, "
                  f"inductor {cells.get('inductor', '-')}, ort {cells.get('ort_attention', '-')} "
                  f"({', '.join(times)})", flush=True)
    seconds = time.perf_counter() - start

    text = "\n".join(header(seconds, raw_argv) + table(rows) + summary(rows) + not_fused(rows)) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
