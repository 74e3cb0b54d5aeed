"""GradMonitor: recording, ring buffer, NaN/spike/depth diagnosis, skipping, export, plots."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from monitor_helpers import reference_norms, set_random_grads, tiny_model
from torch import nn

from fastgradstats import GradMonitor
from fastgradstats.monitor import History, diagnose

# ----------------------------------------------------------------------------- recording


@pytest.mark.filterwarnings("ignore:GradMonitor. .* overwritten")
@pytest.mark.parametrize("steps,capacity,every", [(5, 8, 1), (13, 4, 1), (11, 3, 2), (1, 1, 1)])
def test_history_shapes_values_and_wraparound(backend, steps, capacity, every):
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    monitor = GradMonitor(model, history=capacity, every=every)
    gen = torch.Generator().manual_seed(steps)
    expected = {}
    for step in range(steps):
        set_random_grads(model, gen, scale=float(step + 1))
        monitor.step()
        if step % every == 0:
            expected[step] = reference_norms(model)
    hist = monitor.history()
    recorded = sorted(expected)
    kept = recorded[-capacity:]
    assert len(hist) == len(kept)
    assert hist.steps.tolist() == kept
    assert hist.norms.shape == (len(kept), len(names))
    assert hist.max_abs.shape == hist.nan_count.shape == hist.present.shape == hist.norms.shape
    assert hist.total_norm.shape == hist.clip_coef.shape == (len(kept),)
    assert hist.names == names
    want = np.array([expected[s] for s in kept])
    np.testing.assert_allclose(hist.norms, want, rtol=1e-5)
    np.testing.assert_allclose(hist.total_norm, np.linalg.norm(want, axis=1), rtol=1e-5)
    assert hist.present.all()
    assert (hist.nan_count == 0).all() and (hist.inf_count == 0).all()
    assert monitor.num_steps == steps


def test_clipping_matches_torch_and_records_preclip_norm(backend):
    model, twin = tiny_model(seed=1), tiny_model(seed=1)
    monitor = GradMonitor(model, max_norm=0.5)
    gen = torch.Generator().manual_seed(3)
    set_random_grads(model, gen, scale=3.0)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    total = monitor.step()
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    torch.testing.assert_close(total, want)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    hist = monitor.history()
    assert hist.total_norm[0] == pytest.approx(want.item(), rel=1e-6)
    assert hist.clip_coef[0] == pytest.approx(0.5 / (want.item() + 1e-6), rel=1e-5)


def test_missing_grads_are_masked(backend):
    model = tiny_model()
    monitor = GradMonitor(model)
    gen = torch.Generator().manual_seed(4)
    set_random_grads(model, gen)
    model[0].bias.grad = None
    monitor.step()
    for p in model.parameters():
        p.grad = None
    monitor.step()
    hist = monitor.history()
    j = hist.names.index("0.bias")
    assert not hist.present[0, j] and hist.present[0].sum() == len(hist.names) - 1
    assert hist.norms[0, j] == 0.0
    assert not hist.present[1].any() and hist.total_norm[1] == 0.0
    assert "grad_norm/0.bias" not in hist.row_dict(0)
    assert monitor.report().verdict in ("healthy", "vanishing", "exploding")


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_planted_nonfinite_reported_at_step_and_layer(backend, kind):
    model = tiny_model(seed=2)
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(5)
    bad_step = int(torch.randint(2, 9, (1,), generator=gen))
    bad_name = names[int(torch.randint(0, len(names), (1,), generator=gen))]
    params = dict(model.named_parameters())
    monitor = GradMonitor(model, history=4)  # wraps: the event must survive the ring
    for step in range(12):
        set_random_grads(model, gen)
        if step in (bad_step, bad_step + 1):  # seen twice: "first" must stay bad_step
            flat = params[bad_name].grad.view(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = (
                math.nan if kind == "nan" else math.inf
            )
        monitor.step()
        if step % 3 == 2:
            monitor.flush()
    report = monitor.report()
    assert report.first_nonfinite_step == bad_step
    assert set(report.first_nonfinite) == {bad_name}
    step, nan_count, inf_count = report.first_nonfinite[bad_name]
    assert step == bad_step
    assert (nan_count, inf_count) == ((1, 0) if kind == "nan" else (0, 1))
    assert report.nonfinite_steps == 2
    assert f"step {bad_step}" in report.summary() and bad_name in report.summary()


@pytest.mark.parametrize("fused", [False, True])
def test_skip_nonfinite_prevents_the_update(backend, fused):
    model = tiny_model(seed=3)
    if fused:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, max_norm=1.0, skip_nonfinite=True, optimizer=optimizer)
    gen = torch.Generator().manual_seed(6)

    set_random_grads(model, gen)
    monitor.step()
    optimizer.step()  # a normal step first, so Adam has state to protect
    before = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]

    set_random_grads(model, gen)
    model[0].weight.grad[0, 0] = math.nan
    monitor.step()
    optimizer.step()
    for p, old in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
    for p, old in zip(model.parameters(), states):
        for key, value in old.items():
            torch.testing.assert_close(optimizer.state[p][key], value, rtol=0, atol=0)

    set_random_grads(model, gen)
    monitor.step()
    optimizer.step()
    assert all(not torch.equal(p.detach(), old) for p, old in zip(model.parameters(), before)), (
        "a finite step after a skipped one must update again"
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    report = monitor.report()
    assert report.skipped_steps == 1
    assert monitor.history().skipped.tolist() == [False, True, False]


def test_without_skip_a_nan_step_poisons_the_weights():
    """Control for the test above: the update really would have happened."""
    model = tiny_model(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, max_norm=1.0)
    set_random_grads(model, torch.Generator().manual_seed(6))
    model[0].weight.grad[0, 0] = math.nan
    monitor.step()
    optimizer.step()
    assert not torch.isfinite(model[0].weight).all()


# ----------------------------------------------------------------------------- no sync


_SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def test_step_never_syncs_on_meta_device():
    """On the meta device any read of a value raises, so a clean pass proves no sync."""
    model = tiny_model(sizes=(4, 6, 6, 3)).to("meta")
    for max_norm, skip in [(None, False), (1.0, False), (1.0, True), (None, True)]:
        monitor = GradMonitor(
            model, max_norm=max_norm, history=3, skip_nonfinite=skip, backend="torch"
        )
        for step in range(7):
            for p in model.parameters():
                p.grad = torch.empty_like(p)
            if step == 4:
                model[0].bias.grad = None
            total = monitor.step()
            assert total is not None and total.device.type == "meta"
        assert monitor.found_inf.device.type == "meta"


@pytest.mark.filterwarnings("ignore:GradMonitor. .* overwritten")
def test_step_makes_no_host_read_itself(backend, monkeypatch):
    """Counts value reads issued from the monitor package during step() (the CPU torch
    backend may read CPU tensors for free, which the meta-device test covers separately)."""
    import fastgradstats.monitor as monitor_package

    package_dir = os.path.dirname(monitor_package.__file__)

    calls = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.dirname(caller) == package_dir:
                calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    model = tiny_model()
    monitor = GradMonitor(model, max_norm=0.3, history=4, skip_nonfinite=True, every=2)
    gen = torch.Generator().manual_seed(8)
    for name in _SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for step in range(9):
        set_random_grads(model, gen)
        if step == 5:
            model[2].weight.grad = None
        monitor.step()
    assert calls == []
    monkeypatch.undo()
    assert len(monitor.history()) == 4


# ----------------------------------------------------------------------------- spikes


def _spike_run(spike_at: int | None, steps: int = 60, layer: int = 2):
    model = tiny_model(seed=4)
    params = list(model.parameters())
    monitor = GradMonitor(model, history=steps, spike_warmup=10)
    gen = torch.Generator().manual_seed(9)
    for step in range(steps):
        # steady noise: each step's scale drifts by a few percent
        set_random_grads(model, gen, scale=float(torch.empty(1).uniform_(0.8, 1.25, generator=gen)))
        if step == spike_at:
            params[layer].grad.mul_(200.0)
        monitor.step()
    return monitor, [n for n, _ in model.named_parameters()][layer]


def test_synthetic_spike_is_flagged():
    monitor, name = _spike_run(spike_at=41)
    report = monitor.report()
    spikes = {(s, n) for s, n, _ in report.spikes}
    assert (41, name) in spikes
    assert (41, "total") in spikes
    assert all(s == 41 for s, _ in spikes), spikes
    hist = monitor.history()
    assert hist.spike_total.tolist().count(True) == 1 and hist.spike_total[41]


def test_steady_run_has_no_spike():
    monitor, _ = _spike_run(spike_at=None, steps=120)
    assert monitor.report().spikes == []
    assert not monitor.history().spike_layer.any()


def test_spike_during_warmup_is_not_flagged():
    monitor, _ = _spike_run(spike_at=3)
    assert all(s != 3 for s, _, _ in monitor.report().spikes)


# ----------------------------------------------------------------------------- depth


def _mlp(depth: int, width: int, act: type[nn.Module], gain: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    dims = [8] + [width] * (depth - 1) + [1]
    for i in range(depth):
        linear = nn.Linear(dims[i], dims[i + 1])
        nn.init.normal_(linear.weight, std=gain / math.sqrt(dims[i]))
        nn.init.zeros_(linear.bias)
        layers += [linear, act()]
    return nn.Sequential(*layers[:-1])


def _train(model: nn.Module, steps: int, lr: float, seed: int, **kw) -> GradMonitor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    monitor = GradMonitor(model, history=steps, **kw)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        monitor.step()
        optimizer.step()
    return monitor


@pytest.mark.parametrize("seed", [0, 1])
def test_deep_sigmoid_net_is_diagnosed_vanishing(seed):
    monitor = _train(_mlp(10, 24, nn.Sigmoid, 1.0, seed), steps=30, lr=0.1, seed=seed)
    report = monitor.report()
    assert report.verdict == "vanishing", report.summary()
    assert report.depth_ratio < 1e-2 and report.depth_slope > 0
    assert "VANISHING" in report.summary()


@pytest.mark.parametrize("seed", [0, 1])
def test_large_init_net_is_diagnosed_exploding(seed):
    monitor = _train(_mlp(10, 24, nn.ReLU, 2.2, seed), steps=15, lr=0.01, seed=seed)
    report = monitor.report()
    assert report.verdict == "exploding", report.summary()
    assert not report.contained


def test_large_init_net_with_clipping_is_clipped_not_exploding():
    # issue 20: a raw norm far above max_norm that does not grow is "clipped", not exploding
    monitor = _train(_mlp(10, 24, nn.ReLU, 2.2, 0), steps=15, lr=0.01, seed=0, max_norm=1.0)
    report = monitor.report()
    assert report.nonfinite_steps == 0
    assert report.verdict == "clipped" and not report.contained, report.summary()


def test_well_initialised_relu_net_is_healthy():
    monitor = _train(_mlp(6, 24, nn.ReLU, math.sqrt(2.0), 0), steps=30, lr=0.01, seed=0)
    report = monitor.report()
    assert report.verdict == "healthy", report.summary()
    assert report.first_nonfinite == {} and report.spikes == []


# ----------------------------------------------------------------------------- export


def test_to_dict_keys_and_values(backend):
    model = tiny_model()
    monitor = GradMonitor(model, max_norm=1.0)
    set_random_grads(model, torch.Generator().manual_seed(10), scale=5.0)
    want = reference_norms(model)
    monitor.step()
    data = monitor.to_dict()
    names = [n for n, _ in model.named_parameters()]
    for name, value in zip(names, want):
        assert data[f"grad_norm/{name}"] == pytest.approx(value, rel=1e-5)
        assert f"grad_max_abs/{name}" in data
    assert data["grad_norm_total"] == pytest.approx(math.hypot(*want), rel=1e-5)
    assert data["grad_clip_coef"] < 1.0
    assert data["grad_stats/nonfinite_steps"] == 0.0
    assert all(isinstance(v, float) for v in data.values())


def test_jsonl_and_csv_parse_back(tmp_path):
    model = tiny_model()
    monitor = GradMonitor(model, history=16)
    jsonl = monitor.log_jsonl(tmp_path / "g.jsonl").path
    csv_path = monitor.log_csv(tmp_path / "g.csv").path
    gen = torch.Generator().manual_seed(11)
    for step in range(7):
        set_random_grads(model, gen)
        if step == 4:
            model[2].bias.grad[0] = math.nan
        monitor.step()
        if step == 2:
            monitor.flush()  # writers append chunk by chunk
    hist = monitor.history()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(7))
    for t, record in enumerate(records):
        assert float(record["total_norm"]) == pytest.approx(hist.total_norm[t], nan_ok=True)
        for j, name in enumerate(hist.names):
            assert float(record["norm"][name]) == pytest.approx(hist.norms[t, j], nan_ok=True)
    assert records[4]["nonfinite"] and records[4]["nan_count"]["2.bias"] == 1
    assert records[4]["total_norm"] == "NaN"
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 * len(hist.names)
    for row in rows:
        t, j = int(row["step"]), hist.names.index(row["param"])
        assert float(row["norm"]) == pytest.approx(hist.norms[t, j], nan_ok=True)
        assert int(row["nan_count"]) == hist.nan_count[t, j]


def test_tensorboard_writer_with_a_stub():
    class Stub:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    model = tiny_model()
    monitor = GradMonitor(model)
    stub = Stub()
    monitor.log_tensorboard(stub)
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):
        set_random_grads(model, gen)
        monitor.step()
    monitor.flush()
    assert {s for _, _, s in stub.scalars} == {0, 1, 2}
    assert "grad_norm_total" in {t for t, _, _ in stub.scalars}


# ----------------------------------------------------------------------------- plots


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from fastgradstats.monitor.plots import plot_heatmap, plot_history, plot_total_norm

    model = tiny_model()
    monitor = GradMonitor(model, max_norm=2.0, spike_warmup=5)
    gen = torch.Generator().manual_seed(13)
    for step in range(20):
        set_random_grads(model, gen)
        if step == 12:
            model[0].weight.grad.mul_(1000)
        if step == 15:
            model[0].weight.grad[0, 0] = math.inf
        monitor.step()
    path = monitor.plot(tmp_path / "sub" / "h.png", title="t")
    assert path.exists() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = monitor.history()
    ax = plot_heatmap(hist)
    assert ax.get_xlabel() == "step" and "parameter" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == hist.names
    ax = plot_total_norm(hist)
    assert ax.get_xlabel() == "step" and "norm" in ax.get_ylabel()
    labels = ax.get_legend_handles_labels()[1]
    assert any("max_norm=2" in s for s in labels) and any("NaN/Inf" in s for s in labels)
    assert any("spike" in s for s in labels)
    with pytest.raises(TypeError, match="history"):
        plot_history(object(), tmp_path / "x.png")


# ----------------------------------------------------------------------------- arguments


def test_bad_arguments_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="history"):
        GradMonitor(model, history=0)
    with pytest.raises(ValueError, match="every"):
        GradMonitor(model, every=0)
    with pytest.raises(ValueError, match="max_norm"):
        GradMonitor(model, max_norm=-1.0)
    with pytest.raises(ValueError, match="no parameters"):
        GradMonitor(nn.ReLU())
    with pytest.raises(TypeError, match="model"):
        GradMonitor(3)
    with pytest.raises(ValueError, match="spike_beta"):
        GradMonitor(model, spike_beta=1.0)


def test_diagnose_of_an_empty_history():
    monitor = GradMonitor(tiny_model())
    hist = monitor.history()
    assert isinstance(hist, History) and len(hist) == 0
    report = diagnose(hist)
    assert report.verdict == "no_data" and report.steps == 0  # no verdict without data
    assert monitor.to_dict()["grad_stats/spikes"] == 0.0
