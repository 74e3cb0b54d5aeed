"""Plots and verdicts that show the problem (issue 20, item 4).

The plot tests check the data the plotting code computes and what ends up in the matplotlib
Axes (colour limits, marked points, lines, their zorder and styles), not pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monitor_helpers import tiny_model

from fastgradstats import GradMonitor
from fastgradstats.monitor import History, diagnose
from fastgradstats.monitor.history import empty_arrays
from fastgradstats.monitor.plots import (
    INF_COLOR,
    NAN_COLOR,
    color_limits,
    heatmap_data,
    plot_heatmap,
    plot_history,
    plot_total_norm,
)

# numpy histories and a CPU monitor: nothing here depends on FASTGRADSTATS_BACKEND
pytestmark = pytest.mark.backend_independent

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def make_history(norms, max_norm=None, clip_coef=None, names=None) -> History:
    """A History of per-parameter ``norms`` [T, n] (total: their 2-norm)."""
    norms = np.asarray(norms, dtype=np.float64)
    t, n = norms.shape
    arrays = empty_arrays(t, n)
    arrays["steps"] = np.arange(t)
    arrays["norms"] = norms
    arrays["max_abs"] = np.abs(norms)
    arrays["present"] = np.ones((t, n), dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        arrays["total_norm"] = np.sqrt((norms**2).sum(axis=1))
    arrays["nonfinite"] = ~np.isfinite(arrays["total_norm"])
    arrays["nan_count"] = np.isnan(norms).astype(np.int64)
    arrays["inf_count"] = np.isinf(norms).astype(np.int64)
    if clip_coef is not None:
        arrays["clip_coef"] = np.asarray(clip_coef, dtype=np.float64)
    return History(
        names=names or [f"layers.{j}.weight" for j in range(n)],
        numels=[16] * n,
        ndims=[2] * n,
        norm_type=2.0,
        max_norm=max_norm,
        **arrays,
    )


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- colour scale


def test_color_limits_ignore_one_outlier():
    values = np.concatenate([np.linspace(0.0, 2.0, 40), [28.0]])  # log10 = 28 in one cell
    vmin, vmax = color_limits(values)
    assert vmax <= 2.0 and vmin >= 0.0
    # the limits are the 2nd / 98th percentiles of the rest when there are enough cells
    many = np.concatenate([np.linspace(0.0, 2.0, 1000), [28.0]])
    lo, hi = color_limits(many)
    ref = np.percentile(many, [2.0, 98.0])
    assert lo == pytest.approx(ref[0]) and hi == pytest.approx(ref[1])


def test_color_limits_edge_cases():
    assert color_limits(np.array([np.nan, np.inf])) == (0.0, 1.0)
    assert color_limits(np.array([3.0, 3.0])) == (2.5, 3.5)


def test_heatmap_scale_is_not_stretched_by_one_cell():
    norms = np.full((10, 4), 10.0)
    norms[:, 1] = 100.0
    norms[3, 2] = 1e28  # the exploding demo's overflowing bias
    data = heatmap_data(make_history(norms))
    assert data["vmax"] <= 2.0 + 1e-9  # log10(100), not 28
    ax = plot_heatmap(make_history(norms))
    assert ax.images[0].get_clim() == (data["vmin"], data["vmax"])


# ---------------------------------------------------------------- NaN / Inf


def test_nan_and_inf_cells_have_their_own_colours_and_legend():
    norms = np.ones((5, 3))
    norms[2, 0] = np.nan
    norms[3, 1] = np.inf
    norms[4, :] = np.nan
    history = make_history(norms)
    data = heatmap_data(history)
    assert data["nan"][0, 2] and data["nan"][:, 4].all() and data["nan"].sum() == 4
    assert data["inf"][1, 3] and data["inf"].sum() == 1
    assert np.isnan(data["log10"][data["nan"] | data["inf"]]).all()
    ax = plot_heatmap(history)
    overlay = ax.images[1]  # the NaN/Inf layer, drawn over the values
    colors = [matplotlib.colors.to_hex(c) for c in overlay.cmap.colors]
    assert colors == [matplotlib.colors.to_hex(NAN_COLOR), matplotlib.colors.to_hex(INF_COLOR)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "NaN (4 cells)" in legend and "Inf (1 cells)" in legend
    assert "black" not in ax.get_title()
    clean = plot_heatmap(make_history(np.ones((4, 2))))  # no NaN: no overlay, no legend
    assert len(clean.images) == 1 and clean.get_legend() is None


# ---------------------------------------------------------------- spikes


def test_every_detected_spike_is_marked():
    norms = np.ones((30, 3))
    history = make_history(norms)
    history.spike_total[[5, 12, 20]] = True
    history.spike_layer[[5, 12, 20, 21], [0, 1, 2, 2]] = True
    ax = plot_total_norm(history)
    spikes = [c for c in ax.collections if c.get_label().startswith("spike")]
    assert len(spikes) == 1
    assert sorted(spikes[0].get_offsets()[:, 0].tolist()) == [5, 12, 20]
    heat = plot_heatmap(history)
    marks = [c for c in heat.collections if c.get_label().startswith("layer spike")]
    points = sorted(map(tuple, marks[0].get_offsets().tolist()))
    assert points == [(5.0, 0.0), (12.0, 1.0), (20.0, 2.0), (21.0, 2.0)]


def test_adaptive_clipped_steps_are_marked_and_threshold_drawn():
    t = 40
    norms = np.ones((t, 2))
    spikes = [10, 20, 30]
    norms[spikes] = 300.0
    coef = np.ones(t)
    coef[spikes] = 0.01  # the clipper scaled those steps
    history = make_history(norms, clip_coef=coef)  # no max_norm: an adaptive clipper
    threshold = np.full(t, 5.0)
    threshold[:5] = np.nan  # warm-up: no threshold yet
    ax = plot_total_norm(history, threshold=threshold)
    lines = {line.get_label(): line for line in ax.get_lines()}
    adaptive = lines["adaptive clip threshold"]
    np.testing.assert_array_equal(adaptive.get_ydata()[5:], threshold[5:])
    after = next(line for label, line in lines.items() if label.startswith("after clipping"))
    y = np.asarray(after.get_ydata(), dtype=float)
    assert np.isfinite(y).sum() == 3  # only the clipped steps: it cannot hide the raw line
    np.testing.assert_allclose(y[spikes], history.total_norm[spikes] * 0.01)
    assert after.get_marker() == "o"
    with pytest.raises(ValueError, match="threshold"):
        plot_total_norm(history, threshold=np.ones(3))


def test_after_clipping_is_not_hidden_under_the_threshold():
    norms = np.full((20, 2), 50.0)
    history = make_history(norms, max_norm=1.0, clip_coef=np.full(20, 1.0 / 70.7))
    ax = plot_total_norm(history)
    lines = {line.get_label(): line for line in ax.get_lines()}
    threshold = lines["clip threshold max_norm=1"]
    after = next(line for label, line in lines.items() if label.startswith("after clipping"))
    raw = lines["total norm (pre-clip)"]
    # the after-clipping line runs along the threshold: it is drawn above it, thinner,
    # in another colour and style, so both show
    assert after.get_zorder() > threshold.get_zorder()
    assert after.get_linewidth() < threshold.get_linewidth()
    assert after.get_linestyle() != threshold.get_linestyle()
    assert matplotlib.colors.to_hex(after.get_color()) != matplotlib.colors.to_hex(
        threshold.get_color()
    )
    assert raw.get_zorder() > threshold.get_zorder()


def test_plot_history_writes_png_with_threshold(tmp_path):
    norms = np.ones((8, 2))
    path = plot_history(make_history(norms), tmp_path / "h.png", threshold=np.full(8, 2.0))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- verdicts


def test_a_high_level_is_not_exploding():
    # the Lightning run: 93 -> 183 -> 133 -> 92, about 140x max_norm, clipped every step
    totals = np.array([93.0, 183.0, 133.0, 92.0])
    max_norm = 0.66
    norms = np.stack([totals / math.sqrt(2)] * 2, axis=1)
    history = make_history(norms, max_norm=max_norm, clip_coef=max_norm / (totals + 1e-6))
    report = diagnose(history)
    assert report.verdict == "clipped", report.summary()
    assert not report.contained
    assert "EXPLODING" not in report.summary()
    assert "CLIPPED" in report.summary()
    # growth under clipping is still exploding, and contained
    totals = np.geomspace(1.0, 1e5, 40)
    norms = np.stack([totals / math.sqrt(2)] * 2, axis=1)
    history = make_history(norms, max_norm=1.0, clip_coef=np.minimum(1.0, 1.0 / totals))
    grown = diagnose(history)
    assert grown.verdict == "exploding" and grown.contained, grown.summary()


def test_report_before_any_step_gives_no_verdict():
    monitor = GradMonitor(tiny_model())
    report = monitor.report()
    assert report.verdict == "no_data" and report.steps == 0
    assert "HEALTHY" not in str(report) and "NO DATA" in str(report)
    model = tiny_model()
    monitor = GradMonitor(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    monitor.step()
    assert monitor.report().verdict == "healthy"


def test_demo_threshold_is_the_level_zclip_clips_above():
    from fastgradstats import ZClip
    from fastgradstats.demo import zclip_threshold

    clipper = ZClip(warmup_steps=5)
    gen = torch.Generator().manual_seed(0)
    norms = torch.rand(60, generator=gen, dtype=torch.float64) + 1.0
    norms[[20, 35, 50]] = 40.0  # spikes
    for k, g in enumerate(norms):
        level = float(zclip_threshold(clipper))
        coef, _ = clipper.compute_coef(g)
        if k < 5:
            assert math.isnan(level)  # warm-up: no threshold drawn
        else:
            assert (float(coef) < 1.0) == (float(g) > level), k
    assert float(clipper.compute_coef(torch.tensor(1e6, dtype=torch.float64))[0]) < 1.0
