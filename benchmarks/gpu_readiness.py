"""Ahead-of-time compilation of every fxfuse Triton kernel for A100 (sm_80) and H100 (sm_90), without a GPU.

Run from the repository root (writes ``benchmarks/results/gpu-readiness.md``):

    python benchmarks/gpu_readiness.py                # the covering set: ~550 compiles (the 30 latent-attention ones added since the last full run), about 30 min on 2 shared cores
    python benchmarks/gpu_readiness.py --quick        # the small set the test compiles
    python benchmarks/gpu_readiness.py --jobs 4 --out /tmp/ready.md --json /tmp/ready.json
    python benchmarks/gpu_readiness.py --reuse /tmp/ready.json   # recompile only jobs that changed

Each kernel is compiled the way its launcher would launch it: the jit
function's own argument binder specializes arguments built as the launcher
builds them (meta tensors stand in for CUDA tensors: same dtypes, strides and
16-byte alignment), then ``triton.compile`` runs to a cubin for the target.
From each compiled kernel it reads the shared memory (the kernel metadata),
registers and spills (the ``ptxas -v`` log), the tensor-core instructions in
the PTX and, for attention, an occupancy estimate.

Compilation runs in worker processes started with TRITON_INTERPRET=0 (under
the interpreter ``triton.jit`` gives functions that cannot be compiled), so
the check behaves the same whatever the calling process has set.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_launches import DTYPES, HEAD_DIMS, TARGETS, Job, config_dict, launch, plan  # noqa: E402

COMMAND = "python benchmarks/gpu_readiness.py"
REPORT = ROOT / "benchmarks" / "results" / "gpu-readiness.md"
__all__ = ["DTYPES", "HEAD_DIMS", "TARGETS", "Job", "Result", "compile_job", "config_dict", "markdown", "occupancy",
           "plan", "run_jobs", "summary"]


@dataclass
class Result:
    """What compiling a job gave: the error, or the resources of the compiled kernel."""

    job: Job
    ok: bool
    error: str = ""
    shared: int = 0
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    tensor_cores: list[str] = field(default_factory=list)
    num_warps: int = 0
    seconds: float = 0.0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


# ---------------------------------------------------------------- compiling (in a worker process)

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_TENSOR_CORE = re.compile(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.aligned\.[\w.]+)")


def compile_job(job: Job) -> Result:
    """Compile ``job`` for its target with the jit function's own specialization; read its resources.

    Needs a process where TRITON_INTERPRET is off (see :func:`run_jobs`).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    start = time.perf_counter()
    try:
        fn, args, kwargs = launch(job)
        backend = make_backend(GPUTarget("cuda", TARGETS[job.target].arch, 32))
        # The JIT's binder and packer: the signature, constexprs (ints equal to 1, None)
        # and divisibility attributes a real launch with these arguments would get.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas -v, printed because TRITON_DUMP_PTXAS_LOG=1
            kernel = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs),
                                    target=backend.target, options=options.__dict__)
    except Exception as e:  # a compile error is a result, not a crash
        first = str(e).strip().splitlines()
        return Result(job, False, error=f"{type(e).__name__}: {first[0] if first else ''}"[:300],
                      seconds=time.perf_counter() - start)
    text = log.getvalue()
    used, spills = _PTXAS_USED.search(text), _PTXAS_SPILLS.search(text)
    if used is None or spills is None:
        return Result(job, False, error="no ptxas -v resource lines in the compile log",
                      seconds=time.perf_counter() - start)
    return Result(
        job, True, shared=kernel.metadata.shared, regs=int(used.group(1)), stack=int(spills.group(1)),
        spill_stores=int(spills.group(2)), spill_loads=int(spills.group(3)),
        tensor_cores=sorted(set(_TENSOR_CORE.findall(kernel.asm["ptx"]))), num_warps=kernel.metadata.num_warps,
        seconds=time.perf_counter() - start,
    )


