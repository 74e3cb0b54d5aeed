"""pytest-benchmark suite: every workload x op x implementation, grouped by workload/op.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``--bench-quick`` for tiny sizes,
``--bench-device cpu`` to stay on the CPU). Each group holds fastgradstats and its torch
baselines on the same gradients, so the ratios are read off one table. On CUDA every call
is followed by a synchronize (wall-clock timing); ``python -m benchmarks`` gives the
CUDA-event medians that the README reports.
"""

from __future__ import annotations

import gc
import itertools
from typing import Any

import pytest
import torch

from benchmarks.ops import FGS, OPS, check_op
from benchmarks.suite import build_cases, default_device
from benchmarks.workloads import make_workload

_CACHE: dict[str, Any] = {}


@pytest.fixture(scope="session")
def bench_device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--bench-device")
    device = torch.device(name) if name else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return device


def _cases(name: str, device: torch.device, quick: bool) -> tuple[Any, list[Any]]:
    """The workload's input copies, built once and kept until another workload is asked."""
    if _CACHE.get("name") != name:
        _CACHE.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        workload = make_workload(name, device, 1 / 32 if quick else 1.0)
        budget = 0.25 * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 30
        _CACHE.update(
            name=name, workload=workload, cases=build_cases(workload, device, None, budget, quick)
        )
    return _CACHE["workload"], _CACHE["cases"]


def test_bench(benchmark, bench_case, bench_device, request):
    workload_name, op_name, impl = bench_case
    quick = request.config.getoption("--bench-quick")
    workload, cases = _cases(workload_name, bench_device, quick)
    op = OPS[op_name]
    fn = op.impls[impl]
    counter = itertools.count()
    last: list[Any] = []  # the case the latest call used (the reset restores that one)

    def target() -> None:
        case = cases[next(counter) % len(cases)]
        last[:] = [case]
        fn(case)
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{workload_name} | {op_name}"
    benchmark.extra_info.update(
        impl=impl,
        baseline=op.baseline,
        tensors=workload.count,
        numel=workload.numel,
        min_bytes=op.min_bytes(workload.nbytes),
        device=str(bench_device),
    )
    if op.reset is None:
        benchmark(target)
        return

    def reset() -> None:  # untimed: doubles the grads the previous call clipped
        if last:
            op.reset(last[0])
            if bench_device.type == "cuda":
                torch.cuda.synchronize()

    rounds = 5 if quick else 15
    benchmark.pedantic(target, setup=reset, rounds=rounds, warmup_rounds=1, iterations=1)
    reset()  # leave the shared inputs at their initial norm for the next implementation


def test_fastgradstats_matches_baseline(bench_case, bench_device, request):
    """Not a benchmark: the timed fastgradstats call gives the baseline's numbers."""
    workload_name, op_name, impl = bench_case
    if impl != FGS:
        pytest.skip("checked once per op, on the fastgradstats case")
    quick = request.config.getoption("--bench-quick")
    _workload, cases = _cases(workload_name, bench_device, quick)
    result = check_op(op_name, cases[0].grads)
    assert result["ok"], result
