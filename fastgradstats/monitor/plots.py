"""Pictures of a :class:`~fastgradstats.monitor.History` (needs the ``plot`` extra: matplotlib).

* :func:`plot_heatmap` -- log10 per-layer gradient norm, layers (y) by step (x), colour
  limits from percentiles (:func:`color_limits`), NaN/Inf in colours of their own,
  per-layer spikes marked (:func:`heatmap_data` returns what it draws);
* :func:`plot_total_norm` -- total norm over steps with the clip threshold (fixed or
  adaptive), the norm after clipping, spikes, clipped steps and NaN/Inf steps marked;
* :func:`plot_history` -- both in one PNG;
* :func:`plot_layer_histogram` -- one layer's |g| histogram over steps (log2 |g| by step);
* :func:`plot_underflow` -- per-layer shares that flush to zero / fall below the smallest
  normal of a target format (fp16, bf16, fp8) at the latest histogram step;
* :func:`plot_histograms` -- those two in one PNG (``GradMonitor(histograms=True)``).

matplotlib is imported lazily with the non-interactive Agg backend, so importing
fastgradstats never needs it and plotting works on headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import BIN_OFFSET, NUM_BINS
from ..precision import float_format
from .history import HistogramHistory, History

_MAX_LABELS = 40  # more layer names than this and only every k-th is written


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "fastgradstats plotting needs matplotlib: pip install 'fastgradstats[plot]'"
        ) from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _check_history(history: Any) -> History:
    if not isinstance(history, History):
        raise TypeError(
            f"history must be a fastgradstats History (monitor.history()), got "
            f"{type(history).__name__}"
        )
    return history


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _shown(history: History) -> tuple[list[str], np.ndarray, int]:
    """The parameters worth a heatmap row: those with a gradient in some step (all of them
    when none had one); their column indices; how many were left out."""
    seen = history.present.any(axis=0) if len(history) else np.zeros(len(history.names), bool)
    if not seen.any():
        seen = np.ones(len(history.names), dtype=bool)
    cols = np.flatnonzero(seen)
    return [history.names[j] for j in cols], cols, len(history.names) - len(cols)


NAN_COLOR = "red"  # a cell whose gradient held NaN
INF_COLOR = "magenta"  # a cell whose gradient held Inf (or whose norm overflowed)
ABSENT_COLOR = "0.92"  # no gradient that step
PERCENTILES = (2.0, 98.0)  # colour limits of the heatmap (see color_limits)


def color_limits(
    values: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
) -> tuple[float, float]:
    """Colour-scale limits of the finite ``values``: their ``percentiles``, robust to outliers.

    With three or more values the limits never come from the single smallest or largest
    value (the percentile is moved inward when needed), so one cell at log10 = 28 cannot
    stretch the scale and turn every other cell the same colour; cells outside the limits
    take the end colours (the colour bar's arrows say so). ``(0, 1)`` without finite values;
    a constant range is widened by 0.5 on each side.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 1.0
    lo_q, hi_q = percentiles
    n = finite.size
    if n >= 3:  # at least one value outside each limit: one outlier cannot set it
        inner = 100.0 / (n - 1)
        lo_q, hi_q = max(lo_q, inner), min(hi_q, 100.0 - inner)
    vmin, vmax = (float(v) for v in np.percentile(finite, [lo_q, hi_q]))
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return vmin, vmax


def heatmap_data(history: History) -> dict[str, Any]:
    """What :func:`plot_heatmap` draws, as arrays (rows: the shown parameters; columns: steps).

    Keys: ``names``; ``hidden`` (parameters without any gradient, left out); ``log10``
    (float [n, T], NaN where absent or non-finite); ``vmin`` / ``vmax`` (:func:`color_limits`
    of ``log10``); ``nan`` / ``inf`` (bool [n, T]: the gradient held NaN; held Inf but no
    NaN, or its norm overflowed); ``absent`` (bool [n, T]); ``spikes`` (bool [n, T], the
    spike detector's per-layer flags).
    """
    history = _check_history(history)
    names, cols, hidden = _shown(history)
    norms = history.norms[:, cols].T  # [n, T]
    present = history.present[:, cols].T
    nan = present & ((history.nan_count[:, cols].T > 0) | np.isnan(norms))
    inf = present & ~nan & ((history.inf_count[:, cols].T > 0) | ~np.isfinite(norms))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(present & np.isfinite(norms), np.maximum(norms, 1e-30), np.nan))
    logs = np.where(nan | inf, np.nan, logs)
    vmin, vmax = color_limits(logs)
    return {
        "names": names,
        "hidden": hidden,
        "log10": logs,
        "vmin": vmin,
        "vmax": vmax,
        "nan": nan,
        "inf": inf,
        "absent": ~present,
        "spikes": history.spike_layer[:, cols].T & present,
    }


