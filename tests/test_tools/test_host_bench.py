"""``python -m benchmarks host --quick`` runs and reports launches per call (issue 9 item 5).

No timing is asserted here (CI machines are shared); the benchmark itself judges its
targets in a full run. The launch counts, though, are exact and checked.
"""

from __future__ import annotations

import pytest
from helpers import run_benchmark

pytest.importorskip("triton")


@pytest.mark.slow
def test_host_benchmark_quick_run(tmp_path):
    result, stdout = run_benchmark(["benchmarks", "host", "--quick", "--device", "cpu"], tmp_path,
                           "host-cpu-*.json", interpreter=True)  # fmt: skip
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
    assert "host targets" in stdout and "backward_stats" in stdout
