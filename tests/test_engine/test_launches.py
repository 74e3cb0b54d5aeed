"""Launch budgets of the fused Triton path (issue 9 item 4), counted two ways.

* ``kernels.launch`` (the one launch point) is replaced by a recorder: every launch is
  counted by kernel name, and nothing runs;
* a ``TorchDispatchMode`` records every aten op the call makes: in steady state the only
  ones allowed are allocations of the tensors handed back (``empty``) and views of them
  (``select``), which launch nothing. So no torch op runs between the launches.

Then the same calls run for real (interpreter or CUDA) to check that the counted path is
the one that computes the right numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import OpRecorder

from fastgradstats import dispatch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import fastgradstats as fgs
from fastgradstats import kernels, triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# allocations, and the row views of the packed per-tensor results (metadata only)
ALLOWED_OPS = {"aten.empty.memory_format", "aten.select.int", "aten.unbind.int"}


@pytest.fixture(autouse=True)
def small_blocks(small_kernel_blocks):
    """Every test here runs with the small blocks (tests/conftest.py)."""


class Launches:
    """Replaces ``kernels.launch``: records (kernel, grid, constexprs), runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __call__(self, kernel, grid, *args, **kwargs):
        self.calls.append((kernel.__name__, grid, kwargs))

    @property
    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def _params(dtypes, sizes=(5, 130, 1, 300, 0, 64), seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, dtype in enumerate(dtypes):
        for n in sizes:
            p = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=DEVICE))
            p.grad = (torch.randn(n, generator=gen) * (i + 1)).to(DEVICE, dtype)
            params.append(p)
    return params


def _steady_state(monkeypatch, call):
    """Warm up ``call`` for real, then run it once more with launches stubbed and ops
    recorded; returns (launch names, aten ops)."""
    call()  # warm-up: builds and caches the plan (H2D copy of the table)
    launches = Launches()
    monkeypatch.setattr(kernels, "launch", launches)
    with OpRecorder() as recorder:
        call()
    monkeypatch.undo()
    return launches.names, recorder.ops


def _stubbed_step(monkeypatch, monitor) -> tuple[list[tuple], list[str]]:
    """One ``monitor.step()`` with launches stubbed and ops recorded: (launch calls, aten
    ops). The backend stays ``triton`` afterwards."""
    launches = Launches()
    monkeypatch.setattr(kernels, "launch", launches)
    with OpRecorder() as recorder:
        monitor.step()
    monkeypatch.undo()
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    return launches.calls, recorder.ops


