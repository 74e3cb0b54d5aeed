"""Writers: where :meth:`GradMonitor.flush` sends the rows recorded since the last flush.

Each writer has ``write(history)``; the monitor calls it with a :class:`History` of the new
rows. JSON lines and CSV need nothing; TensorBoard and W&B are optional extras imported
only when a writer for them is created.

Histogram rows leave through :func:`tensorboard_histogram_kwargs` and
:func:`wandb_np_histogram` (buckets on :func:`display_edges`), pure functions of one
tensor's counts, usable without a writer.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import Tensor

from ..constants import HIGH_EXPONENT, LOW_EXPONENT, NUM_BINS
from ..histogram import histogram_edges
from .history import History, nonfinite_json
from .keys import Keys
from .logspec import LogSpec


class HistoryWriter(Protocol):
    """Anything with ``write(history)`` (called with the rows new since the last flush)."""

    def write(self, history: History) -> None: ...


class JsonlWriter:
    """Appends one JSON object per recorded step to ``path``.

    Keys: ``step``, ``total_norm``, ``clip_coef``, ``nonfinite``, ``skipped``,
    ``spike_total``, and per-parameter dicts ``norm``, ``max_abs``, ``nan_count``,
    ``inf_count``, ``spike`` keyed by parameter name (absent gradients left out). A full
    record: ``GradMonitor(log=...)`` does not shape it.
    Non-finite floats are written as the strings ``"NaN"``/``"Infinity"`` (``float()``
    reads them back), so the file stays standard JSON.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, history: History) -> None:
        with self.path.open("a") as fh:
            for t in range(len(history)):
                idx = [j for j in range(len(history.names)) if history.present[t, j]]
                names = [history.names[j] for j in idx]

                def per(arr: np.ndarray, cast: Callable[[Any], Any], t=t, idx=idx, names=names):
                    return {name: cast(arr[t, j]) for name, j in zip(names, idx)}

                record = {
                    "step": int(history.steps[t]),
                    "total_norm": nonfinite_json(float(history.total_norm[t])),
                    "clip_coef": nonfinite_json(float(history.clip_coef[t])),
                    "nonfinite": bool(history.nonfinite[t]),
                    "skipped": bool(history.skipped[t]),
                    "spike_total": bool(history.spike_total[t]),
                    "norm": per(history.norms, lambda v: nonfinite_json(float(v))),
                    "max_abs": per(history.max_abs, lambda v: nonfinite_json(float(v))),
                    "nan_count": per(history.nan_count, int),
                    "inf_count": per(history.inf_count, int),
                    "spike": per(history.spike_layer, bool),
                }
                ratio = history.update_ratio()  # param_norms=True only
                if history.param_norm is not None and ratio is not None:
                    record["param_norm"] = per(history.param_norm, lambda v: float(v))
                    record["update_ratio"] = per(ratio, lambda v: nonfinite_json(float(v)))
                fh.write(json.dumps(record) + "\n")


class CsvWriter:
    """Long-format CSV, one row per (step, parameter).

    Columns: ``step, param, norm, max_abs, nan_count, inf_count, spike, total_norm,
    clip_coef, nonfinite, skipped`` (the last four repeat per step). Absent gradients are
    left out; NaN/Inf are written as ``nan``/``inf`` (``float()`` reads them back).
    """

    columns = (
        "step",
        "param",
        "norm",
        "max_abs",
        "nan_count",
        "inf_count",
        "spike",
        "total_norm",
        "clip_coef",
        "nonfinite",
        "skipped",
    )

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as fh:
            csv.writer(fh).writerow(self.columns)

    def write(self, history: History) -> None:
        with self.path.open("a", newline="") as fh:
            out = csv.writer(fh)
            for t in range(len(history)):
                shared = [
                    repr(float(history.total_norm[t])),
                    repr(float(history.clip_coef[t])),
                    int(history.nonfinite[t]),
                    int(history.skipped[t]),
                ]
                for j, name in enumerate(history.names):
                    if not history.present[t, j]:
                        continue
                    out.writerow(
                        [
                            int(history.steps[t]),
                            name,
                            repr(float(history.norms[t, j])),
                            repr(float(history.max_abs[t, j])),
                            int(history.nan_count[t, j]),
                            int(history.inf_count[t, j]),
                            int(history.spike_layer[t, j]),
                            *shared,
                        ]
                    )


