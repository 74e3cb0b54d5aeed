"""fgs.backward_stats on the Triton path (issue 18 item 4): each completed bucket is one
stats launch (per dtype) into its columns of one model-wide partials buffer, and after
backward ONE finalize launch (+ the scale launch per segment when clipping) gives the
statistics of the after-backward fused path (``grad_stats(..., backend="triton")``).

Per-tensor results and the total are compared bit for bit: a tensor's partials are reduced
in the same order wherever they lie, and the total in tensor order, as the fused path does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import GradStorageRecorder, OpRecorder, assert_same_stats, assert_same_tensors

from fastgradstats import dispatch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import fastgradstats as fgs
from fastgradstats import backward as bwd
from fastgradstats import kernels

pytestmark = pytest.mark.backend_independent  # pins FASTGRADSTATS_BACKEND=triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALLOWED_OPS = {"aten.empty.memory_format", "aten.select.int"}  # allocations and views


@pytest.fixture(autouse=True)
def on_triton(small_kernel_blocks, monkeypatch):
    """Small blocks (many blocks from tiny tensors) and the Triton backend in force."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")


class Launches:
    """Replaces ``kernels.launch``: counts launches by kernel name, runs nothing."""

    def __init__(self, monkeypatch) -> None:
        self.names: list[str] = []
        monkeypatch.setattr(kernels, "launch", lambda kernel, *a, **k: self.names.append(
            kernel.__name__))  # fmt: skip

    def count(self, name: str) -> int:
        return self.names.count(name)


def _counting(monkeypatch) -> list[str]:
    """Records every launch by kernel name, and runs it."""
    real, names = kernels.launch, []

    def counted(kernel, *args, **kwargs):
        names.append(kernel.__name__)
        real(kernel, *args, **kwargs)

    counted.__wrapped__ = real  # type: ignore[attr-defined]
    monkeypatch.setattr(kernels, "launch", counted)
    return names


class _Net(torch.nn.Module):
    """Tensors of 1 to 3 blocks (BLOCK = 128); ``dtype="mixed"``: a bf16 layer between
    float32 ones (two dtypes in one bucket: placed dtype after dtype)."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        second = torch.bfloat16 if dtype == "mixed" else dtype
        first = torch.float32 if dtype == "mixed" else dtype
        self.a = torch.nn.Linear(6, 40).to(DEVICE, first)
        self.b = torch.nn.Linear(40, 12).to(DEVICE, second)
        self.c = torch.nn.Linear(12, 3).to(DEVICE, first)

    def forward(self, x):
        h = torch.tanh(self.a(x.to(self.a.weight.dtype)))
        h = torch.tanh(self.b(h.to(self.b.weight.dtype)))
        return self.c(h.to(self.c.weight.dtype)).float()


def _loss(model, seed=1):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return model(x).pow(2).sum()


def _fused(model, norm_type=2.0):
    return fgs.grad_stats(model.named_parameters(), norm_type, backend="triton")


def test_dispatch_picks_the_path_like_the_fused_call(monkeypatch):
    model = _Net()
    assert bwd.backward_stats(model)._triton is not None
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    assert bwd.backward_stats(model)._triton is None
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    assert bwd.backward_stats(model.double())._triton is None  # float64: torch path
    assert bwd.backward_stats(_Net(), 3.0)._triton is None  # p = 3: torch path
    # the keyword wins over the environment, as grad_stats' does
    assert bwd.backward_stats(_Net(), backend="torch")._triton is None
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    assert bwd.backward_stats(_Net(), backend="triton")._triton is not None
    model = _Net()
    with pytest.raises(ValueError, match="backend must be one of"):
        bwd.backward_stats(model, backend="cuda")
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.parametrize(
    ("dtype", "bucket_bytes"),
    [
        (torch.float32, 1),  # one tensor per bucket
        (torch.float32, bwd.DEFAULT_BUCKET_BYTES),  # one bucket
        (torch.bfloat16, 600),
        ("mixed", 600),  # a bucket holding bf16 and float32 tensors
        ("mixed", bwd.DEFAULT_BUCKET_BYTES),
    ],
)
def test_matches_the_fused_path_and_its_clip(dtype, bucket_bytes):
    model = _Net(dtype)
    twin = copy.deepcopy(model)
    handle = fgs.backward_stats(model, bucket_bytes=bucket_bytes)
    assert handle._triton is not None
    _loss(model).backward()
    stats = handle.finalize()
    assert stats.catchup_tensors == 0
    assert_same_stats(stats, _fused(model))
    # clip: the same total, coefficient and clipped gradients as the fused clip
    model.zero_grad()
    _loss(model, seed=2).backward()
    _loss(twin, seed=2).backward()
    expected_total, expected = fgs.clip_grad_norm_(
        twin.named_parameters(), 0.05, return_stats=True, backend="triton"
    )
    total, stats = handle.clip_grad_norm_(0.05)
    assert stats.catchup_tensors == 0 and float(stats.clip_coef) < 1.0
    assert_same_tensors([total], [expected_total])
    assert_same_stats(stats, expected)
    assert_same_tensors([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])
    handle.remove()


@pytest.mark.parametrize("norm_type", [1.0, float("inf")])
def test_other_norm_types(norm_type, monkeypatch):
    model = _Net()
    handle = fgs.backward_stats(model, norm_type, bucket_bytes=600)
    _loss(model).backward()
    names = _counting(monkeypatch)
    stats = handle.finalize()
    assert names == ["finalize_kernel"]  # the partials only: no gradient read again
    assert_same_stats(stats, _fused(model, norm_type))


class _TwoHeads(torch.nn.Module):
    """``first`` is used only when ``use_first`` (the first micro-step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 30).to(DEVICE)
        self.first = torch.nn.Linear(30, 3).to(DEVICE)
        self.second = torch.nn.Linear(30, 3).to(DEVICE)

    def forward(self, x, use_first):
        h = torch.tanh(self.body(x))
        return self.first(h) if use_first else self.second(h)


