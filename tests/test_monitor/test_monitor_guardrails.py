"""GradMonitor guardrails: max_norm=0, no gradients at all, lazy parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
from monitor_helpers import set_random_grads, tiny_model
from torch import nn

from fastgradstats import GradMonitor


def test_max_norm_zero_means_off_and_warns_once(backend):
    model = tiny_model(seed=1)
    with pytest.warns(UserWarning, match="max_norm=0") as caught:
        monitor = GradMonitor(model, max_norm=0)
    assert len([w for w in caught if "max_norm=0" in str(w.message)]) == 1
    assert monitor.max_norm is None
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning on the steps
        for _ in range(3):
            set_random_grads(model, gen, scale=10.0)
            before = [p.grad.clone() for p in model.parameters()]
            monitor.step()
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p.grad, b)  # torch's max_norm=0 would zero them all
    hist = monitor.history()
    assert (hist.clip_coef == 1.0).all() and hist.max_norm is None
    assert "Clipping" not in monitor.report().summary()


def test_every_grad_none_for_several_steps_warns_and_is_not_healthy(recwarn):
    model = tiny_model(seed=2)
    monitor = GradMonitor(model, max_norm=1.0)
    gen = torch.Generator().manual_seed(2)
    set_random_grads(model, gen)
    monitor.step()
    n = monitor.no_grad_warn_steps
    for _ in range(n - 1):  # e.g. DeepSpeed ZeRO: the grads live elsewhere
        model.zero_grad(set_to_none=True)
        monitor.step()
    assert not [w for w in recwarn if "no monitored parameter" in str(w.message)]
    assert monitor.report().verdict != "no_gradients"  # n-1 empty steps: not yet
    monitor.step()
    warned = [w for w in recwarn if "no monitored parameter" in str(w.message)]
    assert len(warned) == 1 and issubclass(warned[0].category, RuntimeWarning)
    report = monitor.report()
    assert report.verdict == "no_gradients", report.summary()
    assert "healthy" not in report.summary().lower()
    assert "NO GRADIENTS" in report.findings[0]
    # gradients come back: the streak ends, a later streak warns again
    set_random_grads(model, gen)
    monitor.step()
    assert monitor.report().verdict != "no_gradients"
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        monitor.step()
    assert len([w for w in recwarn if "no monitored parameter" in str(w.message)]) == 2


def test_a_monitor_that_never_saw_a_gradient_is_not_healthy():
    model = tiny_model(seed=3)
    monitor = GradMonitor(model)
    with pytest.warns(RuntimeWarning, match="no monitored parameter"):
        for _ in range(monitor.no_grad_warn_steps):
            monitor.step()
    assert monitor.report().verdict == "no_gradients"
    assert monitor.report().as_dict()["verdict"] == "no_gradients"


def test_lazy_parameters_get_a_clear_error():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"lazy.*'0\.weight'.*forward pass"):
        GradMonitor(model)
    model(torch.randn(3, 5))  # materializes the lazy parameters
    monitor = GradMonitor(model)
    model(torch.randn(3, 5)).sum().backward()
    monitor.step()
    assert monitor.history().present.all()


def test_heatmap_leaves_out_parameters_that_never_had_a_gradient():
    pytest.importorskip("matplotlib")
    from fastgradstats.monitor.plots import plot_heatmap

    model = tiny_model(seed=4)
    model[0].requires_grad_(False)  # frozen: tracked, never a gradient
    monitor = GradMonitor(model)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p in model[2:].parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        monitor.step()
    hist = monitor.history()
    assert hist.names[:2] == ["0.weight", "0.bias"] and not hist.present[:, :2].any()
    ax = plot_heatmap(hist)
    assert [t.get_text() for t in ax.get_yticklabels()] == hist.names[2:]
    assert "2 parameters without any gradient" in ax.get_title()
    import matplotlib.pyplot as plt

    plt.close("all")