def _heatmap_extent(steps: np.ndarray, rows: int) -> tuple[float, float, float, float]:
    """imshow's extent: one column per recorded step centred on its step number."""
    if len(steps) == 0:
        return (0, 1, rows - 0.5, -0.5)
    half = 0.5 * (steps[-1] - steps[0]) / max(len(steps) - 1, 1) if len(steps) > 1 else 0.5
    return (steps[0] - half, steps[-1] + half, rows - 0.5, -0.5)


def _draw_cells(ax: Any, plt: Any, data: dict[str, Any], extent: tuple) -> Any:
    """The log10 cells (absent ones light grey), then NaN and Inf cells over them as
    categories of their own (0: NaN, 1: Inf), not as values. Returns the value image."""
    from matplotlib.colors import ListedColormap

    logs = data["log10"]
    image = ax.imshow(
        np.ma.masked_invalid(logs if logs.size else np.zeros((len(data["names"]), 1))),
        aspect="auto",
        interpolation="nearest",
        cmap=plt.get_cmap("viridis").with_extremes(bad=ABSENT_COLOR),
        vmin=data["vmin"],
        vmax=data["vmax"],
        extent=extent,
    )
    kinds = np.where(data["nan"], 0.0, np.where(data["inf"], 1.0, np.nan))
    if np.isfinite(kinds).any():
        ax.imshow(
            np.ma.masked_invalid(kinds),
            aspect="auto",
            interpolation="nearest",
            cmap=ListedColormap([NAN_COLOR, INF_COLOR]),
            vmin=0,
            vmax=1,
            extent=extent,
        )
    return image


def _heatmap_colorbar(ax: Any, image: Any, data: dict[str, Any], norm_type: float) -> None:
    """The colour bar, with an arrow at each end that some cell lies beyond."""
    finite = data["log10"][np.isfinite(data["log10"])]
    extend = "neither"
    if finite.size:
        below, above = finite.min() < data["vmin"], finite.max() > data["vmax"]
        extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
            (bool(below), bool(above)), "neither"
        )
    colorbar = ax.figure.colorbar(image, ax=ax, pad=0.01, extend=extend)
    colorbar.set_label(f"log10 gradient {_norm_name(norm_type)}")


def _label_rows(ax: Any, names: list[str]) -> None:
    """Parameter names on the y axis (every k-th beyond ``_MAX_LABELS``), steps on x."""
    stride = max(1, math.ceil(len(names) / _MAX_LABELS))
    ticks = list(range(0, len(names), stride))
    ax.set_yticks(ticks)
    ax.set_yticklabels([_short(names[j]) for j in ticks], fontsize=7)
    ax.set_ylabel("parameter (input side at top)")
    ax.set_xlabel("step")


def _heatmap_legend(ax: Any, data: dict[str, Any], has_steps: bool) -> None:
    """A legend entry per kind of special cell present, then the spike markers."""
    from matplotlib.patches import Patch

    handles = [
        Patch(color=color, label=f"{label} ({int(mask.sum())} cells)")
        for color, label, mask in (
            (NAN_COLOR, "NaN", data["nan"]),
            (INF_COLOR, "Inf", data["inf"]),
            (ABSENT_COLOR, "no gradient", data["absent"] if has_steps else np.zeros(0)),
        )
        if mask.any()
    ]
    handles += [h for h in ax.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(0.0, -0.12),
            ncol=len(handles),
            fontsize=8,
            frameon=False,
        )