@pytest.mark.parametrize("micro_steps", [2, 4])
@pytest.mark.parametrize("bucket_bytes", [1, bwd.DEFAULT_BUCKET_BYTES])
def test_accumulation_with_a_parameter_used_only_in_the_first_micro_step(micro_steps, bucket_bytes):
    model = _TwoHeads()
    handle = fgs.backward_stats(model, bucket_bytes=bucket_bytes)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        for micro in range(micro_steps):
            x = torch.randn(3, 6, generator=torch.Generator().manual_seed(10 * step + micro))
            model(x.to(DEVICE), micro == 0).pow(2).sum().backward()
        stats = handle.finalize()
        assert stats.catchup_tensors == 0  # ``first``: measured in micro-step 0, unchanged
        assert_same_stats(stats, _fused(model))


def test_parameters_without_a_gradient_stay_out():
    model = _TwoHeads()
    handle = fgs.backward_stats(model, bucket_bytes=1)
    for seed in range(2):  # the second finalize reuses the subset's finalize table
        model.zero_grad(set_to_none=True)
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        model(x, False).pow(2).sum().backward()
        stats = handle.finalize()
        assert "first.weight" not in stats.names and len(stats) == 4
        assert_same_stats(stats, _fused(model))


def _plant(value):
    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[::7] = value
        return grad

    return hook


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_planted(value):
    model = _Net()
    model.b.weight.register_hook(_plant(value))
    handle = fgs.backward_stats(model, bucket_bytes=600)
    _loss(model).backward()
    expected = _fused(model)
    assert int(expected.nan_count.sum() + expected.inf_count.sum()) > 0
    assert_same_stats(handle.finalize(), expected)


def test_nonfinite_clip_error_writes_nothing(monkeypatch):
    model = _Net()
    model.b.weight.register_hook(_plant(float("nan")))
    handle = fgs.backward_stats(model)
    _loss(model).backward()
    before = [p.grad.clone() for p in model.parameters()]
    names = _counting(monkeypatch)
    with pytest.raises(RuntimeError, match=r"b\.weight"):
        handle.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert names == ["finalize_kernel"]  # the NaN counts come from the finalize
    assert_same_tensors([p.grad for p in model.parameters()], before)


