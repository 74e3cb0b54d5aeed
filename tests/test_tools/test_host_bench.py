"""``python -m benchmarks host --quick`` runs and reports launches per call (issue 9 item 5).

No timing is asserted here (CI machines are shared); the benchmark itself judges its
targets in a full run. The launch counts, though, are exact and checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_host_benchmark_quick_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "host", "--quick", "--device", "cpu",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [path] = tmp_path.glob("host-cpu-*.json")
    result = json.loads(path.read_text())
    assert set(result["workloads"]) == {"gpt2-124m", "tiny10k"}
    assert result["workloads"]["gpt2-124m"]["tensors"] == 148
    assert result["workloads"]["tiny10k"]["tensors"] == 10_000
    for workload in result["workloads"].values():
        ops = workload["ops"]
        assert ops["floor"]["launches"] == 0
        assert ops["clip_grad_norm_"]["launches"] == 3
        assert ops["clip_grad_norm_(return_stats)"]["launches"] == 3
        assert ops["grad_stats"]["launches"] == 2
        assert ops["get_total_norm"]["launches"] == 2
        for name in ("clip_grad_norm_", "clip_grad_norm_(return_stats)"):
            assert ops[name]["ratio_to_floor"] > 0 and "target" in ops[name]
    rows = result["backward_stats"]  # backward_stats on the Triton path (issue 18)
    assert [row["tensors"] for row in rows] == [148, 10_000]
    for row in rows:  # one stats launch per bucket during backward, ONE finalize after
        assert row["launches_backward"] == row["buckets"] and row["launches_finalize"] == 1
        assert row["hook_us_per_tensor"] == row["hook_us_per_tensor"]  # not NaN
        assert "ok" in row and row["hook_target_us"] == 3.0 and row["finalize_target"] == 1.5
    assert "host targets" in proc.stdout and "backward_stats" in proc.stdout
