"""`make bench-gpu` on a machine without CUDA: one clear line, exit 0, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would really run")
def test_bench_gpu_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu_pipeline.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_pipeline.py"), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().count("\n") == 0 and "no CUDA device" in r.stdout and not out.exists()