@pytest.mark.parametrize("bucket_bytes", [1, bwd.DEFAULT_BUCKET_BYTES])
def test_catchup_after_an_in_place_scale_relaunches_only_that_tensor(monkeypatch, bucket_bytes):
    model = _Net()
    handle = fgs.backward_stats(model, bucket_bytes=bucket_bytes)
    real, grids = kernels.launch, []

    def counted(kernel, grid, *args, **kwargs):
        grids.append((kernel.__name__, grid))
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", counted)
    for step in range(2):  # the steady state's bucket tables survive the catch-up's
        model.zero_grad()
        _loss(model, seed=step).backward()
        model.b.weight.grad.mul_(3.0)  # after its bucket was measured: stale
        grids.clear()
        steady = list(handle._triton._tables)
        stats = handle.finalize()
        assert all(a is b for a, b in zip(handle._triton._tables, steady, strict=True))
        # b.weight's 480 elements are 4 blocks of 128: read again alone, then the finalize
        assert grids == [("stats_kernel", (4,)), ("finalize_kernel", (len(stats),))]
        assert stats.catchup_tensors == 1
        assert_same_stats(stats, _fused(model))


def test_gradscaler_unscale_through_the_handle_needs_no_catchup():
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12)
    handle = fgs.backward_stats(model, bucket_bytes=600)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(_loss(model)).backward()
        handle.unscale_(scaler, opt)
        stats = handle.finalize()
        assert stats.catchup_tensors == 0
        assert_same_stats(stats, _fused(model))  # powers of two: exact
        scaler.step(opt)
        scaler.update()


def test_non_dense_gradient_takes_the_torch_path_for_that_finalize():
    model = _Net()
    handle = fgs.backward_stats(model, bucket_bytes=600)
    _loss(model).backward()
    w = model.b.weight
    w.grad = torch.randn(12, 80, device=DEVICE)[:, ::2]  # a gapped view: not readable in place
    stats = handle.finalize()
    assert stats.catchup_tensors == len(stats)
    expected = fgs.grad_stats(model.named_parameters(), backend="torch")
    assert_same_stats(stats, expected)


@pytest.mark.parametrize("dtype", [torch.float32, "mixed"])
def test_launch_counts_one_per_bucket_then_one_finalize(monkeypatch, dtype):
    model = _Net(dtype)
    handle = fgs.backward_stats(model, bucket_bytes=600)
    assert handle.num_buckets >= 2
    segments = 2 if dtype == "mixed" else 1  # dtypes, hence scale launches
    _loss(model).backward()  # warm-up, for real: builds the tables
    handle.clip_grad_norm_(1e-3)
    launches = Launches(monkeypatch)
    for step in range(2):
        _loss(model, seed=step).backward()
        # during backward: one stats launch per bucket (and dtype in it)
        buckets = [handle._ranges[b] for b in range(handle.num_buckets)]
        per_bucket = sum(len({p.dtype for p in handle.params[lo:hi]}) for lo, hi in buckets)
        assert launches.names == ["stats_kernel"] * per_bucket
        launches.names.clear()
        with OpRecorder() as recorder:
            if step == 0:
                stats = handle.finalize()
            else:
                _total, stats = handle.clip_grad_norm_(1e-3)
        assert stats.catchup_tensors == 0
        if step == 0:  # no clip: the finalize alone, and no torch op touches a gradient
            assert launches.names == ["finalize_kernel"]
            assert set(recorder.ops) <= ALLOWED_OPS, set(recorder.ops) - ALLOWED_OPS
        else:  # clip: + the scale launch per segment
            assert launches.count("finalize_kernel") == 1
            assert launches.count("scale_kernel") == segments
            assert len(launches.names) == 1 + segments
        launches.names.clear()


