"""GPU benchmarks of the Triton back end: kernels and end-to-end prefill, side by side with the alternatives.

Run from the repository root on a machine with a CUDA GPU (writes
``benchmarks/results/gpu-<gpu>.md`` and ``gpu-<gpu>-attention.svg``):

    python benchmarks/gpu.py                 # everything (about 10 minutes on an H100)
    python benchmarks/gpu.py --only attention,memory --quick
    python benchmarks/gpu.py --dry-run       # print the plan; needs no GPU

Three parts:

* ``attention``: forward, bfloat16, head dim 64 and 128, causal and not,
  sequence 512 to 16K at 16K tokens per batch (batch = 16384 // seq) and
  2048 // head_dim heads: TFLOP/s of ``fxfuse.kernels.attention`` against
  ``scaled_dot_product_attention`` restricted to each backend (flash, cuDNN,
  efficient) and against eager matmul-softmax-matmul.
* ``memory``: rms_norm (+ residual), layer_norm, the SwiGLU/GeGLU gate, GELU
  and rope on LLaMA-1B-sized activations: achieved GB/s and its fraction of
  the GPU's copy bandwidth (measured here with a device-to-device copy),
  against eager torch and Liger-Kernel's kernels when ``liger_kernel`` imports.
* ``e2e``: a LLaMA-style model with the shapes of a 1B-parameter model
  (Llama 3.2 1B: hidden 2048, 16 layers, 32 heads, 8 key/value heads, MLP
  8192; random weights, bfloat16), prefill at batch 1 × 2048 and 8 × 512:
  latency of eager ``transformers`` (SDPA attention), ``torch.compile``
  (default inductor) and ``fxfuse.optimize(backend="triton")``.

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed
between runs), every competitor measured in the same process.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PARTS = ("attention", "memory", "e2e")
COMMAND = "python benchmarks/gpu.py"
RESULTS = ROOT / "benchmarks" / "results"
TOKENS = 16384  # tokens per attention call: batch × sequence
HIDDEN = 2048  # heads × head dim in the attention sweep (a 1B model's width)
SEQS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQS = (1024, 4096)

# Llama 3.2 1B
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
E2E_SHAPES = ((1, 2048), (8, 512))


@dataclass
class Case:
    part: str
    name: str
    params: dict[str, Any]


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += [""] + [f"{n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def plan(parts: tuple[str, ...], quick: bool) -> list[Case]:
    """Every measurement the run will take, in order."""
    cases: list[Case] = []
    if "attention" in parts:
        for d in (64, 128):
            for causal in (False, True):
                for seq in (QUICK_SEQS if quick else SEQS):
                    cases.append(Case("attention", f"d{d}-{'causal' if causal else 'full'}-s{seq}",
                                      dict(batch=max(1, TOKENS // seq), heads=HIDDEN // d, seq=seq, d=d,
                                           causal=causal)))
    if "memory" in parts:
        tokens = 4096 if quick else 16384
        for op in ("rms_norm", "add_rms_norm", "layer_norm", "swiglu", "geglu", "gelu", "rope"):
            cases.append(Case("memory", op, dict(tokens=tokens, hidden=LLAMA_1B["hidden_size"],
                                                 inter=LLAMA_1B["intermediate_size"])))
    if "e2e" in parts:
        for batch, seq in (E2E_SHAPES[:1] if quick else E2E_SHAPES):
            cases.append(Case("e2e", f"llama1b-b{batch}x{seq}", dict(batch=batch, seq=seq)))
    return cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    p.add_argument("--out", type=Path, default=None, help="result file (default results/gpu-<gpu>.md)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    args = p.parse_args(argv)
    parts = tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {PARTS}")
    args.parts = parts
    return args


# ---------------------------------------------------------------- measuring


def bench(fn: Callable[[], Any], rep: int) -> float:
    """Median milliseconds of ``fn``."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def guarded(fn: Callable[[], float]) -> float | str:
    """A time, or the reason there is none (out of memory, an unsupported backend)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as e:  # a backend that refuses these inputs is a cell, not a crash
        torch.cuda.empty_cache()
        return f"n/a ({type(e).__name__})"


def fmt(x: float | str, digits: int = 1) -> str:
    return x if isinstance(x, str) else f"{x:.{digits}f}"


def machine() -> dict[str, str]:
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:
        driver = "unknown"
    info = {
        "GPU": f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)",
        "driver": driver, "CUDA (torch)": str(torch.version.cuda), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import importlib.metadata

        info["liger-kernel"] = importlib.metadata.version("liger-kernel")
    except Exception:
        info["liger-kernel"] = "not installed"
    return info


# ---------------------------------------------------------------- attention


def run_attention(cases: list[Case], rep: int) -> tuple[Table, dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from fxfuse.kernels import attention

    backends = {"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
                "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION}
    impls = ["fxfuse", *backends, "eager"]
    table = Table("Attention forward, bfloat16 (TFLOP/s; higher is better)",
                  ["head dim", "causal", "seq", "batch×heads", *impls, "fxfuse / flash", "fxfuse / best SDPA"])
    series: dict = {}
    for case in cases:
        p = case.params
        shape = (p["batch"], p["heads"], p["seq"], p["d"])
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * p["batch"] * p["heads"] * p["seq"] ** 2 * p["d"] * (0.5 if p["causal"] else 1.0)

        def eager():
            s = (q @ k.transpose(-1, -2)) * (p["d"] ** -0.5)
            if p["causal"]:
                s = s.masked_fill(torch.ones(p["seq"], p["seq"], device="cuda", dtype=torch.bool).triu(1),
                                  float("-inf"))
            return torch.softmax(s.float(), -1).to(v.dtype) @ v

        def sdpa_with(backend):
            def run():
                with sdpa_kernel([backend]):
                    return sdpa(q, k, v, is_causal=p["causal"])
            return run

        fns = {"fxfuse": lambda: attention(q, k, v, is_causal=p["causal"]), "eager": eager}
        fns.update({name: sdpa_with(b) for name, b in backends.items()})
        tflops = {}
        for name, fn in fns.items():
            ms = guarded(lambda fn=fn: bench(fn, rep))
            tflops[name] = ms if isinstance(ms, str) else flops / (ms * 1e-3) / 1e12
            series.setdefault((p["d"], p["causal"], name), []).append((p["seq"], tflops[name]))
        ours = tflops["fxfuse"]
        sdpas = [tflops[n] for n in backends if not isinstance(tflops[n], str)]
        ratio_flash = "-" if isinstance(ours, str) or isinstance(tflops["SDPA flash"], str) \
            else f"{ours / tflops['SDPA flash']:.2f}"
        ratio_best = "-" if isinstance(ours, str) or not sdpas else f"{ours / max(sdpas):.2f}"
        table.rows.append([str(p["d"]), "yes" if p["causal"] else "no", str(p["seq"]),
                           f"{p['batch']}×{p['heads']}", *(fmt(tflops[n]) for n in impls), ratio_flash, ratio_best])
        del q, k, v
        torch.cuda.empty_cache()
    table.notes.append(f"FLOPs = 4·B·H·S²·D (halved when causal); batch = {TOKENS} // seq, heads = {HIDDEN} // D.")
    return table, series


# ---------------------------------------------------------------- memory-bound ops


def copy_bandwidth(rep: int) -> float:
    """GB/s of a device-to-device copy of 1 GiB: the ceiling for the memory-bound kernels."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _liger(op: str):
    """Liger-Kernel's function for ``op`` (or None): (args) → output, as its modules call them."""
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            return lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps)
        if op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
        if op == "geglu":
            from liger_kernel.ops.geglu import LigerGELUMulFunction
            return LigerGELUMulFunction.apply
        if op == "rope":
            from liger_kernel.ops.rope import LigerRopeFunction
            return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)
    except ImportError:
        return None
    return None


