"""The cached plan of the fused Triton path is safe to reuse (issue 19 items 7, 12-16).

* item 7: every dtype of the list is compared, not the first and last;
* item 15: a parameter passed twice is scaled twice, in order, as torch does (no race);
* item 16: kernel offsets are int64 for every block size the host allows;
* items 12-14: ownership of the plan's table and workspace under CUDA-graph capture,
  several streams and several threads. Those hazards need a GPU to show; here the
  ownership logic is tested with mocks (capture detection, streams, threads), and
  ``python -m benchmarks gpu-check`` confirms them on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import params_with_grads

from fastgradstats import dispatch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import fastgradstats as fgs
from fastgradstats import kernels, triton_backend
from fastgradstats.kernels import tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_blocks(small_kernel_blocks):
    """Every test here runs with the small blocks (tests/conftest.py)."""


# --- item 7: every dtype is compared -------------------------------------------------------


def test_a_middle_gradient_that_became_bf16_at_the_same_address_is_read_as_bf16(backend):
    """A flat gradient buffer (or an allocator reusing a block) puts a bf16 gradient where
    an fp32 one of the same size was: the plan must not read it as fp32, and clipping must
    not write past its end."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = 40, 64, 24
    buf = torch.randn(a + b + c, generator=gen).to(DEVICE)
    fp32 = [buf[:a], buf[a : a + b], buf[a + b :]]
    fgs.clip_grad_norm_(params_with_grads(fp32), 1e9)  # caches the all-fp32 plan
    middle = buf[a : a + b].view(torch.bfloat16)[:b]  # same address, same numel
    assert middle.data_ptr() == fp32[1].data_ptr() and middle.numel() == fp32[1].numel()
    middle.copy_(torch.randn(b, generator=gen).mul(30).to(torch.bfloat16))
    beyond = buf[a + b // 2 : a + b].clone()  # fp32 elements after the bf16 tensor's bytes
    mixed = [buf[:a], middle, buf[a + b :]]
    reference = [g.detach().clone() for g in mixed]
    ref_params = params_with_grads(reference)
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    total = fgs.clip_grad_norm_(params_with_grads(mixed), 1.0)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    for g, r in zip(mixed, reference):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    torch.testing.assert_close(buf[a + b // 2 : a + b], beyond, rtol=0, atol=0)


def test_a_gradient_replaced_by_a_gapped_view_at_the_same_address_is_not_read_densely():
    """The plan's check covers strides too: ``buf[:, ::2]`` has the address, shape and
    dtype of the dense gradient it replaces, but not its memory."""
    buf = torch.randn(8, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dense = buf.view(-1)[:32].view(8, 4)
    gapped = buf[:, ::2]
    assert dense.data_ptr() == gapped.data_ptr() and dense.shape == gapped.shape
    fgs.get_total_norm([dense], backend="triton")
    total = fgs.get_total_norm([gapped], backend="triton")
    torch.testing.assert_close(total, torch.linalg.vector_norm(gapped), rtol=1e-6, atol=0)


@pytest.mark.parametrize("change", ["bf16 at the same address", "gapped view"])
def test_a_gradient_changed_in_a_later_run_of_the_check_is_seen(change, monkeypatch):
    """``Plan.matches`` checks the list in runs of ``CHECK_CHUNK`` gradients: a change
    in the last run (not the first, not at either end of the list) must still be seen."""
    monkeypatch.setattr(triton_backend, "CHECK_CHUNK", 2)
    buf = torch.randn(96, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = [buf[16 * i : 16 * i + 16] for i in range(6)]  # runs (0, 1) (2, 3) (4, 5)
    fgs.get_total_norm(grads, backend="triton")
    assert len(_the_plan().chunks) == 3
    if change == "gapped view":
        new = buf[64:96:2]  # index 4: same address and size, every other element
    else:
        new = buf[64:80].view(torch.bfloat16)[:16]
        new.copy_(torch.randn(16, generator=torch.Generator().manual_seed(6)))
    assert new.data_ptr() == grads[4].data_ptr() and new.numel() == grads[4].numel()
    changed = [*grads[:4], new, grads[5]]
    total = fgs.get_total_norm(changed, backend="triton")
    # torch's roundings: the bf16 tensor's norm is rounded to bf16
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(changed), rtol=1e-6, atol=0)
    assert triton_backend.plan_stats["builds"] == 2


def test_lists_that_share_length_and_end_gradients_each_get_their_own_result():
    """The cache finds a plan by the list's length and first and last addresses; two lists
    that agree there and differ inside must never be served each other's plan (``d``
    has ``b``'s size and dtype: only its address tells them apart)."""
    a, b, c, d = _grads((30, 50, 20, 50), seed=7)
    first, second = [a, b, c], [a, d, c]
    for grads in (first, second, first, second, first):
        total = fgs.get_total_norm(grads, backend="triton")
        expected = torch.linalg.vector_norm(torch.cat(grads).double())
        torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=0)
    assert triton_backend.plan_stats["builds"] == 2  # alternating, each keeps its plan


def test_parameters_without_gradient_keep_hitting_the_plan():
    """A ``None`` gradient makes the one-walk check miss; the second walk (``None``s left
    out) still finds the cached plan and builds nothing."""
    params = params_with_grads(_grads((40, 9, 60), seed=8))
    params.insert(1, torch.nn.Parameter(torch.zeros(5, device=DEVICE)))  # no .grad
    reference = [p.grad.clone() if p.grad is not None else None for p in params]
    for _ in range(3):
        total = fgs.get_total_norm([p.grad for p in params if p.grad is not None])
        stats = fgs.grad_stats(params, backend="triton")
        assert stats.names == ["0", "2", "3"]
    expected = torch.linalg.vector_norm(torch.cat([g for g in reference if g is not None]))
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.total_norm, expected, rtol=1e-6, atol=0)
    assert triton_backend.plan_stats["builds"] == 1


def test_steady_calls_reuse_the_plan_with_and_without_duplicates():
    grads = _grads((50, 200, 7))
    for lists in ([grads], [[grads[0], grads[1], grads[0]]]):
        triton_backend.clear_plans()
        for _ in range(3):
            fgs.get_total_norm(lists[0], backend="triton")
        assert triton_backend.plan_stats == {"hits": 2, "builds": 1}


# --- item 15: a parameter passed twice is scaled twice, one launch after the other -------


def _scale_launches_touching_memory_twice(monkeypatch) -> list[str]:
    """Wrap the one launch point: for every scale launch, check (on the host copy of its
    table) that no two of its programs cover the same bytes, then launch for real."""
    bad: list[str] = []
    real = kernels.launch

    def checked(kernel, grid, *args, **kw):
        if kernel.__name__ == "scale_kernel":
            data, _, n, lo = args[:4]
            data = data.cpu().tolist()
            size = kw["DTYPE"].primitive_bitwidth // 8
            spans = []
            for b in range(lo, lo + grid[0]):
                t = data[5 * n + b]
                start = (b - data[2 * n + t]) * kw["BLOCK"]
                count = min(data[n + t] - start, kw["BLOCK"])
                spans.append((data[t] + start * size, data[t] + (start + count) * size))
            spans.sort()
            if any(nxt[0] < prev[1] for prev, nxt in itertools.pairwise(spans)):
                bad.append(f"blocks {lo}..{lo + grid[0] - 1}")
        real(kernel, grid, *args, **kw)

    monkeypatch.setattr(kernels, "launch", checked)
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_parameter_passed_twice_is_scaled_twice_in_turn_as_torch_does(
    backend, dtype, monkeypatch
):
    bad = _scale_launches_touching_memory_twice(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(n, generator=gen).mul(3).to(DEVICE, dtype) for n in (150, 20, 7)]
    ours = params_with_grads([v.clone() for v in values])
    theirs = params_with_grads([v.clone() for v in values])
    # the first parameter three times, the second twice
    ours_list = [ours[0], ours[1], ours[0], ours[2], ours[1], ours[0]]
    theirs_list = [theirs[0], theirs[1], theirs[0], theirs[2], theirs[1], theirs[0]]
    for _ in range(2):  # the second call takes the cached plan
        total = fgs.clip_grad_norm_(ours_list, 1.0)
        ref_total = torch.nn.utils.clip_grad_norm_(theirs_list, 1.0)
        torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert not bad, bad


def test_overlapping_gradient_views_are_scaled_as_torch_scales_them(backend, monkeypatch):
    bad = _scale_launches_touching_memory_twice(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    flat = torch.randn(300, generator=gen).mul(2).to(DEVICE)
    twin = flat.clone()

    def views(buf):  # [0, 200) and [130, 300) share 70 elements; [40, 60) sits in both
        return [buf[:200], buf[130:], buf[40:60]]

    total = fgs.clip_grad_norm_(params_with_grads(views(flat)), 0.5)
    ref_total = torch.nn.utils.clip_grad_norm_(params_with_grads(views(twin)), 0.5)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
    torch.testing.assert_close(flat, twin, rtol=0, atol=0)
    assert not bad, bad


# --- item 16: kernel offsets are computed in 64 bits ------------------------------------

_TTIR_CHECK = r"""
import json, re, sys
from fastgradstats import kernels
kernels.BLOCK = 16  # the smallest block_size() allows: the most blocks per element
from benchmarks import codegen
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
narrow_mul = re.compile(r"arith\.muli [^:]*: i32\b")
narrow_arg = re.compile(r"arith\.addi [^:]*%(n_tensors|num_blocks|block_lo)\b[^:]*: i32\b")
found = {}
for spec in codegen.kernel_specs():
    if spec["dtype"] not in ("float32", "bfloat16"):
        continue
    config = dict(spec["config"])
    num_warps = config.pop("num_warps", 4)
    signature = dict(spec["signature"], **{k: "constexpr" for k in config})
    compiled = triton.compile(ASTSource(spec["fn"], signature, config),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    lines = [l.strip()[:120] for l in compiled.asm["ttir"].splitlines()
             if narrow_mul.search(l) or narrow_arg.search(l)]
    found[f"{spec['kernel']}/{spec['variant']}/{spec['dtype']}"] = lines
print(json.dumps(found))
"""


@pytest.mark.slow
def test_kernel_index_products_are_64_bit_for_the_smallest_block():
    """Compiled offline for sm_90 with BLOCK = 16 (no GPU needed): the TTIR of every kernel
    holds no 32-bit multiplication (``5 * n_tensors``, ``3 * num_blocks`` ... are int64)
    and no 32-bit sum with a count argument."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(fgs.__file__).resolve().parents[1]  # the package under test
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _TTIR_CHECK], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) >= 20, found.keys()
    assert {k: v for k, v in found.items() if v} == {}


# --- items 12-14: who owns the plan's table and workspace --------------------------------


def _grads(sizes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in sizes]


def _the_plan() -> triton_backend.Plan:
    values = triton_backend._plans.values()  # a plan is cached under two keys
    [plan] = {id(p): p for p in values if isinstance(p, triton_backend.Plan)}.values()
    return plan


def test_a_plan_used_under_capture_outlives_eviction_and_clear_plans(monkeypatch):
    """Item 12: a CUDA graph keeps raw pointers to the table and workspace of the plan it
    captured; neither the LRU nor ``clear_plans()`` may free them (capture mocked)."""
    import gc
    import weakref

    monkeypatch.setattr(triton_backend._plans, "maxsize", 2)  # few layouts evict it
    grads = _grads((50, 200, 7))
    fgs.get_total_norm(grads, backend="triton")  # the eager warm-up builds the plan
    plan = _the_plan()
    monkeypatch.setattr(tables, "capturing", lambda device: True, raising=False)
    fgs.clip_grad_norm_(params_with_grads(grads), 1.0, backend="triton")  # "captured"
    monkeypatch.setattr(tables, "capturing", lambda device: False, raising=False)
    alive = [weakref.ref(plan), weakref.ref(plan.table.data)]
    alive += [weakref.ref(ws.partials) for ws in plan.workspaces.values()]
    del plan
    for i in range(triton_backend._plans.maxsize + 2):  # evicts it from the LRU
        fgs.get_total_norm(_grads((3, 5 + i), seed=i), backend="triton")
    triton_backend.clear_plans()
    gc.collect()
    assert all(ref() is not None for ref in alive)
    # and it still computes: the pinned plan is the one a replay would use
    total = fgs.get_total_norm(grads, backend="triton")
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.cat(grads)))


def test_a_plan_built_under_capture_is_pinned_and_not_cached(monkeypatch):
    """Built during capture, the table is filled by the graph's copy at replay only: eager
    calls must not find it in the cache (they build their own)."""
    grads = _grads((50, 200, 7))
    monkeypatch.setattr(tables, "capturing", lambda device: True, raising=False)
    fgs.get_total_norm(grads, backend="triton")
    monkeypatch.setattr(tables, "capturing", lambda device: False, raising=False)
    assert [p for p in triton_backend._plans.values() if isinstance(p, triton_backend.Plan)] == []
    assert len(triton_backend._pinned_plans) >= 1
    total = fgs.get_total_norm(grads, backend="triton")
    torch.testing.assert_close(total, torch.linalg.vector_norm(torch.cat(grads)))


def test_a_table_used_under_capture_on_the_generic_path_is_pinned(monkeypatch):
    import gc
    import weakref

    grads = _grads((50, 200, 7))
    monkeypatch.setattr(tables, "capturing", lambda device: True, raising=False)
    triton_backend.group_norms(grads, 2.0)
    monkeypatch.setattr(tables, "capturing", lambda device: False, raising=False)
    refs = [weakref.ref(t.data) for t in tables._cache.values()] or [
        weakref.ref(t.data) for t in getattr(tables, "_pinned", [])
    ]
    assert refs
    tables.clear_cache()
    gc.collect()
    assert all(ref() is not None for ref in refs)


class _FakeEvent:
    def __init__(self, stream):
        self.stream = stream


class _FakeStream:
    """Stands in for a torch.cuda.Stream: records what the library asks of it."""

    def __init__(self, handle: int, log: list):
        self.cuda_stream = handle
        self.log = log

    def record_event(self):
        return _FakeEvent(self)

    def wait_event(self, event):
        self.log.append(("wait", self.cuda_stream, event.stream.cuda_stream))


@pytest.fixture
def fake_streams(monkeypatch):
    """Two mocked CUDA streams (1 and 2); ``state["stream"]`` is the current one."""
    log: list = []
    streams = {1: _FakeStream(1, log), 2: _FakeStream(2, log)}
    state = {"stream": streams[1], "log": log}
    monkeypatch.setattr(tables, "current_stream", lambda device: state["stream"],
                        raising=False)  # fmt: skip
    monkeypatch.setattr(tables, "_use_on", lambda t, s: log.append(("keep", s.cuda_stream)),
                        raising=False)  # fmt: skip
    state["streams"] = streams
    return state


def test_another_stream_waits_for_the_table_copy_once_and_keeps_it_alive(fake_streams):
    """Item 13: the table is copied on the stream that built it; the first call on another
    stream waits for that copy (an event) and marks the memory as used by it."""
    grads = _grads((50, 200, 7))
    params = params_with_grads(grads)
    fgs.clip_grad_norm_(params, 1e9, backend="triton")  # built on stream 1
    assert fake_streams["log"] == []  # the building stream is ordered by itself
    fake_streams["stream"] = fake_streams["streams"][2]
    fgs.clip_grad_norm_(params, 1e9, backend="triton")
    fgs.clip_grad_norm_(params, 1e9, backend="triton")
    assert fake_streams["log"] == [("wait", 2, 1), ("keep", 2)]  # once per stream
    assert set(_the_plan().workspaces) == {1, 2}  # one workspace per stream


def test_another_stream_waits_for_the_write_rounds_and_generic_tables(fake_streams):
    grads = _grads((50, 200, 7))
    params = params_with_grads(grads)
    twice = [params[0], params[1], params[0]]  # write rounds: tables of their own
    fgs.clip_grad_norm_(twice, 0.5, backend="triton")
    triton_backend.group_norms(grads, 2.0)  # the generic path's cached table
    fake_streams["stream"] = fake_streams["streams"][2]
    fake_streams["log"].clear()
    fgs.clip_grad_norm_(twice, 0.5, backend="triton")
    triton_backend.group_norms(grads, 2.0)
    waits = [e for e in fake_streams["log"] if e[0] == "wait"]
    # the plan's table, its 2 write rounds, the generic table: each waited for once
    assert waits == [("wait", 2, 1)] * 4
    assert fake_streams["log"].count(("keep", 2)) == 4


def test_the_plan_lock_is_a_real_lock_on_cuda():
    """Item 14: two threads on one stream share its workspace; the plan's lock, held
    across a call's launches, must exclude the other thread on CUDA too."""
    import dataclasses
    import threading

    plan = triton_backend.build_plan(_grads((50, 200, 7)))
    cuda_plan = dataclasses.replace(plan, device=torch.device("cuda"))
    lock = cuda_plan.lock
    with lock:
        got = []
        other = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False)))
        other.start()
        other.join()
    assert got == [False]


