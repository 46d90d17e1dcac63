"""The Triton kernels compile for A100 (sm_80) and H100 (sm_90) without a GPU: benchmarks/gpu_readiness.py --quick.

One compile run per module (about a minute on 2 cores): the base attention
variant at head dim 128 in float16 with the prefill configs the pruning keeps
and the first it drops for registers, the deepest prefill pipeline at head dim
256 (dropped for shared memory), one split-KV decode config, the split
reduction, DeepSeek-V3's latent attention decoding step and each norm, rope and
activation kernel once, for both targets.
Independent of TRITON_INTERPRET: the compiles run in worker processes with
the interpreter off, and the plan reads the launchers' full config lists.
"""

from __future__ import annotations

import sys

import pytest
import torch
import triton

from tests.helpers import benchmark_script


@pytest.fixture(scope="module")
def ready():
    yield from benchmark_script("gpu_readiness.py", "fxfuse_benchmarks_gpu_readiness")


@pytest.fixture(scope="module")
def results(ready):
    return ready.run_jobs(ready.plan(quick=True), workers=2)


def test_the_quick_set_covers_every_kernel(ready):
    jobs = ready.plan(quick=True)
    families = {j.family for j in jobs}
    assert families == {"attn-prefill", "attn-decode", "latent-attn", "split-reduce", "rms_norm", "layer_norm",
                        "rope", "gated_act", "gelu"}
    for target in ready.TARGETS:
        prefill = [j for j in jobs if j.target == target and j.family == "attn-prefill"]
        assert sum(j.pruned is None for j in prefill) >= 4
        assert any(j.pruned and j.pruned.startswith("registers") for j in prefill)
        assert any(j.pruned and j.pruned.startswith("shared memory") for j in prefill)


def test_everything_compiles(results):
    failed = [(r.job.family, r.job.target, r.job.config, r.error) for r in results if not r.ok]
    assert not failed


def test_kept_configs_fit_and_do_not_spill(ready, results):
    kept = [r for r in results if r.ok and r.job.pruned is None]
    assert {r.job.target for r in kept} == set(ready.TARGETS)
    spills = [(r.job.family, r.job.target, r.job.config, r.spill_stores) for r in kept if r.spills]
    assert not spills
    over = [(r.job.family, r.job.target, r.job.config, r.shared) for r in kept if ready.over_shared(r)]
    assert not over


def test_pruning_removes_every_config_that_spills_or_does_not_fit(ready, results):
    """The launchers' hooks, asked about each target's limits, drop what the compiles show to be bad."""
    bad = [r for r in results if r.ok and (r.spills or ready.over_shared(r))]
    kept_bad = [(r.job.target, r.job.config) for r in bad if r.job.pruned is None]
    assert not kept_bad
    prefill = [r for r in results if r.job.family == "attn-prefill"]
    assert any(r.job.pruned is None for r in prefill)  # something is left to tune over


def test_shared_memory_estimate_bounds_the_compiled_kernels(results):
    """The pruning's estimate never under-counts what the compiler allocates (else it would keep a misfit)."""
    from fxfuse.kernels.attention import head_constexprs, shared_memory_estimate

    checked = 0
    for r in results:
        if r.ok and r.job.family == "attn-prefill":
            p, c = r.job.params, r.job.config
            dims = head_constexprs(getattr(torch, p["dtype"]), p["d"], p["d"])
            est = shared_memory_estimate(c["kwargs"]["BLOCK_M"], c["kwargs"]["BLOCK_N"], dims["BLOCK_D"],
                                         dims["BLOCK_DV"], c["num_stages"], getattr(torch, p["dtype"]).itemsize,
                                         int(r.job.target[3:]), mask=p["variant"].get("mask", "none") != "none")
            assert r.shared <= est, (r.job.target, c, r.shared, est)
            checked += 1
    assert checked >= 20


def test_the_largest_head_dim_256_tiles_exceed_shared_memory_and_are_pruned(ready, results):
    big = [r for r in results if r.job.family == "attn-prefill" and r.job.params["d"] == 256]
    assert {r.job.target for r in big} == set(ready.TARGETS)
    for r in big:
        assert r.ok and ready.over_shared(r), (r.job.target, r.shared)
        assert r.job.pruned is not None and r.job.pruned.startswith("shared memory"), r.job.pruned


def test_prune_reason_names_the_limit():
    from fxfuse.kernels.attention import prune_reason

    dims = dict(block_d=256, block_dv=256, elem_bytes=2)
    deep = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)
    assert prune_reason(deep, **dims, capability=80, max_shared=163 * 1024).startswith("shared memory")
    assert prune_reason(deep, **dims, capability=90, max_shared=227 * 1024).startswith("registers")
    wide = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    assert prune_reason(wide, **dims, capability=80, max_shared=163 * 1024) is None
    spills = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3)
    assert prune_reason(spills, block_d=128, block_dv=128, elem_bytes=2, capability=90,
                        max_shared=227 * 1024).startswith("registers")


def test_fp16_attention_uses_tensor_cores(ready, results):
    att = [r for r in results if r.ok and r.job.family.startswith("attn-")]
    assert att
    for r in att:
        kinds = ready.tensor_core_kind(r)
        if r.job.target == "sm_80":
            assert kinds == "mma.sync f16", (r.job.config, kinds)
        else:
            assert kinds in ("wgmma f16", "mma.sync f16"), (r.job.config, kinds)
    # Hopper's warpgroup MMA wherever a block has the 64 rows per warpgroup it needs
    wide = [r for r in att if r.job.target == "sm_90" and r.job.config["kwargs"].get("BLOCK_M", 16) >= 64]
    assert wide and all(ready.tensor_core_kind(r) == "wgmma f16" for r in wide)


def test_occupancy_reads_the_limits(ready, results):
    r = next(r for r in results if r.ok and r.job.family == "attn-prefill" and r.job.target == "sm_80")
    blocks, limiter = ready.occupancy(r)
    assert 1 <= blocks <= 32 and limiter in ("registers", "shared memory", "threads", "blocks")
    t = ready.TARGETS["sm_80"]
    assert blocks * (r.shared + t.smem_reserved) <= t.smem_per_sm
    assert blocks * r.num_warps * 32 <= t.threads_per_sm


def test_independent_of_the_interpreter_flag(ready):
    """The plan reads the launchers' full config lists, whatever TRITON_INTERPRET does to ``tuned()``."""
    attention = sys.modules["fxfuse.kernels.attention"]
    full = [ready.config_dict(c) for c in attention._prefill_configs()]
    jobs = ready.plan(quick=True)
    configs = [j.config for j in jobs if j.family == "attn-prefill" and j.target == "sm_80" and j.params["d"] == 128]
    assert len(full) > 1 and all(c in full for c in configs)


def test_report(ready, results, tmp_path):
    text = ready.markdown(results, {"command": "`python benchmarks/gpu_readiness.py --quick`"})
    for target in ready.TARGETS:
        assert f"**{target} (" in text and f"Pruning on {target}:" in text
    assert "## attn-prefill" in text and "## rms_norm" in text and "blocks/SM" in text
    assert "FAILED" not in text
    data = [r for r in results if r.job.family == "attn-prefill"]
    assert ready.summary(data)["sm_90"]["estimate_below"] == 0
