"""GradMonitor state that must not lose an update (issue 19 items 9, 10, 11).

* item 9: ``skip_nonfinite`` and the verdict come from the NaN/Inf counts of the pass,
  for every norm type (a 0-norm counts a NaN as a nonzero: its total stays finite);
* item 10: a version-1 state (spike EMA updated on the device at every recorded step)
  resumes with the spike flags the old monitor computed, instead of replaying its unflushed
  rows against an EMA that already holds them;
* item 11: a monitor restored by unpickling refuses its first step while it watches the
  unpickled copy of the model, instead of recording 0 and clipping nothing.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from monitor_helpers import set_random_grads, tiny_model

from fastgradstats import GradMonitor

# --- item 9: skip and verdict from the NaN/Inf counts -------------------------------------


def _ref_norm(grads: list[torch.Tensor], p: float) -> float:
    norms = torch.stack([torch.linalg.vector_norm(g.double(), p) for g in grads])
    return float(torch.linalg.vector_norm(norms, p))


@pytest.mark.parametrize(
    "norm_type,bad",
    [(0.0, math.nan), (0.0, math.inf), (0.5, math.nan), (0.5, math.inf), (3.0, math.nan)],
    ids=str,
)
def test_a_nonfinite_gradient_is_skipped_and_reported_for_every_norm_type(norm_type, bad, backend):
    """The norm types without Triton kernels (the Triton case runs torch's): a 0-norm
    counts a NaN as a nonzero, so only the NaN/Inf counts see it."""
    _skip_and_report(norm_type, bad)


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf], ids=str)
def test_a_nan_gradient_is_skipped_and_reported_on_the_fused_norms(norm_type, backend):
    _skip_and_report(norm_type, math.nan)


def _skip_and_report(norm_type: float, bad: float) -> None:
    model = tiny_model(sizes=(3, 4, 2), seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, norm_type=norm_type, skip_nonfinite=True, history=8)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        set_random_grads(model, gen)
        if step == 1:
            model[0].weight.grad[1, 2] = bad
            model[2].bias.grad[0] = bad
        grads = [p.grad.clone() for p in model.parameters()]
        total = monitor.step(opt)
        found = bool(monitor.found_inf)
        assert found == (step == 1), (step, float(total))
        want = _ref_norm(grads, norm_type)
        if math.isfinite(want):
            assert float(total) == pytest.approx(want, rel=1e-5)
        if step == 1:  # a plain optimizer: the gradients are zeroed on the skipped step
            assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
        else:
            for p, g in zip(model.parameters(), grads):
                assert torch.equal(p.grad, g)
    history = monitor.history()
    assert history.nonfinite.tolist() == [False, True, False]
    assert history.skipped.tolist() == [False, True, False]
    report = monitor.report()
    # Inf gradients read as an overflow: "exploding" outranks "nonfinite" by design
    assert report.verdict == ("nonfinite" if math.isnan(bad) else "exploding")
    assert report.nonfinite_steps == 1
    assert report.skipped_steps == 1 and report.first_nonfinite_step == 1
    assert set(report.first_nonfinite) == {"0.weight", "2.bias"}


@pytest.mark.parametrize("norm_type", [0.0, 3.0], ids=str)
def test_a_fused_optimizer_gets_found_inf_under_any_norm_type(norm_type, backend):
    """A fused optimizer receives ``found_inf`` and skips the update (parameters and step
    counter unchanged), the gradients left as they are."""
    model = tiny_model(sizes=(3, 4, 2), seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    monitor = GradMonitor(model, norm_type=norm_type, skip_nonfinite=True, optimizer=opt)
    gen = torch.Generator().manual_seed(2)
    set_random_grads(model, gen)
    model[0].weight.grad[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    monitor.step()
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert not hasattr(opt, "found_inf")


def test_the_verdict_counts_nan_without_skip_nonfinite(backend):
    """Recorded rows alone (no skip): the NaN row is nonfinite under ``norm_type=0``."""
    model = tiny_model(sizes=(3, 4, 2), seed=3)
    monitor = GradMonitor(model, norm_type=0, history=8)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        set_random_grads(model, gen)
        if step == 2:
            model[2].weight.grad[0, 0] = math.nan
        monitor.step()
    history = monitor.history()
    assert history.nonfinite.tolist() == [False, False, True]
    assert not history.skipped.any()
    assert monitor.report().verdict == "nonfinite"


# --- item 10: version-1 states ------------------------------------------------------------


def _spiky_run(monitor: GradMonitor, model, steps: range, spike_at: int) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)  # the same gradients in every run
        set_random_grads(model, gen, scale=5.0 if step == spike_at else 1.0)
        monitor.step()


def _v1_state(monitor: GradMonitor) -> dict:
    """The state the version-1 monitor would have saved at this point.

    Version 1 updated the spike EMA on the device at every recorded step and kept each
    row's spike flags (and found_inf) in the device ring: so its "ema" already holds the
    rows recorded after the last flush, and ring["spike"] has their flags. Built here
    from a twin that flushes (which feeds those rows to the same EMA rule).
    """
    state = monitor.state_dict()
    twin = pickle.loads(pickle.dumps(monitor))
    twin.attach(monitor._model)
    capacity, n = monitor.capacity, len(monitor.names)
    first, last = monitor._flushed, monitor._recorded
    chunk = twin.flush()
    spike = torch.zeros(capacity, n + 1, dtype=torch.bool)
    for k, row in enumerate(range(first, last)):
        spike[row % capacity, :n] = torch.from_numpy(chunk.spike_layer[k])
        spike[row % capacity, n] = bool(chunk.spike_total[k])
    state["version"] = 1
    state["ema"] = twin._spikes.state_dict()
    state["ring"]["spike"] = spike
    state["ring"]["found"] = ~torch.isfinite(state["ring"]["total"])
    return state


@pytest.mark.parametrize("flush_at", [None, 12])
def test_a_version_1_state_keeps_the_spike_it_already_flagged(flush_at):
    model = tiny_model(sizes=(4, 6, 3), seed=4)
    spike_at, save_at, total = 18, 20, 30
    kwargs = {"history": 32, "spike_warmup": 5}

    straight = GradMonitor(model, **kwargs)
    _spiky_run(straight, model, range(total), spike_at)
    want = straight.history()
    assert want.spike_total[spike_at]  # the 5x step is a spike of the total norm

    first = GradMonitor(model, **kwargs)
    if flush_at is None:
        _spiky_run(first, model, range(save_at), spike_at)
    else:
        _spiky_run(first, model, range(flush_at), spike_at)
        first.flush()
        _spiky_run(first, model, range(flush_at, save_at), spike_at)
    state = _v1_state(first)

    resumed = GradMonitor(model, **kwargs)
    resumed.load_state_dict(state)
    _spiky_run(resumed, model, range(save_at, total), spike_at)
    got = resumed.history()
    np.testing.assert_array_equal(got.spike_total, want.spike_total)
    np.testing.assert_array_equal(got.spike_layer, want.spike_layer)
    assert (
        resumed.to_dict()[resumed.keys.tally("spikes")]
        == straight.to_dict()[straight.keys.tally("spikes")]
    )


def test_a_version_1_state_saved_again_before_a_flush_keeps_its_flags():
    """Loaded from version 1, saved again before any flush, then loaded: the rows whose
    flags came from version 1 are still not replayed."""
    model = tiny_model(sizes=(4, 6, 3), seed=5)
    kwargs = {"history": 32, "spike_warmup": 5}
    straight = GradMonitor(model, **kwargs)
    _spiky_run(straight, model, range(26), 18)
    first = GradMonitor(model, **kwargs)
    _spiky_run(first, model, range(20), 18)
    middle = GradMonitor(model, **kwargs)
    middle.load_state_dict(_v1_state(first))
    _spiky_run(middle, model, range(20, 23), 18)
    state = middle.state_dict()
    assert state["version"] == 2 and "ema_ahead" in state
    last = GradMonitor(model, **kwargs)
    bad = dict(state, ema_ahead={"start": 0, "spikes": torch.zeros(30, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="ema_ahead"):
        last.load_state_dict(bad)
    assert last.num_steps == 0
    last.load_state_dict(state)
    _spiky_run(last, model, range(23, 26), 18)
    np.testing.assert_array_equal(last.history().spike_total, straight.history().spike_total)


# --- item 11: unpickled monitors ------------------------------------------------------------


def test_an_unpickled_monitor_refuses_to_step_on_the_pickled_copy(backend):
    model = tiny_model(seed=6)
    monitor = GradMonitor(model, max_norm=0.1, history=8)
    gen = torch.Generator().manual_seed(6)
    set_random_grads(model, gen)
    monitor.step()
    copy = pickle.loads(pickle.dumps(monitor))  # bound to a copy of the model, no grads
    set_random_grads(model, gen)
    grads = [p.grad.clone() for p in model.parameters()]
    for _ in range(2):  # every try, until attach: nothing recorded, nothing lost
        with pytest.raises(RuntimeError, match=r"unpickled.*attach\(model\)"):
            copy.step()
    assert copy.num_steps == 1 and len(copy.history()) == 1
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)  # not clipped, not touched
    copy.attach(model)
    total = copy.step()
    want = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert float(total) == pytest.approx(want, rel=1e-5)
    coef = 0.1 / (want + 1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad.double(), g.double() * coef, rtol=1e-5, atol=1e-7)
    assert copy.history().total_norm[-1] == pytest.approx(want, rel=1e-5)


def test_a_monitor_unpickled_with_its_model_steps_normally():
    model = tiny_model(seed=7)
    monitor = GradMonitor(model, history=8)
    model2, monitor2 = pickle.loads(pickle.dumps((model, monitor)))
    gen = torch.Generator().manual_seed(7)
    set_random_grads(model2, gen)
    total = monitor2.step()
    want = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model2.parameters()))
    assert float(total) == pytest.approx(want, rel=1e-5)