# ---------------------------------------------- histogram rows as TensorBoard and W&B take them


def _row(counts_row: Any) -> list[int]:
    if isinstance(counts_row, Tensor):
        counts_row = counts_row.detach().reshape(-1).tolist()
    row = [int(c) for c in counts_row]
    if len(row) != NUM_BINS:
        raise ValueError(f"counts_row must have {NUM_BINS} entries, got {len(row)}")
    return row


def _edges_list(edges: Any) -> list[float]:
    if edges is None:
        edges = histogram_edges()
    values = edges.tolist() if isinstance(edges, Tensor) else [float(e) for e in edges]
    if len(values) != NUM_BINS + 1:
        raise ValueError(f"edges must have {NUM_BINS + 1} entries, got {len(values)}")
    return values


def _span(row: list[int]) -> tuple[int, int] | None:
    occupied = [i for i, c in enumerate(row) if c > 0]
    return (occupied[0], occupied[-1]) if occupied else None


def _finite_max(max_abs: Any) -> float | None:
    if max_abs is None:
        return None
    value = float(max_abs)
    return value if math.isfinite(value) else None


def display_edges(
    edges: Any = None, log2: bool = True, max_abs: float | None = None
) -> list[float]:
    """Finite edges for plotting and exports.

    ``log2=True``: ``[-134, -133, ..., 17, 18]``: bin 0 (zeros and |g| < 2^-133) is drawn as
    ``[-134, -133)`` (log2 0 is -inf), the last bin as ``[17, 18)`` or up to log2 max_abs.
    ``log2=False``: the edges themselves with ``inf`` replaced by ``max_abs`` (when finite
    and >= 2^17) or ``2^18``.
    """
    values = _edges_list(edges)
    top = _finite_max(max_abs)
    last = top if top is not None and top > 2.0**HIGH_EXPONENT else 2.0 ** (HIGH_EXPONENT + 1)
    if log2:
        return [float(LOW_EXPONENT - 1)] + [math.log2(e) for e in values[1:-1]] + [math.log2(last)]
    return [*values[:-1], last]


def tensorboard_histogram_kwargs(
    counts_row: Any,
    edges: Any = None,
    *,
    log2: bool = True,
    max_abs: float | None = None,
    sum_abs: float | None = None,
    sum_squares: float | None = None,
) -> dict[str, Any] | None:
    """Arguments of ``SummaryWriter.add_histogram_raw`` for one tensor, or None if empty.

    The buckets span the lowest to the highest nonempty bin (TensorBoard draws bucket ``i``
    from ``bucket_limits[i-1]`` to ``bucket_limits[i]``; the first starts at ``min``), on
    :func:`display_edges` (log2 |g| by default). ``sum`` and ``sum_squares`` are estimated
    from the bucket midpoints unless given (linear scale only: ``GradStats`` L1 norm and
    squared L2 norm are exact). Everything is a finite float: NaN/Inf were never binned.
    """
    row = _row(counts_row)
    span = _span(row)
    if span is None:
        return None  # TensorBoard rejects an empty histogram: log nothing
    lo, hi = span
    shown = display_edges(edges, log2, max_abs)
    limits = shown[lo + 1 : hi + 2]
    counts = [float(c) for c in row[lo : hi + 1]]
    mids = [(shown[i] + shown[i + 1]) / 2 for i in range(lo, hi + 1)]
    if not log2 and lo == 0:
        mids[0] = 0.0 if row[0] else mids[0]  # bin 0 is (almost always) exact zeros
    top = _finite_max(max_abs)
    high = limits[-1] if log2 or top is None else top
    est_sum = sum(c * m for c, m in zip(counts, mids))
    est_sq = sum(c * m * m for c, m in zip(counts, mids))
    return {
        "min": float(shown[lo]),
        "max": float(high),
        "num": float(sum(counts)),
        "sum": float(sum_abs) if sum_abs is not None and not log2 else est_sum,
        "sum_squares": float(sum_squares) if sum_squares is not None and not log2 else est_sq,
        "bucket_limits": limits,
        "bucket_counts": counts,
    }


