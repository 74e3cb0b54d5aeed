"""``python -m benchmarks.step_latency`` (the gpu-check row of issue 18) on a CPU, tiny GPT-2.

No timing is asserted; the row's bookkeeping is: every side timed, the in-backward total
equal to the after-backward clip's and close to torch's, the ratios consistent with the
per-side medians' rounds, the JSON written.
"""

from __future__ import annotations

import pytest
from helpers import run_benchmark

pytest.importorskip("transformers")


@pytest.mark.slow
def test_step_latency_quick_run_on_cpu(tmp_path):
    result, _ = run_benchmark(["benchmarks.step_latency", "--device", "cpu", "--quick",
                            "--rounds", "3", "--batch", "2", "--seq", "16"], tmp_path,
                           "step-latency-cpu-*.json")  # fmt: skip
    assert result["ok"] is True
    [run] = result["runs"]
    assert run["model"] == "gpt2-tiny" and run["rounds"] == 3 and len(run["samples"]) == 3
    assert run["during_equals_after"] and run["after_close_to_torch"]
    totals = run["round1_totals"]
    assert set(totals) == {"torch", "after", "during"} and totals["during"] == totals["after"]
    for side in ("torch", "after", "during"):
        medians = run["medians"]
        total, after = medians[f"{side}_total_ms"], medians[f"{side}_after_backward_ms"]
        assert 0 < after <= total, (side, after, total)
    for sample in run["samples"]:
        ratio = sample["during_after_backward_ms"] / sample["after_after_backward_ms"]
        assert sample["after_backward_during_over_after"] == pytest.approx(ratio)