def plot_heatmap(history: History, ax: Any = None, title: str | None = None) -> Any:
    """Heatmap of log10 gradient norm per parameter (rows, input side on top) and step.

    The colour scale spans the 2nd to 98th percentile of the finite cells
    (:func:`color_limits`), so one outlier cannot flatten it; cells beyond it take the end
    colours. NaN cells are red, Inf cells magenta, absent gradients light grey, each with a
    legend entry when present; per-layer spikes are marked with a white triangle.
    Parameters that had no gradient in any step of ``history`` (frozen ones) are left out
    when others had one. Returns the Axes.
    """
    history = _check_history(history)
    plt = _pyplot()
    data = heatmap_data(history)
    names = data["names"]
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.25 * len(names) + 2))
    steps = history.steps
    image = _draw_cells(ax, plt, data, _heatmap_extent(steps, len(names)))
    rows, where = np.nonzero(data["spikes"])
    if rows.size:
        ax.scatter(
            steps[where],
            rows,
            marker="^",
            s=18,
            facecolor="white",
            edgecolor="black",
            linewidths=0.6,
            zorder=4,
            label=f"layer spike ({rows.size})",
        )
    _heatmap_colorbar(ax, image, data, history.norm_type)
    _label_rows(ax, names)
    _heatmap_legend(ax, data, bool(len(steps)))
    suffix = (
        f"  ({data['hidden']} parameters without any gradient not shown)" if data["hidden"] else ""
    )
    ax.set_title(title or f"Per-layer gradient norm{suffix}")
    return ax


def _norm_name(norm_type: float) -> str:
    if math.isinf(norm_type):
        return "max-norm"
    return f"L{norm_type:g} norm"


def _check_threshold(threshold: Any, history: History) -> np.ndarray | None:
    if threshold is None:
        return None
    values = np.asarray(threshold, dtype=np.float64).reshape(-1)
    if values.shape != (len(history),):
        raise ValueError(
            f"threshold must have one value per recorded step ({len(history)}), got "
            f"shape {values.shape}"
        )
    return values


def _draw_thresholds(ax: Any, history: History, adaptive: np.ndarray | None) -> None:
    """``max_norm`` as a wide pale dashed band, the adaptive threshold as a dotted line."""
    if history.max_norm is not None:
        # a wide pale band under everything: the after-clipping line runs along it on
        # clipped steps and stays visible inside it
        ax.axhline(
            history.max_norm,
            color="0.55",
            ls="--",
            lw=3.0,
            alpha=0.6,
            zorder=1,
            label=f"clip threshold max_norm={history.max_norm:g}",
        )
    if adaptive is not None and np.isfinite(adaptive).any():
        ax.plot(
            history.steps,
            np.where(np.isfinite(adaptive) & (adaptive > 0), adaptive, np.nan),
            color="tab:purple",
            ls=":",
            lw=1.6,
            zorder=2,
            label="adaptive clip threshold",
        )


def _draw_after_clipping(ax: Any, history: History, finite: np.ndarray) -> None:
    """The norm after clipping, only where clipping changed it: elsewhere it equals the
    pre-clip line, which it would hide."""
    clipped = (history.clip_coef < 1.0) & finite
    if not clipped.any():
        return
    with np.errstate(invalid="ignore", over="ignore"):
        after = np.where(clipped, history.total_norm * np.minimum(history.clip_coef, 1.0), np.nan)
    ax.plot(
        history.steps,
        after,
        color="tab:green",
        ls="-",
        lw=1.2,
        marker="o" if clipped.sum() <= 50 else None,
        ms=4,
        mfc="none",
        mew=1.2,
        zorder=4,
        label=f"after clipping ({int(clipped.sum())} clipped steps)",
    )


def _mark_total_events(ax: Any, history: History, finite: np.ndarray) -> None:
    """Spikes of the total norm as triangles, NaN/Inf steps as pale red bands."""
    steps, total = history.steps, history.total_norm
    spikes = history.spike_total & finite
    if spikes.any():
        ax.scatter(
            steps[spikes],
            total[spikes],
            marker="^",
            s=45,
            color="tab:orange",
            edgecolor="black",
            linewidths=0.5,
            zorder=5,
            label=f"spike ({int(spikes.sum())})",
        )
    bad_steps = steps[history.nonfinite]
    for k, step in enumerate(bad_steps):
        ax.axvline(
            step,
            color="tab:red",
            alpha=0.25,
            lw=1.5,
            zorder=0,
            label=f"NaN/Inf step ({len(bad_steps)})" if k == 0 else None,
        )


