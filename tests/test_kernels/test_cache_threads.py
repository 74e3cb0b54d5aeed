"""Module-level caches are safe under threads (issue 10 item 7).

With one thread per GPU, every thread goes through the table cache and the plan cache.
A tiny GIL switch interval makes the threads interleave inside the cache code, and a cache
smaller than the number of layouts makes them evict each other's entries: the old
``get`` / ``move_to_end`` pair raised ``KeyError`` here.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from fastgradstats import dispatch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import fastgradstats as fgs
from fastgradstats import kernels, triton_backend
from fastgradstats.kernels import tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fast_switching(monkeypatch):
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-7)
    monkeypatch.setattr(kernels, "BLOCK", 128)
    monkeypatch.setattr(kernels, "TILE", 32, raising=False)
    tables.clear_cache()
    triton_backend.clear_plans()
    yield
    sys.setswitchinterval(interval)
    tables.clear_cache()
    triton_backend.clear_plans()


def _hammer(worker, threads: int = 8) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def run(i):
        barrier.wait()
        try:
            worker(i)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return errors


def test_table_cache_survives_threads_evicting_each_other(monkeypatch):
    """Reproduces the KeyError on the old cache (16 threads, 1 slot, 4 layouts)."""
    monkeypatch.setattr(tables._cache, "maxsize", 1)
    tables.clear_cache()
    layouts = [[torch.zeros(3 + k)] for k in range(4)]
    errors: list[str] = []

    def worker(i):
        for j in range(5000):
            try:
                tables.table_for(layouts[(i + j) % 4], 128)
            except Exception as exc:
                errors.append(repr(exc))
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-7)
    try:
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        tables.clear_cache()
    assert not errors, errors[:3]


def test_plan_cache_and_fused_calls_under_threads(monkeypatch, fast_switching):
    monkeypatch.setattr(triton_backend._plans, "maxsize", 2)
    gen = torch.Generator().manual_seed(0)
    per_thread = [
        [torch.randn(n, generator=gen).to(DEVICE) for n in (7, 130, 1 + i)] for i in range(6)
    ]
    expected = [torch.linalg.vector_norm(torch.cat(g)) for g in per_thread]

    def worker(i):
        for j in range(15):
            k = (i + j) % len(per_thread)
            total = fgs.get_total_norm(per_thread[k], backend="triton")
            torch.testing.assert_close(total, expected[k], rtol=1e-6, atol=0)

    errors = _hammer(worker, threads=6)
    assert not errors, errors[:3]
