"""pytest-benchmark options for ``pytest benchmarks/ --benchmark-only``.

Options: ``--bench-quick`` (tiny sizes), ``--bench-device cpu|cuda`` (default: CUDA when
present, decided when the first benchmark runs, never at collection), ``--bench-workloads``
(comma-separated names). The repository's default ``pytest`` run (testpaths = tests) never
collects this folder.
"""

from __future__ import annotations

import pytest

from benchmarks.ops import OPS
from benchmarks.workloads import WORKLOAD_NAMES


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Time in one process: the repository's addopts run the tests on pytest-xdist workers,
    under which pytest-benchmark switches itself off."""
    if getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0
        config.option.dist = "no"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastgradstats benchmarks")
    group.addoption("--bench-quick", action="store_true", help="tiny workload sizes")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device for the benchmarks (default: cuda when available)")  # fmt: skip
    group.addoption("--bench-workloads", default=",".join(WORKLOAD_NAMES),
                    help="comma-separated workload names")  # fmt: skip


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" not in metafunc.fixturenames:
        return
    chosen = [w.strip() for w in metafunc.config.getoption("--bench-workloads").split(",")]
    unknown = [w for w in chosen if w not in WORKLOAD_NAMES]
    if unknown:
        raise pytest.UsageError(
            f"--bench-workloads: unknown {unknown}; choose from {WORKLOAD_NAMES}"
        )
    # Workload-major order, so one workload's gradients are built once and freed after.
    cases = [
        (workload, op_name, impl)
        for workload in chosen
        for op_name, op in OPS.items()
        for impl in op.impls
    ]
    metafunc.parametrize("bench_case", cases, ids=["/".join(c) for c in cases])