def plot_total_norm(
    history: History, ax: Any = None, title: str | None = None, threshold: Any = None
) -> Any:
    """Total gradient norm over steps (log y): the clip threshold, the norm after clipping,
    spikes, clipped steps and NaN/Inf steps.

    ``threshold``: an adaptive clipper's threshold at each recorded step (e.g. ZClip's
    ``mean + z_thresh * std``; NaN where it has none yet), drawn as a dotted line.

    Layers, bottom to top (``zorder``): NaN/Inf step bands (0), ``max_norm`` (a wide pale
    dashed band, 1), the adaptive threshold (dotted purple, 2), total norm before clipping
    (blue, 3), norm after clipping (thin solid green, only at clipped steps, with hollow
    markers when there are at most 50 of them, 4: it runs along ``max_norm`` where a step was
    clipped, so it is drawn above and inside that band), spike markers (5). Returns the Axes.
    """
    history = _check_history(history)
    adaptive = _check_threshold(threshold, history)
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.5))
    steps, total = history.steps, history.total_norm
    finite = np.isfinite(total) & (total > 0)
    ax.plot(
        steps[finite],
        total[finite],
        color="tab:blue",
        lw=1.2,
        marker="o" if len(steps) <= 50 else None,
        ms=3,
        zorder=3,
        label="total norm (pre-clip)",
    )
    _draw_thresholds(ax, history, adaptive)
    _draw_after_clipping(ax, history, finite)
    _mark_total_events(ax, history, finite)
    if finite.any():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"total gradient {_norm_name(history.norm_type)}")
    ax.set_title(title or "Total gradient norm")
    ax.grid(True, which="major", alpha=0.3)
    if len(steps):
        ax.set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return ax


def plot_history(
    history: History, path: str | Path, title: str | None = None, threshold: Any = None
) -> Path:
    """Save a two-panel PNG (heatmap above, total norm below) to ``path``; returns it.

    ``threshold``: an adaptive clipper's threshold per recorded step (see
    :func:`plot_total_norm`)."""
    history = _check_history(history)
    _check_threshold(threshold, history)
    plt = _pyplot()
    n = len(_shown(history)[0])
    height = min(0.22 * n, 14) + 5.5
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(11, height),
        gridspec_kw={"height_ratios": [max(min(0.22 * n, 14), 2.5), 3]},
        constrained_layout=True,
    )
    plot_heatmap(history, ax=top)
    plot_total_norm(history, ax=bottom, threshold=threshold)
    bottom.sharex(top)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_histograms(hist: Any) -> HistogramHistory:
    if not isinstance(hist, HistogramHistory):
        raise TypeError(
            "hist must be a fastgradstats HistogramHistory (monitor.histogram_history()), got "
            f"{type(hist).__name__}"
        )
    return hist


