"""The spike detector (fastgradstats.monitor.spikes), which runs at flush on the host.

It must not matter when flush() happens: flushing after every step, every few steps or
once at the end gives the same spikes, and a state_dict taken between flushes resumes to
the same spikes. The rule itself is checked against a float64 re-implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monitor_helpers import set_random_grads, tiny_model

from fastgradstats import GradMonitor
from fastgradstats.monitor.spikes import SpikeDetector

NAN = float("nan")


def _reference(values, present, threshold, min_ratio, beta, warmup):
    """The published rule, one column at a time, in float64 Python floats."""
    t, cols = values.shape
    out = np.zeros((t, cols), dtype=bool)
    for c in range(cols):
        mean = var = 0.0
        count = 0
        for k in range(t):
            v = float(values[k, c])
            if not (present[k, c] and math.isfinite(v)):
                continue
            log = math.log(max(v, 1e-30))
            dev = log - mean
            out[k, c] = (
                count >= max(warmup, 1)
                and dev > threshold * math.sqrt(var)
                and dev > math.log(min_ratio)
            )
            alpha = max(1.0 / (count + 1), 1.0 - beta)
            mean += alpha * dev
            var = (1.0 - alpha) * (var + alpha * dev * dev)
            count += 1
    return out


def test_detector_matches_a_float64_reference_and_any_split_of_the_rows():
    rng = np.random.default_rng(4)
    t, n = 90, 5
    norms = np.exp(rng.normal(0.0, 0.05, size=(t, n)))
    norms[40, 1] *= 50.0  # a spike
    norms[60, 3] = NAN  # non-finite: neither judged nor learned from
    norms[70, 0] *= 1e-3  # a dip is not a spike
    present = np.ones((t, n), dtype=bool)
    present[:30, 4] = False  # a parameter that gets gradients late: its own warm-up
    present[30, 4] = True
    norms[35, 4] *= 40.0  # within its warm-up (5 updates): not flagged
    total = np.sqrt(np.nansum(norms**2, axis=1))
    args = (6.0, 2.0, 0.98, 10)
    whole = SpikeDetector(n, *args, dtype=torch.float64).update(norms, total, present)
    values = np.concatenate([norms, total[:, None]], axis=1)
    present_ext = np.concatenate([present, present.any(axis=1, keepdims=True)], axis=1)
    np.testing.assert_array_equal(whole, _reference(values, present_ext, *args))
    # the spike, and the total at both steps; column 4 is still warming up at step 35
    assert {tuple(ix) for ix in np.argwhere(whole)} == {(40, 1), (40, n), (35, n)}
    split = SpikeDetector(n, *args, dtype=torch.float64)
    pieces = [split.update(norms[a:b], total[a:b], present[a:b])
              for a, b in [(0, 1), (1, 33), (33, 33), (33, 89), (89, 90)]]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    float32 = SpikeDetector(n, *args).update(norms, total, present)  # the monitor's dtype
    np.testing.assert_array_equal(float32, whole)


def _run(flush_every: int | None, steps: int = 70, state_at: int | None = None):
    model = tiny_model(sizes=(6, 8, 4))
    monitor = GradMonitor(model, history=steps, spike_warmup=10)
    gen = torch.Generator().manual_seed(9)
    for step in range(steps):
        set_random_grads(model, gen)
        if step == 50:
            model[0].weight.grad.mul_(80.0)
        if step == state_at:
            state = monitor.state_dict()  # rows since the last flush are in it
            monitor = GradMonitor(model, history=steps, spike_warmup=10)
            monitor.load_state_dict(state)
        monitor.step()
        if flush_every and step % flush_every == 0:
            monitor.flush()
    history = monitor.history()
    return history.spike_layer.copy(), history.spike_total.copy()


@pytest.mark.parametrize("flush_every", [1, 7])
def test_spikes_do_not_depend_on_when_flush_runs(flush_every):
    layer, total = _run(None)
    assert layer[50, 0] and total[50] and layer.sum() == 1
    other_layer, other_total = _run(flush_every)
    np.testing.assert_array_equal(other_layer, layer)
    np.testing.assert_array_equal(other_total, total)


def test_state_dict_between_flushes_resumes_the_same_spikes():
    layer, total = _run(None)
    resumed_layer, resumed_total = _run(10, state_at=45)  # flushed at 40, 5 rows pending
    np.testing.assert_array_equal(resumed_layer, layer)
    np.testing.assert_array_equal(resumed_total, total)


def test_detector_state_dict_checks_shapes():
    detector = SpikeDetector(3, 6.0, 2.0, 0.98, 5)
    state = detector.state_dict()
    assert set(state) == {"mean", "var", "count"} and state["mean"].shape == (4,)
    with pytest.raises(ValueError, match="ema field 'mean'"):
        SpikeDetector(4, 6.0, 2.0, 0.98, 5).load_state_dict(state)


def test_a_version_1_state_dict_still_loads():
    """Version 1 kept the spike flags and found_inf in the device ring; both are now
    derived (at flush), so their extra fields are ignored."""
    model = tiny_model(sizes=(6, 8, 4))
    monitor = GradMonitor(model, history=16)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        set_random_grads(model, gen)
        monitor.step()
    state = monitor.state_dict()
    assert state["version"] == 2
    n = len(monitor.names)
    state["version"] = 1
    state["ring"]["found"] = torch.zeros(16, dtype=torch.bool)
    state["ring"]["spike"] = torch.zeros(16, n + 1, dtype=torch.bool)
    resumed = GradMonitor(model, history=16)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.history().norms, monitor.history().norms)