def wandb_np_histogram(
    counts_row: Any, edges: Any = None, *, log2: bool = True, max_abs: float | None = None
) -> tuple[list[int], list[float]] | None:
    """``(counts, bins)`` for ``wandb.Histogram(np_histogram=...)``, or None if empty.

    Trimmed to the lowest..highest nonempty bin (at most 152 bins, W&B allows 512), on
    :func:`display_edges`: ``len(bins) == len(counts) + 1``, every edge finite.
    """
    row = _row(counts_row)
    span = _span(row)
    if span is None:
        return None
    lo, hi = span
    shown = display_edges(edges, log2, max_abs)
    return row[lo : hi + 1], shown[lo : hi + 2]


def _histogram_rows(history: History) -> list[tuple[int, int]]:
    """``(history row, histogram row)`` of each histogram step in ``history``."""
    hist = history.histograms
    if hist is None or not len(hist):
        return []
    where = {int(step): t for t, step in enumerate(history.steps)}
    return [(where[int(s)], k) for k, s in enumerate(hist.steps) if int(s) in where]


class TensorBoardWriter:
    """Logs every recorded step's :meth:`History.row_dict` as scalars to a SummaryWriter.

    With ``GradMonitor(histograms=True)`` each histogram step also gets one
    ``add_histogram_raw`` per parameter (tag ``grad_hist/<name>``, buckets on log2 |g|, see
    :func:`tensorboard_histogram_kwargs`): NaN/Inf never enter
    a bucket, and a parameter without finite values (empty, all NaN) logs nothing, where
    ``add_histogram`` would raise.

    ``writer`` is a ``torch.utils.tensorboard.SummaryWriter`` (or anything with
    ``add_scalar(tag, value, step)``); ``log_dir`` creates one (needs ``tensorboard``).
    Each recorded step is written at its own step number (TensorBoard accepts any order),
    and the writer is flushed after each monitor flush so the event file is up to date.

    ``spec``: which values to write (:class:`~fastgradstats.monitor.logspec.LogSpec`; the
    monitor passes its own): totals, blocks or layers, filtered. Default: every layer.
    Histograms follow it: one per logged layer, or per logged block (its members' counts
    added), none with ``log="totals"``.
    """

    def __init__(
        self, writer: Any = None, log_dir: str | None = None, *, spec: LogSpec | None = None
    ) -> None:
        self.spec = _check_spec(spec)
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise ImportError(
                    "TensorBoardWriter needs the `tensorboard` package: pip install tensorboard"
                ) from exc
            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer

    def write(self, history: History) -> None:
        for t in range(len(history)):
            step = int(history.steps[t])
            for key, value in self.spec.row_dict(history, t).items():
                self.writer.add_scalar(key, value, step)
        self._write_histograms(history)
        flush = getattr(self.writer, "flush", None)
        if len(history) and callable(flush):
            flush()

    def _write_histograms(self, history: History) -> None:
        hist = history.histograms
        rows = _histogram_rows(history)
        if not rows or not callable(getattr(self.writer, "add_histogram_raw", None)):
            return
        keys = history.key_names()
        for t, k in rows:
            step = int(hist.steps[k])
            for name, counts in self.spec.histogram_counts(history, t, k):
                kwargs = tensorboard_histogram_kwargs(counts.tolist())
                if kwargs is not None:  # None: no finite value to show
                    self.writer.add_histogram_raw(keys.histogram(name), global_step=step, **kwargs)