def _worker(jobs_file: Path) -> int:
    """Compile the jobs in ``jobs_file`` (JSON lines), one JSON result line each on stdout."""
    import warnings
    warnings.filterwarnings("ignore")
    for line in jobs_file.read_text().splitlines():
        r = compile_job(Job(**json.loads(line)))
        sys.stdout.write(json.dumps(asdict(r)) + "\n")
        sys.stdout.flush()
    return 0


def run_jobs(jobs: list[Job], workers: int | None = None, progress: bool = False) -> list[Result]:
    """Compile ``jobs`` in ``workers`` processes (default: one per CPU) with the interpreter off."""
    results = [Result(j, False, error="not compiled (pruned)") for j in jobs if j.skip]
    todo = [j for j in jobs if not j.skip]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    lock = threading.Lock()

    def collect(proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            d = json.loads(line)
            with lock:
                results.append(Result(**dict(d, job=Job(**d["job"]))))
                if progress and len(results) % 25 == 0:
                    print(f"  {len(results)}/{len(jobs)} done", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="fxfuse-aot-") as tmp:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(Path(tmp) / "cache"),
                   TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        procs, readers = [], []
        for i in range(workers):
            # Interleaved shares: every worker gets a mix of large and small kernels.
            jobs_file = Path(tmp) / f"jobs{i}.jsonl"
            jobs_file.write_text("".join(json.dumps(asdict(j)) + "\n" for j in todo[i::workers]))
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(jobs_file)],
                                    env=env, text=True, stdout=subprocess.PIPE, cwd=ROOT)
            reader = threading.Thread(target=collect, args=(proc,))
            reader.start()
            procs.append(proc)
            readers.append(reader)
        for proc, reader in zip(procs, readers):
            reader.join()
            if proc.wait() != 0:
                raise RuntimeError(f"an ahead-of-time compile worker exited with status {proc.returncode}")
    if len(results) != len(jobs):
        raise RuntimeError(f"{len(jobs) - len(results)} of {len(jobs)} jobs gave no result")
    order = {j.key() + j.target: i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r.job.key() + r.job.target])


# ---------------------------------------------------------------- reading the results


