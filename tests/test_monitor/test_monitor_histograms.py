"""GradMonitor(histograms=True): the device histogram ring, report/to_dict precision,
TensorBoard (read back from the event file) and W&B (offline run file) exports, plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import require_extra
from histogram_helpers import cast_truth, numpy_reference, planted
from monitor_helpers import set_random_grads, tiny_model
from wandb_helpers import finish_run

from fastgradstats import GradMonitor
from fastgradstats import constants as C
from fastgradstats import precision as P
from fastgradstats.monitor import writers as W
from fastgradstats.monitor.history import HistogramHistory

NAN, INF = float("nan"), float("inf")


def _plant(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    """Gradients spanning zeros, fp16 subnormals/flushes, huge values, NaN and Inf."""
    grads = []
    for k, p in enumerate(model.parameters()):
        g = planted(p.numel(), torch.float32, seed=seed * 10 + k).reshape(p.shape)
        p.grad = g
        grads.append(g.clone())
    return grads


def test_histograms_match_numpy_every_k_steps_before_clipping(backend):
    model = tiny_model(sizes=(9, 13, 7, 3))
    monitor = GradMonitor(model, max_norm=1e-3, histograms=True, histogram_every=2, every=1)
    seen = {}
    for step in range(7):
        seen[step] = _plant(model, step)
        if step == 4:
            model[0].bias.grad = None
            seen[step][1] = None
        monitor.step()
    hist = monitor.histogram_history()
    assert isinstance(hist, HistogramHistory)
    assert hist.steps.tolist() == [0, 2, 4, 6]  # recorded steps 0, 2, 4, 6 (every=2)
    assert hist.counts.shape == (4, len(monitor.names), C.NUM_BINS)
    for k, step in enumerate(hist.steps.tolist()):
        for j, g in enumerate(seen[step]):
            if g is None:
                assert not hist.present[k, j] and hist.counts[k, j].sum() == 0
                continue
            ref, zeros = numpy_reference(g)  # the gradients as backward left them
            np.testing.assert_array_equal(hist.counts[k, j], ref, err_msg=f"{step} {j}")
            assert hist.zero_count[k, j] == zeros and hist.present[k, j]
            v = g.double().abs()
            assert (math.isnan(hist.max_abs[k, j]) and torch.isnan(v).any()) or hist.max_abs[
                k, j
            ] == pytest.approx(float(v.max()), rel=1e-6)
    # the History carries them too, and select() keeps only its steps' histograms
    full = monitor.history()
    assert full.histograms.steps.tolist() == [0, 2, 4, 6]
    assert full.select(slice(3, 6)).histograms.steps.tolist() == [4]


def test_step_with_histograms_never_syncs_on_meta_device():
    """On the meta device any read of a value raises: a clean pass proves no sync."""
    model = tiny_model(sizes=(4, 6, 3)).to("meta")
    for max_norm in (None, 1.0):
        # backend="torch": Triton cannot run on meta tensors (FASTGRADSTATS_BACKEND=triton)
        monitor = GradMonitor(
            model,
            max_norm=max_norm,
            history=4,
            histograms=True,
            histogram_history=2,
            backend="torch",
        )
        for step in range(5):
            for p in model.parameters():
                p.grad = torch.empty_like(p)
            if step == 3:
                model[0].bias.grad = None
            assert monitor.step().device.type == "meta"
        assert monitor._hist_recorded == 5
        assert monitor._hist_ring.counts.device.type == "meta"


def test_flush_per_interval_and_lost_histograms_warn():
    model = tiny_model()
    monitor = GradMonitor(model, history=50, histograms=True, histogram_history=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        set_random_grads(model, gen)
        monitor.step()
    with pytest.warns(UserWarning, match="histograms were overwritten"):
        chunk = monitor.flush()
    assert chunk.histograms.steps.tolist() == [1, 2] and monitor.lost_histograms == 1
    set_random_grads(model, gen)
    monitor.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.flush().histograms.steps.tolist() == [3]
    assert monitor.histogram_history().steps.tolist() == [2, 3]
    # resuming from a state_dict starts the histogram ring empty (documented)
    other = GradMonitor(model, history=50, histograms=True, histogram_history=2)
    other.load_state_dict(monitor.state_dict())
    assert len(other.histogram_history()) == 0
    assert GradMonitor(model).histogram_history() is None


def test_to_dict_precision_keys_match_a_float64_cast():
    model = tiny_model(sizes=(30, 40, 5))
    monitor = GradMonitor(model, histograms=True, prefix="t/")
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 2.0**-14  # straddles fp16's normals
    model[0].weight.grad[0, :5] = 0.0
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    monitor.step()
    out = monitor.to_dict()
    assert monitor.histogram_dtypes == [torch.float16, torch.float8_e4m3fn]  # fp32 default
    for name, g in grads.items():
        assert out[f"t/grad_zero_frac/{name}"] == pytest.approx(float((g == 0).double().mean()))
        for dtype in monitor.histogram_dtypes:
            fmt = P.float_format(dtype)
            truth = cast_truth(g, fmt)
            d = truth["nonzero"]
            prefix = f"t/grad_{fmt.name}_"
            assert out[prefix + f"flush_to_zero/{name}"] == pytest.approx(truth["flush"] / d)
            assert out[prefix + f"subnormal/{name}"] == pytest.approx(truth["sub"] / d)
            assert out[prefix + f"overflow/{name}"] == truth["over"] / d == 0.0
    assert out["t/grad_fp16_subnormal/0.weight"] > 0.3  # the data really straddles


def test_report_lines_and_target_dtypes():
    model = tiny_model().to(torch.bfloat16)
    monitor = GradMonitor(model, histograms=True)
    assert monitor.histogram_dtypes == [torch.bfloat16]  # the grads' own 16-bit dtype
    monitor = GradMonitor(tiny_model(), histograms=True, histogram_dtypes="fp16")
    model = tiny_model()
    monitor = GradMonitor(model, histograms=True, histogram_dtypes=[torch.float16])
    gen = torch.Generator().manual_seed(2)
    set_random_grads(model, gen, scale=2.0**-20)
    model[2].weight.grad = torch.randn(model[2].weight.shape, generator=gen)  # healthy
    monitor.step()
    findings = monitor.report().findings
    lines = [f for f in findings if "fp16's smallest normal" in f]
    names = {n for n, _ in model.named_parameters()} - {"2.weight"}
    assert len(lines) == len(names)
    for name in names:
        assert any(f"`{name}`" in line and "a loss scale of 2^" in line for line in lines)
    assert all(line.startswith("step 0: ") for line in lines)
    assert not any("`2.weight`" in f for f in findings)


def test_bad_histogram_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="histogram_every"):
        GradMonitor(model, histograms=True, histogram_every=0)
    with pytest.raises(ValueError, match="histogram_history"):
        GradMonitor(model, histograms=True, histogram_history=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        GradMonitor(model, histograms=True, histogram_dtypes=torch.float32)
    c = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="'c'"):
        GradMonitor([("c", c)], histograms=True)
    with pytest.raises(ValueError, match="histograms=True"):
        GradMonitor(model).plot_histograms("x.png")


# --------------------------------------------------------------------------- exports


def test_tensorboard_histograms_read_back_from_the_event_file(tmp_path):
    require_extra("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_model(sizes=(9, 13, 3))
    monitor = GradMonitor(model, histograms=True, histogram_every=2, prefix="tr/")
    monitor.log_tensorboard(log_dir=str(tmp_path))
    seen = {}
    for step in range(4):
        seen[step] = _plant(model, step)
        model[0].bias.grad.fill_(NAN)  # no finite value: nothing logged for it
        model[2].bias.grad = torch.full_like(model[2].bias, INF)
        monitor.step()
        if step == 1:
            monitor.flush()
    monitor.flush()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["histograms"])
    assert tags == ["tr/grad_hist/0.weight", "tr/grad_hist/2.weight"]
    for tag, j in (("tr/grad_hist/0.weight", 0), ("tr/grad_hist/2.weight", 2)):
        events = acc.Histograms(tag)
        assert [e.step for e in events] == [0, 2]
        for event in events:
            ref, _ = numpy_reference(seen[event.step][j])
            value = event.histogram_value
            assert value.num == ref.sum()
            lo = int(np.flatnonzero(ref)[0])
            hi = int(np.flatnonzero(ref)[-1])
            assert list(value.bucket) == ref[lo : hi + 1].tolist()
            # buckets on log2 |g|: bucket i ends at the upper edge of its bin
            shown = W.display_edges()
            assert list(value.bucket_limit) == pytest.approx(shown[lo + 1 : hi + 2])
    monitor._writers[0].writer.close()


def test_wandb_histograms_in_the_offline_run_file(wandb_run):
    run = wandb_run
    model = tiny_model(sizes=(9, 13, 3))
    monitor = GradMonitor(model, histograms=True, histogram_every=2)
    monitor.log_wandb(run, rows="all")
    seen = {}
    for step in range(4):
        seen[step] = _plant(model, step)
        model[0].bias.grad.fill_(NAN)
        monitor.step()
    monitor.flush()
    rows = finish_run(run)
    # a Histogram is stored as nested keys: grad_hist/<name>/{_type, values, bins}
    hist_rows = {r["grad/step"]: r for r in rows if "grad_hist/0.weight/values" in r}
    assert sorted(hist_rows) == [0, 2]
    for step, row in hist_rows.items():
        assert not any(k.startswith("grad_hist/0.bias") for k in row)  # all NaN: left out
        for j, name in ((0, "0.weight"), (2, "2.weight")):
            key = f"grad_hist/{name}"
            assert row[f"{key}/_type"] == "histogram"
            ref, _ = numpy_reference(seen[step][j])
            lo, hi = int(np.flatnonzero(ref)[0]), int(np.flatnonzero(ref)[-1])
            assert row[f"{key}/values"] == ref[lo : hi + 1].tolist()
            assert row[f"{key}/bins"] == pytest.approx(W.display_edges()[lo : hi + 2])
        assert row["grad_hist_step"] == step
    plain_rows = [r for r in rows if "grad/step" in r and r["grad/step"] in (1, 3)]
    assert len(plain_rows) == 2
    assert not any(k.startswith("grad_hist/") for r in plain_rows for k in r)


def test_plot_histograms_png(tmp_path):
    require_extra("matplotlib")
    model = tiny_model()
    monitor = GradMonitor(model, histograms=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        set_random_grads(model, gen, scale=2.0 ** -(10 + 3 * step))
        monitor.step()
    path = monitor.plot_histograms(tmp_path / "h.png", title="tiny")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with pytest.raises(ValueError, match="not a monitored parameter"):
        monitor.plot_histograms(tmp_path / "bad.png", layer="nope")
    from fastgradstats.monitor.plots import worst_layer

    hist = monitor.histogram_history()
    assert worst_layer(hist, "fp16") in monitor.names


_SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def test_step_with_histograms_makes_no_host_read(monkeypatch):
    """Value reads issued from fastgradstats during step(histograms) on the Triton path
    (the torch path's CPU bincount reads CPU tensors for free; the meta test covers it)."""
    import os
    import sys

    from conftest import BACKENDS

    import fastgradstats

    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend cannot run here")
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "triton")
    package_dir = os.path.dirname(fastgradstats.__file__)
    calls = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package_dir):
                calls.append((name, caller))
            return original(self, *args, **kwargs)

        return wrapper

    model = tiny_model()
    monitor = GradMonitor(model, max_norm=0.3, history=8, histograms=True, histogram_every=2)
    gen = torch.Generator().manual_seed(8)
    for name in _SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for step in range(5):
        set_random_grads(model, gen)
        if step == 2:
            model[2].weight.grad = None
        monitor.step()
    assert calls == []
    monkeypatch.undo()
    assert monitor.histogram_history().steps.tolist() == [0, 2, 4]


def test_wandb_latest_rows_carry_the_newest_histogram(wandb_run):
    run = wandb_run
    model = tiny_model(sizes=(9, 13, 3))
    monitor = GradMonitor(model, histograms=True, histogram_every=2)
    monitor.log_wandb(run)  # rows="latest"
    seen = {}
    for step in range(6):
        seen[step] = _plant(model, step)
        monitor.step()
        run.log({"loss": float(step)}, step=step)
        if step in (3, 5):
            monitor.flush()
    rows = finish_run(run)
    logged = {r["_step"]: r for r in rows if "grad_hist/0.weight/values" in r}
    # flush at 3 sends step 3's row with step 2's histogram; flush at 5: step 5 with step 4's
    assert sorted(logged) == [3, 5]
    for step, hist_step in ((3, 2), (5, 4)):
        row = logged[step]
        assert row["grad/step"] == step and row["grad_hist_step"] == hist_step
        ref, _ = numpy_reference(seen[hist_step][0])
        lo, hi = int(np.flatnonzero(ref)[0]), int(np.flatnonzero(ref)[-1])
        assert row["grad_hist/0.weight/values"] == ref[lo : hi + 1].tolist()