def test_clip_hands_the_coefficient_to_a_fused_optimizer(monkeypatch):
    model = _Net()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, fused=True)
    handle = fgs.backward_stats(model, bucket_bytes=600)
    for step in range(3):  # the first hand-off of an optimizer scales in place
        _loss(model, seed=step).backward()
        _loss(twin, seed=step).backward()
        real = kernels.launch
        names = _counting(monkeypatch)
        total, stats = handle.clip_grad_norm_(1e-3, optimizer=opt)
        monkeypatch.setattr(kernels, "launch", real)
        assert stats.catchup_tensors == 0
        expected = fgs.clip_grad_norm_(twin.parameters(), 1e-3, optimizer=twin_opt)
        assert_same_tensors([total], [expected])
        if step > 0:  # handed over: the finalize alone, no scale launch
            assert names == ["finalize_kernel"], names
        opt.step()
        twin_opt.step()
        opt.zero_grad()
        twin_opt.zero_grad()
    assert_same_tensors(list(model.parameters()), list(twin.parameters()))


def test_placed_table_segments_follow_dtype_and_alignment():
    from fastgradstats.kernels import tables

    f32, bf16 = torch.float32, torch.bfloat16
    # five tensors placed at fixed columns; the third is misaligned, the fourth not read
    table = tables.build_placed(
        torch.device("cpu"), 128, [0, 16, 20, 0, 48], [300, 128, 129, 50, 1],
        [f32, f32, f32, bf16, bf16], [0, 3, 4, 6, 7], [True, True, True, False, True],
    )  # fmt: skip
    assert [(s.dtype, s.aligned, s.lo, s.hi) for s in table.segments] == [
        (f32, True, 0, 4), (f32, False, 4, 6), (bf16, True, 7, 8),
    ]  # fmt: skip
    n, rows = 5, table.host.tolist()
    assert rows[2 * n : 4 * n] == [0, 3, 4, 6, 7, 3, 4, 6, 7, 8]  # block start, end
    assert rows[5 * n :] == [0, 0, 0, 1, 2, 2, 0, 4]  # block -> tensor (6: not read)


def test_misaligned_gradient_is_read_at_its_fixed_columns():
    model = _Net()
    handle = fgs.backward_stats(model)  # one bucket
    _loss(model).backward()
    w = model.b.weight
    buffer = torch.zeros(w.numel() + 1, device=DEVICE)
    w.grad = buffer[1:].view_as(w).copy_(w.grad * 2)  # dense, 4 bytes off 16-byte alignment
    assert w.grad.data_ptr() % 16 != 0
    stats = handle.finalize()
    assert stats.catchup_tensors == 1
    assert_same_stats(stats, _fused(model))


def _monitored(in_backward: bool, max_norm: float | None, monkeypatch, steps: int = 3):
    from fastgradstats import GradMonitor

    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, max_norm=max_norm, in_backward=in_backward)
    grads, launched, touching = [], [], []
    for step in range(steps):
        _loss(model, seed=step).backward()
        names = _counting(monkeypatch)
        with GradStorageRecorder([p.grad for p in model.parameters()]) as recorder:
            monitor.step()
        monkeypatch.setattr(kernels, "launch", kernels.launch.__wrapped__)
        launched.append(names)
        touching.append(recorder.touching)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    return monitor, grads, launched, touching


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_monitor_in_backward_equals_the_after_backward_monitor(max_norm, monkeypatch):
    import numpy as np

    from fastgradstats.monitor.history import ARRAY_FIELDS

    after, after_grads, _, _ = _monitored(False, max_norm, monkeypatch)
    during, during_grads, launched, touching = _monitored(True, max_norm, monkeypatch)
    assert during.backward_stats._triton is not None
    for a, b in zip(after_grads, during_grads):
        assert_same_tensors(a, b)
    ha, hb = after.history(), during.history()
    for field in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(ha, field), getattr(hb, field), err_msg=field)
    # the step after backward: the finalize, and the scale only when clipping
    expected = ["finalize_kernel"] + (["scale_kernel"] if max_norm is not None else [])
    assert launched == [expected] * len(launched)
    # ... and no aten op on gradient memory either (a torch-path catch-up or fallback
    # would show here; the kernels' own reads are the launches above)
    assert touching == [[]] * len(touching), touching


