"""Logger keys of GradMonitor: styles, norm type in the key, prefix, no collisions."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import require_extra
from monitor_helpers import reference_norms, set_random_grads, tiny_model

from fastgradstats import GradMonitor
from fastgradstats.monitor.keys import Keys


def _stepped(monitor_kw=None, seed=0):
    """A monitor after one step, and the per-parameter reference norms before clipping."""
    monitor_kw = monitor_kw or {}
    model = tiny_model(seed=seed)
    monitor = GradMonitor(model, **monitor_kw)
    set_random_grads(model, torch.Generator().manual_seed(seed), scale=3.0)
    want = reference_norms(model, float(monitor_kw.get("norm_type", 2.0)))
    monitor.step()
    return model, monitor, want


@pytest.mark.parametrize(
    "norm_type,stem",
    [(2.0, "grad_norm"), (1.0, "grad_norm_1"), (math.inf, "grad_norm_inf"), (0.5, "grad_norm_0.5")],
)
def test_fastgradstats_keys_name_the_norm_type(backend, norm_type, stem):
    model, monitor, want = _stepped({"norm_type": norm_type, "max_norm": 1.0})
    data = monitor.to_dict()
    names = [n for n, _ in model.named_parameters()]
    assert monitor.total_key == f"{stem}_total"
    total = torch.linalg.vector_norm(torch.tensor(want, dtype=torch.float64), norm_type).item()
    assert data[f"{stem}_total"] == pytest.approx(total, rel=1e-5)
    for name, value in zip(names, want):
        assert data[f"{stem}/{name}"] == pytest.approx(value, rel=1e-5)
        assert f"grad_max_abs/{name}" in data
    for key in ("grad_clip_coef", "grad_nonfinite", "grad_skipped", "grad_spike_total"):
        assert key in data
    for key in ("nonfinite_steps", "skipped_steps", "spikes"):
        assert f"grad_stats/{key}" in data
    assert data["grad_clip_coef"] < 1.0
    # nothing else: every key is one of the documented families
    norm_keys = {f"{stem}/{n}" for n in names} | {f"{stem}_total"}
    other = {k for k in data if k not in norm_keys and not k.startswith("grad_max_abs/")}
    assert other == {
        "grad_clip_coef",
        "grad_nonfinite",
        "grad_skipped",
        "grad_spike_total",
        "grad_stats/nonfinite_steps",
        "grad_stats/skipped_steps",
        "grad_stats/spikes",
    }


@pytest.mark.parametrize("norm_type,tag", [(2.0, "2.0"), (1, "1.0"), ("inf", "inf")])
def test_lightning_key_style(norm_type, tag):
    model, monitor, want = _stepped({"norm_type": norm_type, "key_style": "lightning"})
    data = monitor.to_dict()
    p = float(norm_type)
    # lightning.pytorch.utilities.grad_norm: f"grad_{float(p)}_norm/{name}", "..._total"
    assert monitor.total_key == f"grad_{tag}_norm_total"
    for (name, _), value in zip(model.named_parameters(), want):
        assert data[f"grad_{tag}_norm/{name}"] == pytest.approx(value, rel=1e-5)
    total = torch.linalg.vector_norm(torch.tensor(want, dtype=torch.float64), p).item()
    assert data[f"grad_{tag}_norm_total"] == pytest.approx(total, rel=1e-5)
    assert not any(k.startswith("grad_norm") for k in data)


def test_prefix_goes_in_front_of_every_key(tmp_path):
    _, monitor, _ = _stepped({"prefix": "train/", "max_norm": 1.0})
    data = monitor.to_dict()
    assert monitor.total_key == "train/grad_norm_total"
    assert data and all(k.startswith("train/grad_") for k in data)
    assert "train/grad_stats/spikes" in data and "train/grad_spike_total" in data
    _, lightning, _ = _stepped({"prefix": "x.", "key_style": "lightning"})
    assert lightning.total_key == "x.grad_2.0_norm_total"
    assert all(k.startswith("x.grad_") for k in lightning.to_dict())


def test_a_parameter_named_total_does_not_collide_with_the_total(backend):
    gen = torch.Generator().manual_seed(3)
    named = torch.nn.Parameter(torch.zeros(4))
    other = torch.nn.Parameter(torch.zeros(5))
    named.grad = torch.randn(4, generator=gen)
    other.grad = torch.randn(5, generator=gen) * 10
    for style in ("fastgradstats", "lightning"):
        monitor = GradMonitor([("total", named), ("w", other)], key_style=style)
        monitor.step()
        data = monitor.to_dict()
        keys = monitor.keys
        own = torch.linalg.vector_norm(named.grad.double()).item()
        total = torch.linalg.vector_norm(torch.cat([named.grad, other.grad]).double()).item()
        assert data[keys.norm("total")] == pytest.approx(own, rel=1e-5)
        assert data[monitor.total_key] == pytest.approx(total, rel=1e-5)
        assert keys.norm("total") != monitor.total_key
        assert len(data) == len(set(data))  # dict keys, but: both values survived above


def test_tensorboard_tags_use_the_keys():
    class Stub:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    model = tiny_model()
    monitor = GradMonitor(model, norm_type=1, prefix="m/")
    stub = Stub()
    monitor.log_tensorboard(stub)
    gen = torch.Generator().manual_seed(12)
    for _ in range(2):
        set_random_grads(model, gen)
        monitor.step()
    monitor.flush()
    tags = {t for t, _, _ in stub.scalars}
    assert "m/grad_norm_1_total" in tags and "m/grad_norm_1/0.weight" in tags
    assert {s for _, _, s in stub.scalars} == {0, 1}


def test_bad_key_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="key_style"):
        GradMonitor(model, key_style="keras")
    with pytest.raises(TypeError, match="prefix"):
        GradMonitor(model, prefix=3)
    monitor = GradMonitor(model)
    with pytest.raises(AttributeError):
        monitor.total_key = "x"  # read-only


def test_history_without_keys_uses_the_default_style():
    _, monitor, _ = _stepped({"norm_type": 1})
    hist = monitor.history()
    hist.keys = None
    assert "grad_norm_1_total" in hist.row_dict(0)
    assert Keys(norm_type=1) == monitor.keys


@pytest.mark.parametrize("norm_type", [2.0, 1, "inf"])
def test_lightning_style_matches_lightnings_own_grad_norm(norm_type):
    lightning = require_extra("lightning.pytorch.utilities")
    model = tiny_model(seed=5)
    set_random_grads(model, torch.Generator().manual_seed(5))
    theirs = {k: float(v) for k, v in lightning.grad_norm(model, norm_type).items()}
    monitor = GradMonitor(model, norm_type=norm_type, key_style="lightning")
    monitor.step()
    ours = monitor.to_dict()
    assert monitor.total_key in theirs
    norm_keys = {k for k in ours if k == monitor.total_key or k.startswith(monitor.keys.norm(""))}
    assert norm_keys == set(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-5)