class WandbWriter:
    """Logs flushed rows to Weights & Biases without ever moving or fighting the run's step.

    W&B writes only to a run's current step (its docs: "It is not possible to write to a
    specific history step"), and a flush comes after the steps it holds. So:

    * ``rows="latest"`` (default): each flush merges its newest recorded row into the run's
      current step with ``run.log(row, commit=False)``. The run's step is never advanced,
      so rows the user logs with ``run.log(..., step=step)`` are all kept. The rows in
      between stay in ``monitor.history()`` and the JSONL/CSV writers; flush every step to
      send every row.
    * ``rows="all"``: every recorded row becomes its own W&B step (``run.log(row)``). Use it
      only when nothing else in the run passes ``step=`` (W&B drops rows logged with a
      step lower than the current one).

    Every monitor key is plotted against its own x axis, ``grad/step`` (the monitor's step
    number; ``define_metric``), so the charts are right in both modes.

    With ``GradMonitor(histograms=True)`` a row that is a histogram step also carries
    ``grad_hist/<name>``: ``wandb.Histogram(np_histogram=(counts, bins))`` on log2 |g|
    (:func:`wandb_np_histogram`; parameters without finite values
    are left out) and ``grad_hist_step``, the step the histograms are of. With
    ``rows="latest"`` the newest histogram of the flush is sent with the newest row (so
    ``grad_hist_step`` can be older than ``grad/step``).
    """

    modes = ("latest", "all")

    def __init__(
        self,
        run: Any = None,
        *,
        keys: Keys | None = None,
        rows: str = "latest",
        spec: LogSpec | None = None,
    ) -> None:
        self.spec = _check_spec(spec)
        if rows not in self.modes:
            raise ValueError(f"rows must be one of {self.modes}, got {rows!r}")
        if run is None:
            try:
                import wandb
            except ImportError as exc:  # wandb is an optional extra
                raise ImportError(
                    "WandbWriter needs the `wandb` package: pip install wandb"
                ) from exc
            run = wandb.run
            if run is None:
                raise RuntimeError("WandbWriter: call wandb.init() first or pass run=")
        self.run = run
        self.rows = rows
        self._defined: Keys | None = None
        if keys is not None:
            self._define(keys)

    def _define(self, keys: Keys) -> None:
        self.run.define_metric(keys.step_metric)
        for pattern in keys.patterns():
            self.run.define_metric(pattern, step_metric=keys.step_metric)
        self._defined = keys

    def write(self, history: History) -> None:
        if not len(history):
            return
        keys = history.key_names()
        if self._defined != keys:
            self._define(keys)
        last = len(history) - 1
        hist_rows = _histogram_rows(history)
        by_row = dict(hist_rows)
        if self.rows == "latest" and hist_rows:
            by_row = {last: hist_rows[-1][1]}  # the newest histogram rides on the newest row
        for t in range(len(history)) if self.rows == "all" else (last,):
            row = self.spec.row_dict(history, t)
            row[keys.step_metric] = int(history.steps[t])
            if t in by_row:
                pairs = self.spec.histogram_counts(history, t, by_row[t])
                row.update(self._histograms(history, by_row[t], keys, pairs))
            if self.rows == "all":
                self.run.log(row)
            else:
                self.run.log(row, commit=False)

    @staticmethod
    def _histograms(
        history: History, k: int, keys: Keys, pairs: list[tuple[str, np.ndarray]]
    ) -> dict[str, Any]:
        import wandb

        hist = history.histograms
        out: dict[str, Any] = {}
        for name, counts in pairs:
            pair = wandb_np_histogram(counts.tolist())
            if pair is not None:
                out[keys.histogram(name)] = wandb.Histogram(np_histogram=pair)
        if out:
            out[keys.histogram_step] = int(hist.steps[k])
        return out


def _check_spec(spec: Any) -> LogSpec:
    if spec is None:
        return LogSpec()  # every layer, as History.row_dict
    if not isinstance(spec, LogSpec):
        raise TypeError(f"spec must be a LogSpec or None, got {type(spec).__name__}")
    return spec


__all__ = [
    "CsvWriter",
    "HistoryWriter",
    "JsonlWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "display_edges",
    "tensorboard_histogram_kwargs",
    "wandb_np_histogram",
]
