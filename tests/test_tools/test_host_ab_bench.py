"""``python -m benchmarks host-ab``: this checkout against a commit, in one process.

Run against HEAD itself (the same code on both sides): every call of ``host`` is compared,
the launch counts of the two sides agree, and the ratios are finite positive numbers. No
timing is asserted (CI machines are shared).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import run_benchmark

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
CALLS = {"clip_grad_norm_", "clip_grad_norm_(return_stats)", "grad_stats", "get_total_norm",
         "grad_stats(histogram)", "GradMonitor.step(max_norm)"}  # fmt: skip


@pytest.mark.slow
def test_host_ab_against_head_compares_every_call(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the baseline comes from git archive)")
    result, _ = run_benchmark(["benchmarks", "host-ab", "--baseline", "HEAD", "--rounds", "1"],
                           tmp_path, "host-ab-cpu-*.json", interpreter=True)  # fmt: skip
    assert result["meta"]["baseline"] == "HEAD"
    rows = result["rows"]
    for workload in ("gpt2-124m", "tiny10k"):
        assert {r["call"] for r in rows if r["workload"] == workload} == CALLS
    for row in rows:
        assert row["launches_baseline"] == row["launches_ours"] >= 2, row
        ratio = row["ours_over_baseline"]
        assert math.isfinite(ratio) and ratio > 0, row
        assert row["min"] <= ratio <= row["max"], row
