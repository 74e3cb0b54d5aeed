"""``python -m benchmarks host-ab``: this checkout against a commit, in one process.

Run against HEAD itself (the same code on both sides): every call of ``host`` is compared,
the launch counts of the two sides agree, and the ratios are finite positive numbers. No
timing is asserted (CI machines are shared).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
CALLS = {"clip_grad_norm_", "clip_grad_norm_(return_stats)", "grad_stats", "get_total_norm",
         "grad_stats(histogram)", "GradMonitor.step(max_norm)"}  # fmt: skip


@pytest.mark.slow
def test_host_ab_against_head_compares_every_call(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the baseline comes from git archive)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "host-ab", "--baseline", "HEAD", "--rounds", "1",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [path] = tmp_path.glob("host-ab-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["meta"]["baseline"] == "HEAD"
    rows = result["rows"]
    for workload in ("gpt2-124m", "tiny10k"):
        assert {r["call"] for r in rows if r["workload"] == workload} == CALLS
    for row in rows:
        assert row["launches_baseline"] == row["launches_ours"] >= 2, row
        ratio = row["ours_over_baseline"]
        assert math.isfinite(ratio) and ratio > 0, row
        assert row["min"] <= ratio <= row["max"], row