def test_two_threads_launches_do_not_interleave(monkeypatch):
    """Stats A, stats B, finalize A would reduce B's partials: each call's stats and
    finalize launches must be enqueued back to back."""
    import threading
    import time

    from fastgradstats.kernels import stats as stats_kernels

    grads = _grads((50, 200, 7))
    plan = triton_backend.build_plan(grads)
    order: list = []
    real_stats, real_finalize = stats_kernels.replay_stats, stats_kernels.launch_finalize

    def slow_stats(*args, **kw):
        order.append(("stats", threading.get_ident()))
        time.sleep(0.01)  # let the other thread run: it must not launch in between
        real_stats(*args, **kw)

    def finalize(*args, **kw):
        order.append(("finalize", threading.get_ident()))
        real_finalize(*args, **kw)

    monkeypatch.setattr(stats_kernels, "replay_stats", slow_stats)  # every stats launch
    monkeypatch.setattr(stats_kernels, "launch_finalize", finalize)
    results = {}

    def call(norm_type):  # p=2 and p=inf share the plan: their partials differ
        for _ in range(3):
            out = triton_backend.run_fused(plan, norm_type, stats=False, max_norm=None)
            results.setdefault(norm_type, []).append(out.total)

    pool = [threading.Thread(target=call, args=(p,)) for p in (2.0, float("inf"))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for first, second in zip(order[::2], order[1::2]):
        assert first[0] == "stats" and second == ("finalize", first[1]), order
    flat = torch.cat(grads)
    for p, totals in results.items():
        for total in totals:
            torch.testing.assert_close(total, torch.linalg.vector_norm(flat, p))


def test_overlap_rounds_split_shared_memory_into_disjoint_rounds():
    from fastgradstats.overlap import overlap_rounds

    assert overlap_rounds([0, 100, 200], [100, 100, 100]) is None  # touching, disjoint
    assert overlap_rounds([0, 0, 100], [8, 8, 8]) == [[0, 2], [1]]
    assert overlap_rounds([0, 0, 0], [8, 8, 8]) == [[0], [1], [2]]  # passed 3 times
    assert overlap_rounds([0, 50, 0, 300], [100, 100, 0, 4]) == [[0, 2, 3], [1]]
    assert overlap_rounds([], []) is None
