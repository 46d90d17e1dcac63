"""The differential fuzzer: random blocks in real-world spellings, optimized, compared with the original.

Each generated block (``tests/fuzz/grammar.py``) is optimized from an example
(with an all-True mask half the time: the benign example most users pass),
must fuse what ``expected_ops`` says, and must give the block's outputs on
fresh inputs with padded masks, at the example's shape and at another batch
size and sequence length, in float32 or bfloat16. Everything runs under
``fxfuse.errors.strict()``, so a rule that raises fails here too.

CI runs ``--fuzz-modules`` blocks (300) from ``--fuzz-seed`` (0), split over
two worker processes (capture with dynamic shapes takes most of a block's
second). A longer run: ``pytest tests/fuzz --fuzz-modules 5000 --fuzz-seed 1``.
Hypothesis shrinks a failure to a minimal ``Spec``; each one found becomes a
named case in ``test_regressions.py``.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import torch
from hypothesis import HealthCheck, given, seed, settings

import fxfuse
from fxfuse.errors import strict
from fxfuse.ir.numerics import compare
from tests.fuzz.grammar import Block, Spec, expected_ops, make_inputs, specs

NORM_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")
WORKERS = 2


def check_block(spec: Spec) -> dict[str, int]:
    """Optimize the block ``spec`` spells and hold it to its expected fusion and to the block's outputs."""
    torch.manual_seed(0)
    block = Block(spec).eval().to(getattr(torch, spec.dtype))
    example = make_inputs(spec, spec.batch, spec.seq, seed=0, all_true=spec.all_true_example)
    opt = fxfuse.optimize(block, example)
    ops = opt.report.ops
    want = expected_ops(spec)
    got = {"attention": ops.get("attention", 0), "norms": sum(ops.get(k, 0) for k in NORM_OPS),
           **{k: ops.get(k, 0) for k in want if k not in ("attention", "norms")}}
    assert got == want, f"{spec}\nfused {ops}, expected {want}\n{opt.report}"
    for i, (batch, seq) in enumerate([(spec.batch, spec.seq), (spec.batch + 1, spec.seq + 3)]):
        inputs = make_inputs(spec, batch, seq, seed=i + 1)
        with torch.no_grad():
            outcome = compare(block(*inputs), opt(*inputs))
        assert outcome.ok, f"{spec}\nat batch {batch} × seq {seq}: {outcome.detail}\n{opt.report}"
    return ops


def fuzz(modules: int, seed_value: int) -> tuple[Counter, str | None]:
    """Check ``modules`` generated blocks from ``seed_value``: (counts, the shrunk failure or None)."""
    stats: Counter = Counter()

    @seed(seed_value)
    @settings(max_examples=modules, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(specs())
    def run(spec: Spec) -> None:
        ops = check_block(spec)
        stats["modules"] += 1
        stats.update(f"fused {k}" for k, v in ops.items() for _ in range(v))

    try:
        with strict():
            run()
    except Exception as e:  # the minimal failing Spec is in the exception's notes
        return stats, "".join(traceback.format_exception(e))[-6000:]
    return stats, None


def _worker(modules: int, seed_value: int) -> tuple[Counter, str | None]:
    warnings.simplefilter("ignore")  # pytest's warning filters do not reach a spawned process
    torch.set_num_threads(1)
    return fuzz(modules, seed_value)


def test_generated_blocks_fuse_and_keep_their_outputs(request):
    modules = request.config.getoption("--fuzz-modules")
    base_seed = request.config.getoption("--fuzz-seed")
    start = time.perf_counter()
    shares = [modules // WORKERS + (i < modules % WORKERS) for i in range(WORKERS)]
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_worker, shares, [base_seed * WORKERS + i for i in range(WORKERS)]))
    stats = sum((r[0] for r in results), Counter())
    print(f"\nfuzzer: {stats['modules']} blocks in {time.perf_counter() - start:.0f} s; {dict(sorted(stats.items()))}")
    failures = [r[1] for r in results if r[1]]
    assert not failures, failures[0]
    assert stats["modules"] >= modules