CALLS = {
    "clip_grad_norm_": (lambda ps: fgs.clip_grad_norm_(ps, 0.5), ["stats", "finalize", "scale"]),
    "clip_grad_norm_(return_stats)": (
        lambda ps: fgs.clip_grad_norm_(ps, 0.5, return_stats=True),
        ["stats", "finalize", "scale"],
    ),
    "clip_grad_norm_(inf)": (
        lambda ps: fgs.clip_grad_norm_(ps, 0.5, norm_type=math.inf),
        ["stats", "finalize", "scale"],
    ),
    "grad_stats": (lambda ps: fgs.grad_stats(ps), ["stats", "finalize"]),
    "get_total_norm": (lambda ps: fgs.get_total_norm([p.grad for p in ps]), ["stats", "finalize"]),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_one_group_launch_budget_and_no_torch_op_between(monkeypatch, name):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    call, expected = CALLS[name]
    params = _params([torch.float32])
    names, ops = _steady_state(monkeypatch, lambda: call(params))
    assert names == [f"{k}_kernel" for k in expected]
    assert set(ops) <= ALLOWED_OPS, ops


@pytest.mark.parametrize("name", ["clip_grad_norm_", "grad_stats"])
def test_each_extra_group_costs_at_most_two_launches(monkeypatch, name):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    call, expected = CALLS[name]
    params = _params([torch.float32, torch.bfloat16, torch.float16])
    names, ops = _steady_state(monkeypatch, lambda: call(params))
    assert len(names) <= len(expected) + 2 * 2
    assert names.count("finalize_kernel") == 1  # one finalize for every group
    assert names.count("stats_kernel") == 3
    assert set(ops) <= ALLOWED_OPS, ops


def test_misaligned_gradient_gets_its_own_segment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    params = _params([torch.float32])
    buffer = torch.randn(301, device=DEVICE)
    odd = torch.nn.Parameter(torch.zeros(300, device=DEVICE))
    odd.grad = buffer[1:]  # 4 bytes past a 16-byte boundary
    assert odd.grad.data_ptr() % 16 != 0
    params.insert(2, odd)
    fgs.clip_grad_norm_(params, 0.5)
    launches = Launches()
    monkeypatch.setattr(kernels, "launch", launches)
    fgs.clip_grad_norm_(params, 0.5)
    monkeypatch.undo()
    stats = [kw for name, _, kw in launches.calls if name == "stats_kernel"]
    assert sorted(kw["ALIGNED"] for kw in stats) == [False, True]
    grids = {kw["ALIGNED"]: grid for (name, grid, kw) in launches.calls if name == "stats_kernel"}
    assert grids[False] == (3,)  # only the misaligned tensor's 3 blocks
    assert len(launches.calls) == 5


def test_the_counted_path_computes_torchs_results(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    params = _params([torch.float32])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    for _ in range(2):  # cold (plan built) and warm (plan reused)
        ours = fgs.clip_grad_norm_(params, 0.5)
        theirs = torch.nn.utils.clip_grad_norm_(twins, 0.5)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        for p, q in zip(params, twins):
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=1e-9)
    assert triton_backend.plan_stats["hits"] >= 1


def test_plan_is_rebuilt_when_the_layout_behind_the_addresses_changes():
    """Same data_ptrs, different sizes (views of one buffer): the cheap check rebuilds."""
    buffer = torch.randn(400, device=DEVICE)
    first = fgs.get_total_norm([buffer[:100], buffer[200:300]], backend="triton")
    second = fgs.get_total_norm([buffer[:150], buffer[200:400]], backend="triton")
    assert triton_backend.plan_stats["builds"] == 2
    want = torch.linalg.vector_norm(torch.cat([buffer[:150], buffer[200:400]]))
    torch.testing.assert_close(second, want, rtol=1e-6, atol=0)
    assert not torch.equal(first, second)


def test_none_grads_and_named_pairs_take_the_fused_path(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    params = _params([torch.float32])
    params[1].grad = None
    pairs = [(f"w{i}", p) for i, p in enumerate(params)]
    _, stats = fgs.clip_grad_norm_(pairs, 1e9, return_stats=True)
    assert stats.names == [f"w{i}" for i in range(len(params)) if i != 1]
    unnamed = fgs.clip_grad_norm_(params, 1e9, return_stats=True)[1]
    assert unnamed.names == [str(i) for i in range(len(params)) if i != 1]
    assert stats.numels == [p.numel() for p in params if p.grad is not None]
    launches = Launches()
    monkeypatch.setattr(kernels, "launch", launches)
    fgs.clip_grad_norm_(pairs, 1e9, return_stats=True)
    monkeypatch.undo()
    assert launches.names == ["stats_kernel", "finalize_kernel", "scale_kernel"]


# ------------------------------------------------- histograms in the stats read (issue 12)

HISTOGRAM_OPS = {
    "aten.zeros.default",
    "aten.zero_.default",
    "aten.fill_.Scalar",
    "aten.clone.default",
}


def test_grad_stats_histogram_is_one_stats_launch_and_finalize(monkeypatch):
    """``grad_stats(histogram=True)`` bins in the stats launch (no histogram kernel, no
    second read); the only extra torch ops are the zero fills of the outputs (before the
    launches) and the copy of the bin edges."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    params = _params([torch.float32])
    names, ops = _steady_state(monkeypatch, lambda: fgs.grad_stats(params, histogram=True))
    assert names == ["stats_kernel", "finalize_kernel"]
    assert set(ops) <= ALLOWED_OPS | HISTOGRAM_OPS, ops
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")  # _steady_state undid it
    launches = Launches()
    monkeypatch.setattr(kernels, "launch", launches)
    fgs.grad_stats(params, histogram=True)
    fgs.grad_stats(params)
    monkeypatch.undo()
    flags = [kw["HISTOGRAM"] for name, _, kw in launches.calls if name == "stats_kernel"]
    assert flags == [True, False]  # histograms off: the plain variant


def test_grad_stats_histogram_per_group_launches(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    params = _params([torch.float32, torch.bfloat16, torch.float16])
    names, _ = _steady_state(monkeypatch, lambda: fgs.grad_stats(params, histogram=True))
    assert names.count("stats_kernel") == 3 and names.count("finalize_kernel") == 1
    assert "histogram_kernel" not in names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_histogram_equals_the_torch_reference(monkeypatch, dtype):
    """The fused variant, for real: full tiles, ragged tails, several blocks, a misaligned
    segment, planted zeros/subnormals/huge/NaN/Inf; the stats are those without it."""
    from histogram_helpers import planted

    from fastgradstats import histogram as H

    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    buffer = planted(400, dtype, seed=5).to(DEVICE)
    grads = [planted(n, dtype, seed=30 + n).to(DEVICE) for n in (1, 7, 32, 0, 131, 257, 1023)]
    grads.insert(3, buffer[1:300])  # not 16-byte aligned: its own segment
    grads.append(torch.zeros(33, dtype=dtype, device=DEVICE))
    grads.append(torch.full((5,), float("nan"), dtype=dtype, device=DEVICE))
    params = []
    for g in grads:
        params.append(torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype, device=DEVICE)))
        params[-1].grad = g
    kernels.launch_counts.clear()
    stats = fgs.grad_stats(params, histogram=True)
    assert kernels.launch_counts["histogram_kernel"] == 0
    assert kernels.launch_counts["stats_kernel"] == 2
    ref_hist, ref_zeros = H.group_histogram([g.cpu() for g in grads])
    assert torch.equal(stats.histogram.cpu(), ref_hist)
    assert torch.equal(stats.zero_count.cpu(), ref_zeros)
    assert torch.equal(stats.histogram_edges.cpu(), H.histogram_edges())
    plain = fgs.grad_stats(params)
    for field in ("norms", "max_abs", "nan_count", "inf_count"):
        torch.testing.assert_close(
            getattr(stats, field), getattr(plain, field), rtol=0, atol=0, equal_nan=True
        )
    again = fgs.grad_stats(params, histogram=True)  # deterministic (integer atomics)
    assert torch.equal(again.histogram, stats.histogram)


def test_clip_with_histograms_is_still_three_launches(monkeypatch):
    """``clip_grad_norm_(return_stats=True, histogram=True)``: the stats launch bins."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    params = _params([torch.float32])
    clip = lambda: fgs.clip_grad_norm_(params, 0.5, return_stats=True, histogram=True)  # noqa: E731
    names, ops = _steady_state(monkeypatch, clip)
    assert names == ["stats_kernel", "finalize_kernel", "scale_kernel"]
    assert set(ops) <= ALLOWED_OPS | HISTOGRAM_OPS, ops


def test_monitor_histogram_step_reads_the_gradients_once(monkeypatch):
    """A ``GradMonitor(histograms=True)`` histogram step launches exactly what a plain
    recorded step launches (stats, finalize, scale per group), with the ``HISTOGRAM``
    variant of the stats kernel: no histogram kernel, no second read."""
    from fastgradstats import GradMonitor

    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    plain = GradMonitor(model, max_norm=0.1, history=4, hand_off=False)
    with_hist = GradMonitor(model, max_norm=0.1, history=4, histograms=True, hand_off=False)
    for monitor in (plain, with_hist):
        monitor.step()  # warm-up: plans and tables built
    runs = {label: _stubbed_step(monkeypatch, monitor)[0]
            for label, monitor in (("plain", plain), ("histograms", with_hist))}  # fmt: skip
    assert [c[0] for c in runs["histograms"]] == [c[0] for c in runs["plain"]]
    assert [c[0] for c in runs["plain"]] == ["stats_kernel", "finalize_kernel", "scale_kernel"]
    flags = {label: [kw["HISTOGRAM"] for name, _, kw in calls if name == "stats_kernel"]
             for label, calls in runs.items()}  # fmt: skip
    assert flags == {"plain": [False], "histograms": [True]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_monitor_fused_histograms_equal_the_reference_before_clipping(monkeypatch, dtype):
    from fastgradstats import GradMonitor
    from fastgradstats import histogram as H

    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Linear(7, 3))
    model = model.to(DEVICE, dtype)
    monitor = GradMonitor(model, max_norm=1e-3, history=4, histograms=True, hand_off=False)
    gen = torch.Generator().manual_seed(3)
    before = []
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(-8, 3, p.shape,
                  generator=gen)).to(DEVICE, dtype)  # fmt: skip
        before.append(p.grad.clone())
    kernels.launch_counts.clear()
    monitor.step()
    assert kernels.launch_counts["histogram_kernel"] == 0
    hist = monitor.histogram_history()
    ref, zeros = H.group_histogram([g.cpu() for g in before])
    assert torch.equal(torch.as_tensor(hist.counts[0]), ref)
    assert torch.equal(torch.as_tensor(hist.zero_count[0]), zeros)
    assert any(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))  # clipped


