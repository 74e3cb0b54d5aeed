"""GradMonitor edge cases: fp16 totals, warm-up per parameter, stale found_inf,
bounded caches and threads, tracking the model across reloads, state_dict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monitor_helpers import set_random_grads, tiny_model
from torch import nn

import fastgradstats as fgs
from fastgradstats import GradMonitor

# ----------------------------------------------------------------------------- fp16 totals


def _fp16_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 4)).half()


def _set_big_fp16_grads(model: nn.Module, gen: torch.Generator) -> float:
    """Finite fp16 gradients (|g| < 3e4) whose total 2-norm is far above 65504."""
    for p in model.parameters():
        p.grad = (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 6e4 - 3e4).half()
    flat = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    return torch.linalg.vector_norm(flat).item()


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_total_above_65504_is_a_finite_update(backend, fused):
    model, twin = _fp16_model(0), _fp16_model(0)
    if fused:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    # every=2: step 0 is recorded, step 1 only clips and checks for NaN/Inf
    monitor = GradMonitor(model, max_norm=1.0, skip_nonfinite=True, optimizer=optimizer, every=2)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        reference = _set_big_fp16_grads(model, gen)
        assert reference > 65504 * 4
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in model.parameters()]
        total = monitor.step()
        # the same clipping, nothing else: the coefficient from the float32 total (torch's
        # from the fp16 total would be 0 here, erasing the update)
        twin_total = fgs.get_total_norm([q.grad.float() for q in twin.parameters()])
        fgs.clip_grads_with_norm_(twin.parameters(), 1.0, twin_total)
        assert total.dtype == torch.float16  # torch's return dtype (inf: above fp16's range)
        assert not bool(monitor.found_inf)
        optimizer.step()  # a fused optimizer received the coefficient as grad_scale
        for p, q in zip(model.parameters(), twin.parameters()):
            # g / (1 / c) inside the fused step against g * c: one fp16 ulp apart at most
            rtol = 1e-3 if fused else 0.0
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=0, msg=f"step {step}")
            assert p.grad.abs().max() > 0
        assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    hist = monitor.history()
    assert hist.steps.tolist() == [0]
    assert not hist.skipped[0] and not hist.nonfinite[0]
    assert math.isfinite(hist.total_norm[0]) and hist.total_norm[0] > 65504
    assert hist.clip_coef[0] < 1e-4
    report = monitor.report()
    assert report.nonfinite_steps == 0 and report.skipped_steps == 0


def test_fp16_nan_is_still_skipped_and_the_history_says_so(backend):
    model = _fp16_model(2)
    monitor = GradMonitor(model, max_norm=1.0, skip_nonfinite=True)
    gen = torch.Generator().manual_seed(2)
    _set_big_fp16_grads(model, gen)
    monitor.step()
    _set_big_fp16_grads(model, gen)
    model[0].weight.grad[0, 0] = math.nan
    monitor.step()
    assert all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in model.parameters())
    hist = monitor.history()
    assert hist.skipped.tolist() == [False, True]
    assert hist.nonfinite.tolist() == [False, True]


# ----------------------------------------------------------------------------- warm-up


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
def test_spike_warmup_is_per_parameter(backend):
    """A layer that first gets gradients after warm-up (unfrozen late) and an expert that
    gets them now and then (MoE routing) are not flagged on their first steps; a real
    spike on the late layer, after its own warm-up, still is."""
    model = tiny_model(seed=4)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    late, expert = "2.weight", "4.weight"
    monitor = GradMonitor(model, history=100, spike_warmup=10)
    gen = torch.Generator().manual_seed(9)
    for step in range(70):
        set_random_grads(model, gen, scale=float(torch.empty(1).uniform_(0.8, 1.25, generator=gen)))
        if step < 30:
            params[late].grad = None  # frozen until step 30
        else:
            params[late].grad.mul_(5.0)  # its norm is far from anything seen so far
        if step < 25 or step % 7:
            params[expert].grad = None  # routed to on steps 28, 35, 42, ...
        else:
            params[expert].grad.mul_(8.0)
        if step == 60:
            params[late].grad.mul_(200.0)
        monitor.step()
    report = monitor.report()
    flagged = {(s, n) for s, n, _ in report.spikes if n != "total"}
    assert (60, late) in flagged
    assert flagged == {(60, late)}, flagged
    hist = monitor.history()
    assert hist.present[:, names.index(late)].sum() == 40


# ----------------------------------------------------------------------------- found_inf


def test_no_stale_found_inf_after_the_optimizer_step(backend):
    model = tiny_model(seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    monitor = GradMonitor(model, skip_nonfinite=True, optimizer=optimizer)
    gen = torch.Generator().manual_seed(5)
    set_random_grads(model, gen)
    monitor.step()
    optimizer.step()
    set_random_grads(model, gen)
    model[0].weight.grad[0, 0] = math.nan
    monitor.step()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # skipped by the fused kernel
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    for _ in range(3):  # the monitor is not called on these steps: they must update
        set_random_grads(model, gen)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not hasattr(optimizer, "found_inf")
    assert not hasattr(optimizer, "grad_scale")


def test_found_inf_hook_does_not_pile_up():
    model = tiny_model(seed=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    monitor = GradMonitor(model, skip_nonfinite=True, optimizer=optimizer)
    gen = torch.Generator().manual_seed(6)
    hooks = None
    for _ in range(4):
        set_random_grads(model, gen)
        monitor.step()
        monitor.step()  # called twice before one optimizer step: hooks do not pile up
        if hooks is None:
            hooks = len(optimizer._optimizer_step_post_hooks)
        assert len(optimizer._optimizer_step_post_hooks) == hooks
        optimizer.step()
        assert not hasattr(optimizer, "found_inf")
        assert len(optimizer._optimizer_step_post_hooks) == hooks
    assert hooks is not None and hooks <= 1
    # someone else's found_inf (e.g. GradScaler's) is left alone
    set_random_grads(model, gen)
    monitor.step()
    theirs = torch.zeros(())
    optimizer.found_inf = theirs
    optimizer.step()
    assert optimizer.found_inf is theirs


# ----------------------------------------------------------------------------- caches, threads


def _route(model: nn.Module, gen: torch.Generator) -> None:
    """Drop a random subset of gradients, as MoE routing does step by step."""
    for p in model.parameters():
        if torch.rand((), generator=gen) < 0.5:
            p.grad = None


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
def test_index_cache_is_bounded_under_routing(backend):
    model = tiny_model(sizes=(3, 3, 3, 3, 3, 3, 3), seed=7)  # 12 tensors: 4096 subsets
    names = [n for n, _ in model.named_parameters()]
    monitor = GradMonitor(model, history=40)
    bound = getattr(GradMonitor, "index_cache_size", 16)
    gen = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(40):
        set_random_grads(model, gen)
        _route(model, gen)
        expected.append([p.grad is not None for p in model.parameters()])
        monitor.step()
        assert len(monitor._index_cache) <= bound
    hist = monitor.history()
    assert hist.present.tolist() == expected
    assert hist.names == names


def test_monitors_in_threads(monkeypatch):
    """One monitor per thread (one thread per GPU): no shared state trips, results exact."""
    import threading

    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "torch")
    errors: list[BaseException] = []
    results: dict[int, tuple[list, list]] = {}
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            model = tiny_model(seed=k)
            monitor = GradMonitor(model, max_norm=1.0, history=30)
            gen = torch.Generator().manual_seed(k)
            want = []
            barrier.wait()
            for _ in range(30):
                set_random_grads(model, gen)
                _route(model, gen)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                want.append(fgs.get_total_norm(grads).item() if grads else 0.0)
                monitor.step()
            results[k] = (want, monitor.history().total_norm.tolist())
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for want, got in results.values():
        assert got == pytest.approx(want, rel=1e-6)


def _total(model: nn.Module) -> float:
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)).item()


def test_monitor_follows_load_state_dict_assign(backend):
    model, other, twin = tiny_model(seed=8), tiny_model(seed=9), tiny_model(seed=9)
    monitor = GradMonitor(model, max_norm=0.5)
    gen = torch.Generator().manual_seed(8)
    set_random_grads(model, gen)
    monitor.step()
    old = list(model.parameters())
    model.load_state_dict(other.state_dict(), assign=True)
    assert all(p is not q for p, q in zip(model.parameters(), old))
    set_random_grads(model, gen, scale=3.0)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    want = _total(model)
    total = monitor.step()
    assert total.item() == pytest.approx(want, rel=1e-5)
    fgs.clip_grad_norm_(twin.parameters(), 0.5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)  # the new parameters were clipped
    hist = monitor.history()
    assert hist.total_norm[1] == pytest.approx(want, rel=1e-5) and hist.present[1].all()


def test_unpickled_monitor_refuses_then_attach_reconnects(recwarn):
    """Unpickled apart from its model, the first step() raises (issue 19 item 11: it used
    to record 0 and clip nothing for 5 steps before a warning); attach() reconnects."""
    import pickle

    model = tiny_model(seed=10)
    monitor = GradMonitor(model)
    gen = torch.Generator().manual_seed(10)
    set_random_grads(model, gen)
    monitor.step()
    copy = pickle.loads(pickle.dumps(monitor))  # holds copies of the parameters, no grads
    set_random_grads(model, gen)
    with pytest.raises(RuntimeError, match=r"attach\(model\)"):
        copy.step()
    assert not [w for w in recwarn if "no monitored parameter" in str(w.message)]
    copy.attach(model)
    set_random_grads(model, gen)
    want = _total(model)
    copy.step()
    assert copy.history().total_norm[-1] == pytest.approx(want, rel=1e-5)
    # pickled together with its model, it stays attached to the unpickled model
    model2, monitor2 = pickle.loads(pickle.dumps((model, monitor)))
    set_random_grads(model2, gen)
    want = _total(model2)
    monitor2.step()
    assert monitor2.history().total_norm[-1] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="lacks"):
        monitor2.attach(tiny_model(sizes=(5, 7)))


def test_a_layer_frozen_at_construction_is_measured_and_clipped_once_unfrozen(backend):
    model, twin = tiny_model(seed=11), tiny_model(seed=11)
    for m in (model, twin):
        m[0].requires_grad_(False)
    monitor = GradMonitor(model, max_norm=0.5)
    gen = torch.Generator().manual_seed(11)
    for p in model[2:].parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    monitor.step()
    model[0].requires_grad_(True)
    twin[0].requires_grad_(True)
    set_random_grads(model, gen, scale=2.0)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    total = monitor.step()
    torch.testing.assert_close(total, want)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    hist = monitor.history()
    j = hist.names.index("0.weight")
    assert hist.present[:, j].tolist() == [False, True]


# ----------------------------------------------------------------------------- state_dict


def _resume_run(split: int | None, path, steps: int = 30):
    """Train-like loop over fixed gradients; with ``split``, save at that step and go on
    with a new monitor that loads the state (through torch.save / weights_only load)."""
    import io

    model = tiny_model(seed=12)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(12)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]
    grads[7][1][0] = math.nan
    grads[21][2].mul_(300.0)
    for k in (9, 10):
        grads[k][3] = None

    def make(file):
        monitor = GradMonitor(model, max_norm=2.0, history=16, spike_warmup=5)
        monitor.log_jsonl(file)
        return monitor

    monitor = make(path / "a.jsonl")
    for step in range(steps):
        if step == split:
            buffer = io.BytesIO()
            torch.save(monitor.state_dict(), buffer)
            buffer.seek(0)
            monitor = make(path / "b.jsonl")
            monitor.load_state_dict(torch.load(buffer, weights_only=True))
        for p, g in zip(params, grads[step]):
            p.grad = None if g is None else g.clone()
        monitor.step()
        if step % 5 == 4:
            monitor.flush()
    files = [path / "a.jsonl"] + ([path / "b.jsonl"] if split is not None else [])
    lines = [line for f in files for line in f.read_text().splitlines()]
    return monitor, lines


@pytest.mark.parametrize("split", [15, 17])  # 15: all flushed at save; 17: two rows not
def test_state_dict_resume_equals_an_uninterrupted_run(tmp_path, split):
    (tmp_path / "u").mkdir()
    (tmp_path / "r").mkdir()
    whole, whole_lines = _resume_run(None, tmp_path / "u")
    resumed, resumed_lines = _resume_run(split, tmp_path / "r")
    assert resumed_lines == whole_lines  # every row reached a writer, exactly once
    a, b = whole.history(), resumed.history()
    from fastgradstats.monitor.history import ARRAY_FIELDS

    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    report = whole.report()
    assert report.nonfinite_steps == 1 and report.spikes  # events to carry over
    assert whole.report().as_dict() == resumed.report().as_dict()
    assert whole.to_dict() == resumed.to_dict()
    sa, sb = whole.state_dict(), resumed.state_dict()
    assert sa["counters"] == sb["counters"] and sa["events"] == sb["events"]
    for key in ("mean", "var", "count"):
        assert torch.equal(sa["ema"][key], sb["ema"][key])


def test_load_state_dict_refuses_other_monitors_and_changes_nothing():
    model = tiny_model(seed=13)
    monitor = GradMonitor(model, history=8)
    set_random_grads(model, torch.Generator().manual_seed(13))
    monitor.step()
    before = monitor.state_dict()
    for other, match in [
        (GradMonitor(tiny_model(sizes=(5, 7)), history=8), "other parameters"),
        (GradMonitor(model, history=9), "history"),
        (GradMonitor(model, history=8, norm_type=1), "norm_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            monitor.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        monitor.load_state_dict({"version": 99})
    partial = dict(before)
    del partial["ema"]
    with pytest.raises(ValueError, match=r"lacks.*ema"):
        monitor.load_state_dict(partial)
    after = monitor.state_dict()
    assert after["counters"] == before["counters"]
    assert all(torch.equal(after["ring"][k], before["ring"][k]) for k in before["ring"])