def _below_normal(hist: HistogramHistory, dtype: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """The report of the latest histogram step, and its flush / subnormal shares [n]."""
    report = hist.report(-1, dtype)
    return report, report.flush_to_zero.numpy(), report.subnormal.numpy()


def worst_layer(hist: HistogramHistory, dtype: Any) -> str:
    """The parameter with the largest share below ``dtype``'s smallest normal (latest step;
    the first present parameter when none is below)."""
    hist = _check_histograms(hist)
    if not len(hist):
        return hist.names[0]
    _, flush, sub = _below_normal(hist, dtype)
    below = np.where(hist.present[-1], flush + sub, -1.0)
    return hist.names[int(np.argmax(below))]


def plot_layer_histogram(
    hist: HistogramHistory, name: str, ax: Any = None, dtype: Any = None, title: str | None = None
) -> Any:
    """Heatmap of one layer's |g| histogram: log2 |g| bins (y) by histogram step (x).

    Colour is the share of the layer's finite values in the bin (log10); exact zeros and
    |g| < 2^-133 are the bottom row. With ``dtype``, its smallest subnormal, smallest normal
    and largest finite value are drawn as lines. Returns the Axes.
    """
    hist = _check_histograms(hist)
    if name not in hist.names:
        raise ValueError(f"name {name!r} is not a monitored parameter")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4))
    j = hist.names.index(name)
    counts = hist.counts[:, j, :].astype(np.float64).T  # [B, T]
    totals = counts.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
        logs = np.where(share > 0, np.log10(share), np.nan)
    occupied = np.flatnonzero(counts.sum(axis=1) > 0)
    lo, hi = (int(occupied[0]), int(occupied[-1])) if occupied.size else (BIN_OFFSET, BIN_OFFSET)
    if dtype is not None:  # keep the format's flush and normal limits in view
        fmt = float_format(dtype)
        lo = min(lo, fmt.min_subnormal_exponent - 1 + BIN_OFFSET)
        hi = max(hi, fmt.min_normal_exponent + BIN_OFFSET)
    lo, hi = max(lo - 2, 0), min(hi + 2, NUM_BINS - 1)
    # bin i >= 1 is [2^(i - BIN_OFFSET), 2^(i - BIN_OFFSET + 1)): its lower edge's log2
    y0, y1 = lo - BIN_OFFSET, hi - BIN_OFFSET + 1
    steps = hist.steps
    if len(steps) > 1:
        half = 0.5 * (steps[-1] - steps[0]) / (len(steps) - 1)
        x0, x1 = steps[0] - half, steps[-1] + half
    else:
        x0, x1 = (steps[0] - 0.5, steps[0] + 0.5) if len(steps) else (0, 1)
    image = ax.imshow(
        np.ma.masked_invalid(logs[lo : hi + 1] if logs.size else np.zeros((hi - lo + 1, 1))),
        aspect="auto",
        interpolation="nearest",
        origin="lower",
        cmap=plt.get_cmap("magma").with_extremes(bad="white"),
        extent=(x0, x1, y0, y1),
    )
    colorbar = ax.figure.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label("log10 share of finite values")
    if dtype is not None:
        fmt = float_format(dtype)
        marks = [
            (fmt.min_subnormal_exponent, f"{fmt.name} smallest subnormal", "tab:red", ":"),
            (fmt.min_normal_exponent, f"{fmt.name} smallest normal", "tab:orange", "--"),
            (math.log2(fmt.max), f"{fmt.name} max", "tab:red", "-."),
        ]
        for y, label, color, style in marks:
            if y0 <= y <= y1:
                ax.axhline(y, color=color, ls=style, lw=1.2, label=label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    if lo == 0:
        ax.annotate("zeros / < 2^-133", (x0, y0), fontsize=7, va="bottom", color="0.3")
    ax.set_xlabel("step")
    ax.set_ylabel("log2 |g| (bin lower edge)")
    ax.set_title(title or f"|g| histogram of `{_short(name, 48)}` over steps")
    return ax


def plot_underflow(
    hist: HistogramHistory, dtype: Any = "fp16", ax: Any = None, title: str | None = None
) -> Any:
    """Per-layer share of nonzero gradient values that would flush to zero, and that would
    be subnormal, in ``dtype`` at the latest histogram step (stacked bars). Returns the Axes."""
    hist = _check_histograms(hist)
    plt = _pyplot()
    names = hist.names
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.25 * len(names) + 2))
    if len(hist):
        report, flush, sub = _below_normal(hist, dtype)
        fmt, step = report.format.name, int(hist.steps[-1])
    else:
        flush = sub = np.zeros(len(names))
        fmt, step = float_format(dtype).name, None
    y = np.arange(len(names))
    ax.barh(y, 100 * flush, color="tab:red", label="flush to zero")
    ax.barh(y, 100 * sub, left=100 * flush, color="tab:orange", label="subnormal")
    stride = max(1, math.ceil(len(names) / _MAX_LABELS))
    ticks = list(range(0, len(names), stride))
    ax.set_yticks(ticks)
    ax.set_yticklabels([_short(names[j]) for j in ticks], fontsize=7)
    ax.invert_yaxis()  # input side at the top, as in the norm heatmap
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of nonzero gradient values below {fmt}'s smallest normal")
    where = f" at step {step}" if step is not None else ""
    ax.set_title(title or f"Per-layer {fmt} underflow{where}")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return ax


def plot_histograms(
    hist: HistogramHistory,
    path: str | Path,
    layer: str | None = None,
    dtype: Any = "fp16",
    title: str | None = None,
) -> Path:
    """Save a two-panel PNG: ``layer``'s histogram over steps (default: the layer with the
    largest share below ``dtype``'s smallest normal) above the per-layer underflow bars."""
    hist = _check_histograms(hist)
    plt = _pyplot()
    name = layer if layer is not None else worst_layer(hist, dtype)
    n = len(hist.names)
    bars = max(min(0.22 * n, 12), 2.5)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(11, 4.5 + bars),
        gridspec_kw={"height_ratios": [4, bars]},
        constrained_layout=True,
    )
    plot_layer_histogram(hist, name, ax=top, dtype=dtype)
    plot_underflow(hist, dtype, ax=bottom)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "color_limits",
    "heatmap_data",
    "plot_heatmap",
    "plot_histograms",
    "plot_history",
    "plot_layer_histogram",
    "plot_total_norm",
    "plot_underflow",
    "worst_layer",
]