def test_monitor_skip_nonfinite_zeroes_on_the_device_without_a_pass_per_gradient(monkeypatch):
    """``GradMonitor(skip_nonfinite=True)`` with a non-fused optimizer: one zero launch per
    segment that returns at once on a finite step (no per-gradient torch op: the old path
    ran a masked_fill, a full read and write, on every gradient at every step)."""
    from fastgradstats import GradMonitor

    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(4)]).to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    monitor = GradMonitor(model, max_norm=0.1, history=4, skip_nonfinite=True)
    monitor.step()

    def no_walk(*args, **kwargs):
        raise AssertionError("the steady state must not re-validate every gradient")

    from fastgradstats import inputs

    monkeypatch.setattr(inputs, "collect", no_walk)  # the cached plan is reused instead
    calls, ops = _stubbed_step(monkeypatch, monitor)
    assert [c[0] for c in calls] == ["stats_kernel", "finalize_kernel", "scale_kernel",
                                     "zero_kernel"]  # fmt: skip
    assert not [op for op in ops if "masked_fill" in op or "zero_" in op]
    # for real: a finite step keeps its (clipped) values, a NaN step is zeroed
    monitor.step()
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    model[1].weight.grad[0, 0] = float("nan")
    monitor.step()
    assert all((p.grad == 0).all() for p in model.parameters())
    assert bool(monitor.found_inf)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [{"max_norm": 0.1}, {}, {"max_norm": 0.1, "skip_nonfinite": True}]
)
def test_monitor_step_torch_ops_do_not_grow_with_the_parameters(monkeypatch, options):
    """A steady-state ``GradMonitor.step`` on the fused path: the same few torch ops (the
    history-ring writes, the found_inf flag) for 8 and for 40 parameters, at most 12 that
    launch anything; the spike detector runs at flush, not here."""
    from fastgradstats import GradMonitor

    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    counts = []
    for layers in (4, 20):
        model = torch.nn.Sequential(*[torch.nn.Linear(5, 5) for _ in range(layers)]).to(DEVICE)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        monitor = GradMonitor(model, history=8, hand_off=False, **options)
        monitor.step()
        _, ops = _stubbed_step(monkeypatch, monitor)
        counts.append([op for op in ops if op not in ALLOWED_OPS])
    assert counts[0] == counts[1]
    assert len(counts[0]) <= 12, counts[0]  # 5 without skip_nonfinite (ring row writes)