def occupancy(r: Result) -> tuple[int, str]:
    """(resident blocks per SM, what limits it) from registers, shared memory and threads."""
    t = TARGETS[r.job.target]
    warps = r.num_warps
    regs_per_warp = -(-max(r.regs, 1) * 32 // t.reg_alloc_unit) * t.reg_alloc_unit
    limits = {
        "registers": t.regs_per_sm // (regs_per_warp * warps),
        "shared memory": t.smem_per_sm // (r.shared + t.smem_reserved) if r.shared else t.blocks_per_sm,
        "threads": t.threads_per_sm // (warps * 32),
        "blocks": t.blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def over_shared(r: Result) -> bool:
    return r.ok and r.shared > TARGETS[r.job.target].smem_per_block


def tensor_core_kind(r: Result) -> str:
    """"wgmma", "mma.sync" (with its input type), or "-"."""
    kinds = []
    for ins in r.tensor_cores:
        kind = "wgmma" if ins.startswith("wgmma") else "mma.sync"
        ty = next((t for t in ("tf32", "bf16", "f16") if f".{t}" in ins), "")
        kinds.append(f"{kind} {ty}".strip())
    return ", ".join(sorted(set(kinds))) or "-"


def _config_text(c: dict | None) -> str:
    if c is None:
        return "(no autotune)"
    kw = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c["kwargs"].items())
    return f"{kw} w{c['num_warps']} s{c['num_stages']}"


def _params_text(j: Job) -> str:
    p = j.params
    if j.family.startswith("attn-"):
        extra = f" hkv{p['hkv']}" if p["hkv"] != 8 else ""
        rows = f" rows{(p['hq'] // p['hkv']) * p['sq']}" if j.family == "attn-decode" else ""
        return f"{p['dtype']} d{p['d']}{rows}{extra}" + (f" splits{p['splits']}" if p["splits"] > 1 else "")
    return " ".join(f"{k}={v}" for k, v in p.items())


def _cell(r: Result | None, attention: bool) -> list[str]:
    if r is None:
        return ["", "", "", "", ""] + ([""] if attention else [])
    if not r.ok:
        status = "not compiled" if r.job.skip else f"FAILED: {r.error}"
        return [status, "", "", "", ""] + ([""] if attention else [])
    spill = f"{r.spill_stores}/{r.spill_loads}" if r.spills else "0"
    shared = f"{r.shared / 1024:.0f}K" + (" OVER" if over_shared(r) else "")
    cells = ["ok", shared, str(r.regs), spill, tensor_core_kind(r)]
    if attention:
        blocks, limiter = occupancy(r)
        cells.append(f"{blocks} ({limiter})" if blocks else f"0 ({limiter})")
    return cells


def shared_estimate(r: Result) -> int:
    """The pruning's shared-memory estimate for an attention job (``fxfuse.kernels.attention``)."""
    import importlib

    import torch

    attention = importlib.import_module("fxfuse.kernels.attention")
    p, c = r.job.params, r.job.config
    dtype = getattr(torch, p["dtype"])
    dims = attention.head_constexprs(dtype, p["d"], p["d"])
    rows = (p["hq"] // p["hkv"]) * p["sq"]
    block_m = c["kwargs"]["BLOCK_M"] if "BLOCK_M" in c["kwargs"] else max(16, 1 << (rows - 1).bit_length())
    return attention.shared_memory_estimate(block_m, c["kwargs"]["BLOCK_N"], dims["BLOCK_D"], dims["BLOCK_DV"],
                                            c["num_stages"], dtype.itemsize, TARGETS[r.job.target].arch,
                                            mask=p["variant"].get("mask", "none") != "none")


def summary(results: list[Result]) -> dict[str, Any]:
    """Per target: compiled, failed, spilling, over shared memory (all, and among the configs the pruning
    keeps), what the pruning drops and how its model compares with the compiles, occupancy, tensor cores."""
    out = {}
    for t in TARGETS:
        rs = [r for r in results if r.job.target == t and not r.job.skip]
        if not rs:
            continue
        ok = [r for r in rs if r.ok]
        att = [r for r in ok if r.job.family.startswith("attn-")]
        occ = [occupancy(r)[0] for r in att if r.job.pruned is None]
        pruned = [r for r in results if r.job.target == t and r.job.pruned is not None]
        out[t] = dict(
            jobs=len(rs), compiled=len(ok), failed=len(rs) - len(ok),
            spilling=sum(r.spills for r in ok), spilling_kept=sum(r.spills for r in ok if r.job.pruned is None),
            over_shared=sum(over_shared(r) for r in ok),
            over_shared_kept=sum(over_shared(r) for r in ok if r.job.pruned is None),
            max_shared=max((r.shared for r in ok if r.job.pruned is None), default=0),
            pruned=len(pruned), skipped=sum(r.job.skip for r in pruned),
            pruned_shared=sum(r.job.pruned.startswith("shared") for r in pruned),
            pruned_registers=sum(r.job.pruned.startswith("registers") for r in pruned),
            pruned_fine=sum(r.ok and not r.spills and not over_shared(r) for r in pruned),
            estimate_below=sum(r.shared > shared_estimate(r) for r in att),
            occupancy=(min(occ), max(occ)) if occ else (0, 0),
            no_tensor_cores_16bit=sum(1 for r in att if r.job.params["dtype"] != "float32" and not r.tensor_cores),
            tensor_cores={dt: sorted({tensor_core_kind(r) for r in att if r.job.params["dtype"] == dt})
                          for dt in DTYPES},
        )
    return out


def markdown(results: list[Result], meta: dict[str, str]) -> str:
    """The report: summary first, then one table per kernel family with both targets side by side."""
    s = summary(results)
    lines = ["# GPU readiness: ahead-of-time compilation for sm_80 and sm_90", ""]
    for t, v in s.items():
        lo, hi = v["occupancy"]
        cores = "; ".join(f"{dt}: {', '.join(kinds)}" for dt, kinds in v["tensor_cores"].items() if kinds)
        lines.append(
            f"**{t} ({TARGETS[t].gpu})**: {v['compiled']}/{v['jobs']} compiled, {v['failed']} failed; "
            f"spilling: {v['spilling']} ({v['spilling_kept']} kept by the pruning); over "
            f"{TARGETS[t].smem_per_block // 1024} KB shared: {v['over_shared']} ({v['over_shared_kept']} kept); "
            f"max shared of a kept config {v['max_shared'] / 1024:.0f} KB; attention occupancy {lo}-{hi} "
            f"blocks/SM (kept configs); 16-bit attention without tensor cores: {v['no_tensor_cores_16bit']}; "
            f"attention tensor-core instructions: {cores}.")
        lines.append("")
        lines.append(
            f"Pruning on {t}: {v['pruned']} configs dropped ({v['pruned_shared']} for shared memory, "
            f"{v['pruned_registers']} for registers; {v['skipped']} listed, not compiled); {v['pruned_fine']} of "
            f"the dropped configs compiled without spills or overflow (the model is conservative there); compiled "
            f"attention kernels above the pruning's shared-memory estimate: {v['estimate_below']}.")
        lines.append("")
    kept_bad = [r for r in results if r.ok and r.job.pruned is None and (r.spills or over_shared(r))]
    if kept_bad:
        lines.append("Kept by the pruning and still spilling or over shared memory:")
        lines += [f"- {r.job.target} {r.job.family} {r.job.label} {_params_text(r.job)} {_config_text(r.job.config)}: "
                  f"{r.regs} registers, spills {r.spill_stores}/{r.spill_loads} B, shared {r.shared / 1024:.0f} KB"
                  for r in kept_bad]
        lines.append("")
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "Each kernel is compiled by `triton.compile` for `GPUTarget(\"cuda\", arch, 32)` with the jit function's "
        "own argument specialization, applied to arguments built as the launcher builds them (meta tensors: "
        "contiguous, 16-byte aligned; sequence length 1000, not a multiple of 16). Shared memory is the kernel "
        "metadata's `shared`; registers and spills come from the `ptxas -v` log of that compile; tensor-core "
        "instructions are the `mma.sync` / `wgmma.mma_async` instructions of the PTX.",
        "",
        "Limits: sm_80 (A100) 164 KB shared memory per SM, 163 KB per block (opt-in); sm_90 (H100) 228 KB per SM, "
        "227 KB per block; both: 65536 registers and 2048 threads (64 warps) per SM, at most 32 blocks per SM, "
        "registers allocated per warp in units of 256, 1 KB of shared memory reserved per resident block "
        "(CUDA C++ Programming Guide, technical specifications per compute capability). Occupancy = the least of "
        "65536 / (warp registers × warps), shared per SM / (shared + 1 KB), 2048 / (32 × warps) and 32.",
        "",
        "Covering set (`--quick` compiles the quick one): " + " ".join(plan.__doc__.split("\n", 2)[2].split()) + " Decoding: 4 query heads per key/value "
        "head, one new token (16-row blocks), 16 key splits; the JIT specializes an argument equal to 1, so the "
        "one-key/value-head prefill is a kernel of its own. Head dims 80 and 96 compile as the launcher runs them: "
        "padded to 128 (BLOCK_D) with masked loads (EVEN_D false). The `pruned` column gives the reason the "
        "launcher's pruning (`fxfuse.kernels.attention.prune`, with each target's limits) drops a config; "
        "dropped configs are compiled too where the row says so, to check the reason.",
        "",
        "float32 attention runs its dots with `input_precision=\"ieee\"` (the launcher's choice, for float32 "
        "accuracy): no tf32, no tensor cores, FMA units; hence its small tiles.",
        "",
    ]
    families = list(dict.fromkeys(r.job.family for r in results))
    targets = [t for t in TARGETS if t in s]
    for fam in families:
        attention = fam.startswith("attn-")
        head = ["variant", "launch", "config", "pruned"]
        sub = ["compiled", "shared", "regs", "spills st/ld", "tensor cores"] + (["blocks/SM"] if attention else [])
        cols = head + [f"{t} {c}" for t in targets for c in sub]
        lines += [f"## {fam}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        rows: dict[str, dict[str, Result]] = {}
        for r in results:
            if r.job.family == fam:
                rows.setdefault(r.job.key(), {})[r.job.target] = r
        for by_target in rows.values():
            j = next(iter(by_target.values())).job
            pruned = "; ".join(f"{t}: {r.job.pruned}" for t, r in by_target.items() if r.job.pruned)
            cells = [j.label, _params_text(j), _config_text(j.config), pruned]
            for t in targets:
                cells += _cell(by_target.get(t), attention)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _ptxas_versions() -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    out = []
    for arch in sorted({t.arch for t in TARGETS.values()}):
        text = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
        rel = re.search(r"release ([\d.]+)", text)
        out.append(f"sm_{arch}: {rel.group(1) if rel else 'unknown'}")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    """Compile the plan (or read the results of an earlier run), print the summary, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the small set the test compiles")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--out", type=Path, default=REPORT)
    parser.add_argument("--json", type=Path, default=None,
                        help="write every result (and the run's details) as JSON here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="write the report from an earlier run's --json instead of compiling")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier run's --json: take its results for the same jobs, compile only the others "
                             "(valid while the kernels' device code has not changed since)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        results = [Result(**dict(d, job=Job(**d["job"]))) for d in saved["results"]]
        meta = dict(saved["meta"], report=f"written from that run's results by `{COMMAND} --from-json`")
    else:
        results, meta = _run(args)
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    text = markdown(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n".join(line for line in text.splitlines()[2:] if line.startswith(("**", "Pruning"))))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> tuple[list[Result], dict[str, str]]:
    """Compile the plan; the results and what the report says about the run."""
    import torch
    import triton
    from benchmarks.machine import cpu_name

    jobs = plan(quick=args.quick)
    earlier: dict[str, Result] = {}
    if args.reuse is not None:
        for d in json.loads(args.reuse.read_text())["results"]:
            r = Result(**dict(d, job=Job(**d["job"])))
            if r.ok:
                earlier[r.job.key() + r.job.target] = r
    reused = [Result(**dict(asdict(earlier[j.key() + j.target]), job=j)) for j in jobs
              if not j.skip and j.key() + j.target in earlier]
    todo = [j for j in jobs if j.skip or j.key() + j.target not in earlier]
    print(f"{sum(not j.skip for j in todo)} kernels to compile ({len(reused)} reused)", file=sys.stderr)
    start = time.perf_counter()
    done = {r.job.key() + r.job.target: r for r in reused + run_jobs(todo, args.jobs, progress=True)}
    results = [done[j.key() + j.target] for j in jobs]
    elapsed = time.perf_counter() - start
    command = COMMAND + (" --quick" if args.quick else "")
    workers = args.jobs or os.cpu_count()
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": f"`{command}` ({elapsed / 60:.1f} min with {workers} worker processes"
                   + (f"; {len(reused)} results reused from an earlier run of the same kernels" if reused else "")
                   + ")",
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, no GPU needed",
        "versions": f"triton {triton.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
                    f"ptxas {_ptxas_versions()}",
    }
    return results, meta


if __name__ == "__main__":
    sys.exit(main())
