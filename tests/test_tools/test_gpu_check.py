"""``python -m benchmarks gpu-check`` runs here too: it says it needs CUDA (issue 9 item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_every_step_has_a_limit_and_together_they_fit_one_device_call():
    assert set(gpu_check.STEPS) == set(gpu_check.LIMITS_S)
    assert list(gpu_check.STEPS) == [
        "pytest", "big-tensor", "cuda-graph", "no-sync", "host", "histogram", "benchmark",
        "plan-safety", "step-latency",
    ]  # fmt: skip
    assert sum(gpu_check.LIMITS_S.values()) <= 600  # one call of the device tool


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this runs for real")
def test_without_cuda_it_says_so_and_records_skipped_steps(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "gpu-check", "--out", str(tmp_path)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr
    [path] = tmp_path.glob("gpu-check-none-*.json")
    result = json.loads(path.read_text())
    assert result["ok"] is None
    assert all(s["status"] == "skipped: needs CUDA" for s in result["steps"].values())


@pytest.mark.slow
def test_the_plan_safety_checks_that_need_no_cuda_run_here():
    """Issue 19 items 14-15 of ``plan-safety`` run on this device (interpreted on a CPU);
    the graph and stream checks need CUDA and are exercised only by gpu-check itself."""
    from fastgradstats import kernels

    mp = pytest.MonkeyPatch()
    mp.setattr(kernels, "BLOCK", 1024)
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result = gpu_check._check_threads(device, calls=3)
        assert result["ok"], result
        assert gpu_check._check_duplicates(device)["ok"]
    finally:
        mp.undo()
