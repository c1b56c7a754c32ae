"""benchmarks/gpu_check.py in its CPU mode, so that the GPU check cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_passes():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "gradwatch gpu_check on CPU" in out and "all correctness checks passed" in out
    for check in ("| exact ", "| sync ", "| spike ", "| cost ", "| memory "):
        assert check in out, check
    assert "80/80 exact" in out  # every fused configuration, float32, against float64
