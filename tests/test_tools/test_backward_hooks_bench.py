"""``benchmarks/backward_hooks.py`` runs (a tiny smoke run; its numbers are not checked)."""

from __future__ import annotations

import math

import pytest

from fastgradstats import backward as bwd

pytestmark = pytest.mark.backend_independent


@pytest.mark.parametrize("stubbed", [True, False])
def test_backward_hooks_benchmark_smoke(stubbed):
    from benchmarks.backward_hooks import measure

    real = bwd._measure_bucket
    row = measure(30, 3, 1, 1, stubbed)
    assert bwd._measure_bucket is real  # the stub is taken out again
    assert row["tensors"] == 30 and row["buckets"] >= 3
    for key in ("hook_us_per_tensor", "noop_hook_us_per_tensor", "finalize_x_floor"):
        assert math.isfinite(row[key])