def run_memory(cases: list[Case], rep: int) -> Table:
    import torch.nn.functional as F

    import fxfuse  # noqa: F401  (the dialect ops: eager references)
    from fxfuse import kernels

    ops = torch.ops.fxfuse
    peak = copy_bandwidth(rep)
    table = Table(f"Memory-bound kernels, bfloat16 (GB/s, and fraction of the {peak:.0f} GB/s copy bandwidth)",
                  ["op", "shape", "fxfuse GB/s", "fxfuse / copy", "eager GB/s", "Liger GB/s", "fxfuse / eager"])
    bf = dict(device="cuda", dtype=torch.bfloat16)
    for case in cases:
        p, op = case.params, case.name
        t, h, inter = p["tokens"], p["hidden"], p["inter"]
        liger = _liger("rms_norm" if op == "add_rms_norm" else op)
        if op in ("rms_norm", "add_rms_norm", "layer_norm"):
            x, r, w, b = torch.randn(t, h, **bf), torch.randn(t, h, **bf), torch.randn(h, **bf), torch.randn(h, **bf)
            shape = f"{t}×{h}"
            if op == "rms_norm":
                nbytes = 2 * x.numel() * 2
                ours, eager = (lambda: kernels.rms_norm(x, w, 1e-6)), (lambda: ops.rms_norm(x, w, 1e-6))
                theirs = liger and (lambda: liger(x, w, 1e-6))
            elif op == "add_rms_norm":
                nbytes = 4 * x.numel() * 2
                ours = lambda: kernels.rms_norm(x, w, 1e-6, residual=r)  # noqa: E731
                eager = lambda: ops.add_rms_norm(x, r, w, 1e-6)  # noqa: E731
                theirs = liger and (lambda: liger(x + r, w, 1e-6))
            else:
                nbytes = 2 * x.numel() * 2
                ours = lambda: kernels.layer_norm(x, w, b, 1e-5)  # noqa: E731
                eager = lambda: F.layer_norm(x, (h,), w, b, 1e-5)  # noqa: E731
                theirs = liger and (lambda: liger(x, w, b, 1e-5))
        elif op in ("swiglu", "geglu", "gelu"):
            g, u = torch.randn(t, inter, **bf), torch.randn(t, inter, **bf)
            shape = f"{t}×{inter}"
            act = "silu" if op == "swiglu" else "gelu_tanh"
            if op == "gelu":
                nbytes = 2 * g.numel() * 2
                ours, eager = (lambda: kernels.gelu(g, "tanh")), (lambda: F.gelu(g, approximate="tanh"))
                theirs = None
            else:
                nbytes = 3 * g.numel() * 2
                ours = lambda: kernels.gated_mlp_act(g, u, act)  # noqa: E731
                eager = lambda: ops.gated_mlp_act(g, u, act)  # noqa: E731
                theirs = liger and (lambda: liger(g, u))
        else:  # rope on (B, H, S, D) q and (B, Hkv, S, D) k, cos/sin (1, S, D)
            heads, kv, d = LLAMA_1B["num_attention_heads"], LLAMA_1B["num_key_value_heads"], h // 32
            seq = 2048
            batch = max(1, t // seq)
            q, k = torch.randn(batch, heads, seq, d, **bf), torch.randn(batch, kv, seq, d, **bf)
            cos, sin = torch.randn(1, 1, seq, d, **bf), torch.randn(1, 1, seq, d, **bf)
            shape = f"q {batch}×{heads}×{seq}×{d}, k ×{kv}"
            nbytes = 2 * (q.numel() + k.numel()) * 2
            ours = lambda: kernels.rope(q, k, cos, sin)  # noqa: E731
            eager = lambda: ops.rope(q, k, cos, sin)  # noqa: E731
            theirs = liger and (lambda: liger(q.clone(), k.clone(), cos[0], sin[0]))  # Liger rotates in place
        gbs = {}
        for name, fn in (("fxfuse", ours), ("eager", eager), ("liger", theirs)):
            if not fn:
                gbs[name] = "not installed" if name == "liger" and liger is None else "-"
                continue
            ms = guarded(lambda fn=fn: bench(fn, rep))
            gbs[name] = ms if isinstance(ms, str) else nbytes / (ms * 1e-3) / 1e9
        ratio = "-" if isinstance(gbs["fxfuse"], str) or isinstance(gbs["eager"], str) \
            else f"{gbs['fxfuse'] / gbs['eager']:.2f}"
        frac = "-" if isinstance(gbs["fxfuse"], str) else f"{gbs['fxfuse'] / peak:.2f}"
        table.rows.append([op, shape, fmt(gbs["fxfuse"], 0), frac, fmt(gbs["eager"], 0), fmt(gbs["liger"], 0), ratio])
        torch.cuda.empty_cache()
    table.notes.append("Bytes are the minimum traffic: each input read once, each output written once. "
                       "Liger's rope includes two clones (it rotates in place); its add_rms_norm row is an add "
                       "plus its RMSNorm.")
    return table


# ---------------------------------------------------------------- end to end


def run_e2e(cases: list[Case], rep: int) -> Table:
    import transformers

    import fxfuse
    from fxfuse.ir.numerics import compare

    table = Table("End to end: LLaMA-1B-shaped prefill, bfloat16 (ms; lower is better)",
                  ["shape", "eager (sdpa)", "torch.compile", "fxfuse triton", "fxfuse vs eager", "fxfuse vs compile",
                   "fxfuse max rel. error"])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA_1B)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa",
                                               torch_dtype=torch.bfloat16).cuda().eval()
    compiled = torch.compile(model)
    for case in cases:
        b, s = case.params["batch"], case.params["seq"]
        ids = torch.randint(0, config.vocab_size, (b, s), device="cuda")
        mask = torch.ones_like(ids)
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        with torch.no_grad():
            optimized = fxfuse.optimize(model, example_kwargs={"input_ids": ids, "attention_mask": mask},
                                        backend="triton")
            reference = model(**kwargs)
            error = compare(reference, optimized(**kwargs)).max_error
            times = {
                "eager": guarded(lambda: bench(lambda: model(**kwargs), rep)),
                "compile": guarded(lambda: bench(lambda: compiled(**kwargs), rep)),
                "fxfuse": guarded(lambda: bench(lambda: optimized(**kwargs), rep)),
            }
        f = times["fxfuse"]

        def speedup(other):
            return "-" if isinstance(f, str) or isinstance(times[other], str) else f"{times[other] / f:.2f}×"

        table.rows.append([f"{b}×{s}", fmt(times["eager"], 2), fmt(times["compile"], 2), fmt(f, 2),
                           speedup("eager"), speedup("compile"), f"{error:.1e}"])
    table.notes.append("Random weights; `transformers` LlamaModel (no LM head), use_cache=False; torch.compile with "
                       "the default inductor settings, compiled once and warmed up by do_bench.")
    return table


