"""Pictures of a :class:`~fastgradstats.monitor.History` (needs the ``plot`` extra: matplotlib).

* :func:`plot_heatmap` -- log10 per-layer gradient norm, layers (y) by step (x);
* :func:`plot_total_norm` -- total norm over steps with the clip threshold, spikes and
  NaN/Inf steps marked;
* :func:`plot_history` -- both in one PNG.

matplotlib is imported lazily with the non-interactive Agg backend, so importing
fastgradstats never needs it and plotting works on headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .history import History

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


def plot_heatmap(history: History, ax: Any = None, title: str | None = None) -> Any:
    """Heatmap of log10 gradient norm per parameter (rows, input side on top) and step.

    Absent gradients are blank; NaN/Inf cells are drawn black. Parameters that had no
    gradient in any step of ``history`` (frozen ones) are left out when others had one.
    Returns the Axes.
    """
    history = _check_history(history)
    plt = _pyplot()
    names, cols, hidden = _shown(history)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.25 * len(names) + 2))
    norms = history.norms[:, cols].T  # [n, T]
    present = history.present[:, cols].T
    bad = ~np.isfinite(norms) & present
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(present & np.isfinite(norms), np.maximum(norms, 1e-30), np.nan))
    finite = logs[np.isfinite(logs)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    steps = history.steps
    if len(steps) == 0:
        extent = (0, 1, len(names) - 0.5, -0.5)
    else:
        half = 0.5 * (steps[-1] - steps[0]) / max(len(steps) - 1, 1) if len(steps) > 1 else 0.5
        extent = (steps[0] - half, steps[-1] + half, len(names) - 0.5, -0.5)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_invalid(logs if logs.size else np.zeros((len(names), 1))),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        extent=extent,
    )
    if bad.any():
        overlay = np.ma.masked_where(~bad, np.ones_like(norms))
        ax.imshow(
            overlay,
            aspect="auto",
            interpolation="nearest",
            cmap="gray_r",
            vmin=0,
            vmax=1,
            extent=extent,
        )
    colorbar = ax.figure.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label(f"log10 gradient {_norm_name(history.norm_type)}")
    n = len(names)
    stride = max(1, math.ceil(n / _MAX_LABELS))
    ticks = list(range(0, n, stride))
    ax.set_yticks(ticks)
    ax.set_yticklabels([_short(names[j]) for j in ticks], fontsize=7)
    ax.set_ylabel("parameter (input side at top)")
    ax.set_xlabel("step")
    suffix = "  (black: NaN/Inf)" if bad.any() else ""
    if hidden:
        suffix += f"  ({hidden} parameters without any gradient not shown)"
    ax.set_title(title or f"Per-layer gradient norm{suffix}")
    return ax


def _norm_name(norm_type: float) -> str:
    if math.isinf(norm_type):
        return "max-norm"
    return f"L{norm_type:g} norm"


def plot_total_norm(history: History, ax: Any = None, title: str | None = None) -> Any:
    """Total gradient norm over steps (log y), clip threshold, spikes and NaN/Inf steps."""
    history = _check_history(history)
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
        label="total norm (pre-clip)",
    )
    if history.max_norm is not None:
        ax.axhline(
            history.max_norm,
            color="tab:green",
            ls="--",
            lw=1.2,
            label=f"clip threshold max_norm={history.max_norm:g}",
        )
        clipped = history.clip_coef < 1.0
        if clipped.any() and finite.any():
            with np.errstate(invalid="ignore", over="ignore"):
                after = np.where(finite, total * np.minimum(history.clip_coef, 1.0), np.nan)
            ax.plot(steps, after, color="tab:green", lw=0.8, alpha=0.7, label="after clipping")
    spikes = history.spike_total & finite
    if spikes.any():
        ax.scatter(
            steps[spikes],
            total[spikes],
            marker="^",
            s=45,
            color="tab:orange",
            zorder=3,
            label=f"spike ({int(spikes.sum())})",
        )
    bad_steps = steps[history.nonfinite]
    for k, step in enumerate(bad_steps):
        ax.axvline(
            step,
            color="tab:red",
            alpha=0.25,
            lw=1.5,
            label=f"NaN/Inf step ({len(bad_steps)})" if k == 0 else None,
        )
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


def plot_history(history: History, path: str | Path, title: str | None = None) -> Path:
    """Save a two-panel PNG (heatmap above, total norm below) to ``path``; returns it."""
    history = _check_history(history)
    plt = _pyplot()
    n = len(_shown(history)[0])
    height = min(0.22 * n, 14) + 5
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(11, height),
        gridspec_kw={"height_ratios": [max(min(0.22 * n, 14), 2.5), 3]},
        constrained_layout=True,
    )
    plot_heatmap(history, ax=top)
    plot_total_norm(history, ax=bottom)
    bottom.sharex(top)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_heatmap", "plot_history", "plot_total_norm"]