def test_steady_bucket_checks_dtype_shape_and_strides_behind_the_same_addresses(monkeypatch):
    """A bucket whose gradients were all readable keeps its table with their addresses
    and one C++ guard (dtype, shape, strides): the next backward checks those in two C
    calls instead of a Python check per tensor, and a gradient reinterpreted at the same
    address (bf16 over fp32 bytes) must still not be read with the old table."""
    from fastgradstats.backward_triton import TritonSlots

    params = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in (300, 7, 129)]
    slots = TritonSlots(params, [(0, 3)], 2.0)
    grads = [torch.randn(p.numel(), device=DEVICE) for p in params]
    launches = Launches(monkeypatch)
    assert slots.measure_bucket(0, grads) == [True, True, True]
    assert slots._steady[0] is not None
    real_readable = slots.readable

    def no_python_check(*args):
        raise AssertionError("the steady state checked a gradient in Python")

    monkeypatch.setattr(slots, "readable", no_python_check)
    assert slots.measure_bucket(0, list(grads)) == [True, True, True]
    assert launches.names == ["stats_kernel"] * 2
    # the replayed launches read the new values behind the same addresses
    for g in grads:
        g.mul_(-3.0).add_(0.5)
    assert slots.measure_steady(0, grads)
    fresh = TritonSlots(params, [(0, 3)], 2.0)
    assert fresh.measure_bucket(0, grads) == [True, True, True]
    torch.testing.assert_close(slots.partials, fresh.partials, rtol=0, atol=0)
    monkeypatch.setattr(slots, "readable", real_readable)
    as_bf16 = grads[0].view(torch.bfloat16)  # same address, another dtype and numel
    assert as_bf16.data_ptr() == grads[0].data_ptr()
    assert slots.measure_bucket(0, [as_bf16, grads[1], grads[2]]) == [False, True, True]
    wanted = [False, True, False]  # a catch-up never takes the steady state's table
    assert slots.measure_bucket(0, grads, wanted) == wanted


class _StreamLog:
    """Stands in for the side stream's two CUDA operations and for ``kernels.launch``
    (launches run for real), logging in order: "side waits", "main waits", and each
    launch as (kernel name, on the side stream or not)."""

    def __init__(self, monkeypatch) -> None:
        from fastgradstats import backward_triton

        self.events: list = []
        self.on_side = False
        self.paused = False  # the plain twin's launches are not logged
        log = self

        class SideContext:
            def __enter__(self):
                log.on_side = True

            def __exit__(self, *exc):
                log.on_side = False

        def side_after(side, device):
            self.events.append("side waits")
            return SideContext()

        real = kernels.launch

        def launch(kernel, *args, **kwargs):
            if not self.paused:
                self.events.append((kernel.__name__, self.on_side))
            real(kernel, *args, **kwargs)

        monkeypatch.setattr(backward_triton, "_side_stream_after", side_after)
        monkeypatch.setattr(backward_triton, "_wait_for", lambda s, d: self.events.append(
            "main waits"))  # fmt: skip
        monkeypatch.setattr(kernels, "launch", launch)


def test_side_stream_orders_bucket_launches_after_backward_and_finalize_after_them(monkeypatch):
    """The stream logic of ``side_stream=True`` (no CUDA here: the two stream operations
    are logged instead): every stats launch runs on the side stream right after it waited
    for backward's stream; the current stream waits for it at the end of backward and
    before the finalize launch; finalize and scale run on the current stream; the
    results are those of the plain handle. Step 1 builds each bucket's table (``_launch``),
    step 2 replays it (``measure_steady``)."""
    model = _Net()
    twin = copy.deepcopy(model)
    handle = fgs.backward_stats(model, bucket_bytes=600)
    plain = fgs.backward_stats(twin, bucket_bytes=600)
    assert handle.num_buckets >= 2
    handle._triton._side = object()  # what the CUDA constructor would make
    handle._triton._cuda = True  # as on CUDA: the steady state's stream-aware branch
    log = _StreamLog(monkeypatch)
    for step in range(2):
        _loss(model, seed=step).backward()
        log.events.append("end of backward")
        total, stats = handle.clip_grad_norm_(1e-3)
        log.paused = True
        _loss(twin, seed=step).backward()
        expected_total, expected = plain.clip_grad_norm_(1e-3)
        log.paused = False
        assert_same_stats(stats, expected)
        assert_same_tensors([total], [expected_total])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_same_tensors([p.grad], [q.grad])
    events = log.events
    stats_at = [k for k, e in enumerate(events) if isinstance(e, tuple) and e[0] == "stats_kernel"]
    assert stats_at and all(events[k][1] for k in stats_at), events  # on the side stream
    for k in stats_at:  # each right after a wait for backward (per bucket: per dtype)
        back = k - 1
        while isinstance(events[back], tuple) and events[back][0] == "stats_kernel":
            back -= 1
        assert events[back] == "side waits", events[back - 2 : k + 1]
    for k, e in enumerate(events):
        if e == "end of backward":
            assert events[k - 1] == "main waits", events[k - 3 : k + 1]
        if isinstance(e, tuple) and e[0] in ("finalize_kernel", "scale_kernel"):
            assert not e[1], e  # on the current stream
        if isinstance(e, tuple) and e[0] == "finalize_kernel":
            assert events[k - 1] == "main waits", events[k - 3 : k + 1]