# ---------------------------------------------------------------- report


def svg_plot(series: dict, path: Path) -> None:
    """Attention TFLOP/s against sequence length, one panel per (head dim, causal); plain SVG, no dependency."""
    panels = sorted({(d, c) for d, c, _ in series})
    names = sorted({n for _, _, n in series}, key=lambda n: (n != "fxfuse", n))
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#7f7f7f", "#9467bd"]
    w, h, pad = 360, 260, 45
    top = max([y for pts in series.values() for _, y in pts if not isinstance(y, str)] + [1.0])
    seqs = sorted({x for pts in series.values() for x, _ in pts})
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(panels)}" height="{h + 60}" '
             f'font-family="sans-serif" font-size="11">']
    for i, (d, causal) in enumerate(panels):
        ox = i * w
        parts.append(f'<text x="{ox + w / 2}" y="14" text-anchor="middle">head dim {d}, '
                     f'{"causal" if causal else "not causal"} (TFLOP/s vs seq)</text>')
        parts.append(f'<rect x="{ox + pad}" y="20" width="{w - pad - 10}" height="{h - 40}" fill="none" stroke="#999"/>')

        def px(seq, ox=ox):
            span = max(math.log2(seqs[-1]) - math.log2(seqs[0]), 1)
            return ox + pad + (math.log2(seq) - math.log2(seqs[0])) / span * (w - pad - 10)

        def py(y):
            return 20 + (h - 40) * (1 - y / top)

        for seq in seqs:
            parts.append(f'<text x="{px(seq):.1f}" y="{h - 6}" text-anchor="middle">{seq}</text>')
        for frac in (0, 0.5, 1.0):
            parts.append(f'<text x="{ox + pad - 4}" y="{py(top * frac) + 4:.1f}" text-anchor="end">'
                         f'{top * frac:.0f}</text>')
        for j, name in enumerate(names):
            pts = [(x, y) for x, y in series.get((d, causal, name), []) if not isinstance(y, str)]
            if len(pts) > 1:
                line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
                parts.append(f'<polyline points="{line}" fill="none" stroke="{colors[j % len(colors)]}" '
                             f'stroke-width="{2.5 if name == "fxfuse" else 1.5}"/>')
    for j, name in enumerate(names):
        parts.append(f'<text x="{10 + 130 * j}" y="{h + 40}" fill="{colors[j % len(colors)]}">■ {name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = plan(args.parts, args.quick)
    if args.dry_run:
        print(f"{len(cases)} measurements ({', '.join(args.parts)}{', quick' if args.quick else ''}):")
        for c in cases:
            print(f"  {c.part:9s} {c.name:24s} {c.params}")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    info = machine()
    gpu = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-").lower()
    out = args.out or RESULTS / f"gpu-{gpu}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections, series = [], {}
    by_part = {part: [c for c in cases if c.part == part] for part in args.parts}
    for part, part_cases in by_part.items():
        print(f"== {part}: {len(part_cases)} measurements", flush=True)
        try:
            if part == "attention":
                table, series = run_attention(part_cases, args.rep)
            elif part == "memory":
                table = run_memory(part_cases, args.rep)
            else:
                table = run_e2e(part_cases, args.rep)
            sections.append(table.markdown())
            print(table.markdown(), flush=True)
        except Exception:
            sections.append(f"### {part}\n\nfailed:\n\n```\n{traceback.format_exc()}\n```\n")
            print(sections[-1], flush=True)
    plot = None
    if series:
        plot = out.with_name(out.stem + "-attention.svg")
        svg_plot(series, plot)
    header = [f"# GPU benchmarks: {info['GPU']}", "",
              f"Command: `{COMMAND} {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + ", "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    header += [f"- {k}: {v}" for k, v in info.items()] + [""]
    if plot is not None:
        header += [f"![attention TFLOP/s]({plot.name})", ""]
    out.write_text("\n".join(header) + "\n" + "\n".join(sections))
    print(f"wrote {out}" + (f" and {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
