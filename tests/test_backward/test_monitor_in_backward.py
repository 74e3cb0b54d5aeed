"""GradMonitor(in_backward=True): the step only finishes what backward measured.

Compared with the after-backward monitor on the same model, seed and data (history and
clipped gradients, bit for bit on the torch path), and checked with a recorder of aten ops
that the step after backward touches no gradient storage when no clipping is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import GradStorageRecorder

from fastgradstats import GradMonitor
from fastgradstats.dispatch import ENV_BACKEND
from fastgradstats.monitor.history import ARRAY_FIELDS


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3), torch.nn.Linear(3, 1)
    )


def _train(monitor_kwargs: dict, steps: int = 4, plant_nan_at: int | None = None):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, **monitor_kwargs)
    gen = torch.Generator().manual_seed(1)
    grads = []
    for step in range(steps):
        x = torch.randn(5, 7, generator=gen) * (10.0 if step == 2 else 1.0)  # a clip step
        loss = model(x).square().mean()
        loss.backward()
        if step == plant_nan_at:
            next(model.parameters()).grad[0, 0] = float("nan")
        monitor.step()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    return monitor, grads


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_in_backward_monitor_equals_the_after_backward_monitor(max_norm, monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "torch")
    after, after_grads = _train({"max_norm": max_norm})
    during, during_grads = _train({"max_norm": max_norm, "in_backward": True})
    for a, b in zip(after_grads, during_grads):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    ha, hb = after.history(), during.history()
    for field in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(ha, field), getattr(hb, field), err_msg=field)
    assert during.backward_stats is not None and after.backward_stats is None


def test_in_backward_monitor_skips_a_nonfinite_step(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "torch")
    during, grads = _train({"in_backward": True, "skip_nonfinite": True}, plant_nan_at=1)
    after, ref = _train({"skip_nonfinite": True}, plant_nan_at=1)
    assert during.history().nan_count[1].sum() == 1 == after.history().nan_count[1].sum()
    for a, b in zip(ref, grads):
        assert all(
            torch.equal(
                x,
                y,
            )
            for x, y in zip(a, b)
        )


@pytest.mark.parametrize("max_norm", [None, 1e6])
def test_step_after_backward_touches_no_gradient_storage(max_norm, monkeypatch):
    """Issue 18's acceptance on the torch path: a no-clip step after backward runs no
    aten op on gradient memory (the after-backward monitor reads every gradient)."""
    monkeypatch.setenv(ENV_BACKEND, "torch")
    for in_backward, expect_reads in ((True, False), (False, True)):
        model = _model()
        monitor = GradMonitor(model, max_norm=max_norm, in_backward=in_backward)
        model(torch.randn(4, 7)).sum().backward()
        grads = [p.grad for p in model.parameters()]
        with GradStorageRecorder(grads) as rec:
            monitor.step()
        assert bool(rec.touching) == expect_reads, (in_backward, rec.touching)
        assert rec.ops  # the recorder saw the step's ops at all


def test_a_clip_step_after_backward_touches_gradients_only_to_scale_them(monkeypatch):
    """With clipping, the in-backward step writes the gradients once, the scale, and reads
    them for nothing else (the after-backward monitor reads every gradient first)."""
    monkeypatch.setenv(ENV_BACKEND, "torch")
    model = _model()
    monitor = GradMonitor(model, max_norm=1e-3, in_backward=True)
    model(torch.randn(4, 7)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    before = [g.clone() for g in grads]
    with GradStorageRecorder(grads) as rec:
        monitor.step()
    assert rec.touching == ["aten._foreach_mul_.Tensor"], rec.touching
    coef = float(monitor.history().clip_coef[-1])
    assert coef < 1.0
    for g, b in zip(grads, before):
        torch.testing.assert_close(g, b * coef)


def test_in_backward_refuses_what_it_cannot_do():
    model = _model()
    with pytest.raises(TypeError, match="in_backward=True needs the model"):
        GradMonitor(list(model.named_parameters()), in_backward=True)
    with pytest.raises(ValueError, match="histograms"):
        GradMonitor(model, in_backward=True, histograms=True)
    with pytest.raises(TypeError, match="in_backward must be a bool"):
        GradMonitor(model, in_backward=1)
