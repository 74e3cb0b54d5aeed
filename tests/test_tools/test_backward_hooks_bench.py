"""``benchmarks/backward_hooks.py`` runs (a tiny smoke run; its numbers are not checked)."""

from __future__ import annotations

import math

import pytest

from fastgradstats import backward as bwd

pytestmark = pytest.mark.backend_independent


@pytest.mark.parametrize("mode", ["stubbed", "torch", "triton"])
def test_backward_hooks_benchmark_smoke(mode):
    from benchmarks.backward_hooks import measure
    from fastgradstats import dispatch

    impl = dispatch.triton_module() if mode == "triton" else None
    if mode == "triton" and impl is None:
        pytest.skip("the triton row needs Triton (and TRITON_INTERPRET=1 on a CPU)")
    real = bwd._measure_bucket
    real_launch = impl.kernels.launch if impl is not None else None
    row = measure(30, 3, 1, 1, mode)
    assert bwd._measure_bucket is real  # the stubs are taken out again
    if impl is not None:
        assert impl.kernels.launch is real_launch
        # one stats launch per bucket during backward, ONE finalize after
        assert row["launches_backward"] == row["buckets"] and row["launches_finalize"] == 1
    assert row["tensors"] == 30 and row["buckets"] >= 3
    for key in (
        "hook_us_per_tensor",
        "noop_hook_us_per_tensor",
        "first_backward_us_per_tensor",
        "finalize_x_floor",
    ):
        assert math.isfinite(row[key])