def test_side_stream_refused_where_it_cannot_run(monkeypatch):
    model = _Net()
    with pytest.raises(TypeError, match="side_stream"):
        fgs.backward_stats(model, side_stream=1)
    if DEVICE == "cpu":  # the Triton path on CPU tensors (interpreter): no CUDA stream
        with pytest.raises(ValueError, match="side_stream=True needs CUDA"):
            fgs.backward_stats(model, side_stream=True)
    with pytest.raises(ValueError, match="side_stream=True needs the Triton path"):
        fgs.backward_stats(model, side_stream=True, backend="torch")
    for p in model.parameters():  # no hook was left behind by the refusals
        assert not p._post_accumulate_grad_hooks


def test_reset_after_an_interrupted_backward_lets_the_next_one_measure_in_backward():
    """A backward that raises after some hooks fired leaves buckets half counted (and the
    end-of-backward callback unrun): ``reset()`` clears that in the lists the hooks read,
    so the next backward measures every bucket during backward, with no catch-up."""

    class Boom(Exception):
        pass

    def boom(grad):
        raise Boom

    def arm(module, args):  # the gradient reaching layer c's input raises
        args[0].register_hook(boom)

    model = _Net()
    handle = fgs.backward_stats(model, bucket_bytes=600)
    armed = model.c.register_forward_pre_hook(arm)
    with pytest.raises(Boom):
        _loss(model).backward()
    armed.remove()
    assert any(handle._fired)  # layer c's hooks fired before the error
    handle.reset()
    model.zero_grad(set_to_none=True)
    _loss(model, seed=2).backward()
    stats = handle.finalize()
    assert stats.catchup_tensors == 0
    assert_same_stats(stats, _fused(model))


def test_step_after_backward_allocates_nothing_and_each_finalize_returns_new_tensors(
    monkeypatch,
):
    """The next finalize's outputs are made at the end of backward: the step after it runs
    no torch op at all (launches stubbed: the interpreter's own ops stay out). Each
    finalize still hands out tensors of its own, so a step's statistics survive the next."""
    model = _Net()
    handle = fgs.backward_stats(model, bucket_bytes=600)
    _loss(model).backward()
    first = handle.finalize()
    kept = [t.clone() for t in (first.norms, first.max_abs, first.total_norm)]
    with monkeypatch.context() as m:
        launches = Launches(m)
        _loss(model, seed=5).backward()
        with OpRecorder() as recorder:
            handle.finalize()
        assert recorder.ops == [], recorder.ops
        assert launches.names[-1:] == ["finalize_kernel"]
    _loss(model, seed=6).backward()
    second = handle.finalize()
    assert second.catchup_tensors == 0
    assert_same_stats(second, _fused(model))
    assert_same_tensors([first.norms, first.max_abs, first.total_norm], kept)
    assert second.norms.data_ptr() != first.norms.data_ptr()
    # a finalize with no backward before it (catch-up of every tensor) allocates its own
    third = handle.finalize()
    assert third.catchup_tensors == len(third)
    assert third.norms.data_ptr() != second.norms.data_ptr()
    assert_same_stats(third, second)
