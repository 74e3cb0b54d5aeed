"""Recorded steps on the host: :class:`History` (and :class:`HistogramHistory`), numpy arrays.

The device ring buffers the monitor writes every step are in :mod:`.rings`; their
``gather`` copies rows here in one transfer, and :class:`Frame` makes a :class:`History`
of those arrays for one monitor's parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..constants import NUM_BINS
from ..precision import PrecisionReport, precision_report
from .keys import Keys

TINY = 1e-30  # floor before taking logs: a zero gradient is "very small", not -inf

# The per-step arrays of a History, in the order the ring buffer packs them.
ARRAY_FIELDS = (
    "steps",
    "norms",
    "max_abs",
    "nan_count",
    "inf_count",
    "present",
    "total_norm",
    "clip_coef",
    "nonfinite",
    "skipped",
    "spike_total",
    "spike_layer",
)
# With GradMonitor(param_norms=True) only (``None`` otherwise).
PARAM_FIELDS = ("param_norm", "update_norm")


def nonfinite_json(value: float) -> float | str:
    """``value``, or ``"NaN"``/``"Infinity"``/``"-Infinity"`` (JSON has no non-finite floats)."""
    # Strings that float() parses back keep the file standard JSON.
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def combine_norms(norms: Any, norm_type: float) -> float:
    """The p-norm of a vector made of pieces whose p-norms are ``norms`` (float64).

    ``inf``: the max; ``-inf``: the min; 0: the sum (counts of nonzeros add); other p:
    ``(sum n_i^p)^(1/p)``, scaled by the largest piece so no power overflows. NaN in,
    NaN out; an empty list is 0.
    """
    values = np.asarray(norms, dtype=np.float64).reshape(-1)
    if not values.size:
        return 0.0
    if np.isnan(values).any():
        return math.nan
    p = float(norm_type)
    if p == math.inf:
        return float(values.max())
    if p == -math.inf:
        return float(values.min())
    if p == 0:
        return float(values.sum())
    if p > 0:
        top = float(values.max())
        if top == 0.0 or math.isinf(top):
            return top
        return top * float(np.sum((values / top) ** p)) ** (1.0 / p)
    with np.errstate(divide="ignore", over="ignore"):  # 0 ** -p = inf: the result is 0
        return float(np.sum(values**p) ** (1.0 / p))


@dataclass
class History:
    """Recorded steps as host (numpy) arrays, oldest first.

    Shapes: ``T`` recorded steps, ``n`` parameters (``names``).

    Attributes:
        steps: int64 [T], the step number (0-based count of ``monitor.step()`` calls).
        norms / max_abs: float64 [T, n], per-parameter gradient norm and max |g|, before
            clipping (0 where ``present`` is False).
        nan_count / inf_count: int64 [T, n].
        present: bool [T, n], False where the parameter had no gradient that step.
        total_norm: float64 [T], norm of all gradients as one vector, before clipping.
        clip_coef: float64 [T], factor the gradients were multiplied by (1.0: untouched).
        nonfinite: bool [T], some gradient held NaN/Inf (or the total norm overflowed).
        skipped: bool [T], the optimizer update was suppressed (``skip_nonfinite``).
        spike_total: bool [T]; spike_layer: bool [T, n].
        keys: the logger key names :meth:`row_dict` uses (``None``: the default style for
            ``norm_type``, no prefix).
        param_norm / update_norm: float64 [T, n] (``GradMonitor(param_norms=True)``, else
            ``None``): ||w|| at ``step()`` and ||w - w_prev||, w_prev the weights at the
            previous recorded step (NaN the first time a parameter is recorded); 0 where
            ``present`` is False. See :meth:`update_ratio` and :meth:`param_norm_total`.
        histograms: the per-layer |g| histograms recorded at these steps
            (``GradMonitor(histograms=True)``; at most one every ``histogram_every``
            recorded steps), or ``None``.
    """

    names: list[str]
    numels: list[int]
    ndims: list[int]
    norm_type: float
    max_norm: float | None
    steps: np.ndarray
    norms: np.ndarray
    max_abs: np.ndarray
    nan_count: np.ndarray
    inf_count: np.ndarray
    present: np.ndarray
    total_norm: np.ndarray
    clip_coef: np.ndarray
    nonfinite: np.ndarray
    skipped: np.ndarray
    spike_total: np.ndarray
    spike_layer: np.ndarray
    keys: Keys | None = None
    histograms: HistogramHistory | None = None
    param_norm: np.ndarray | None = None
    update_norm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def key_names(self) -> Keys:
        """The :class:`~fastgradstats.monitor.keys.Keys` of this history's values."""
        return self.keys if self.keys is not None else Keys(norm_type=self.norm_type)

    def row_dict(self, t: int) -> dict[str, float]:
        """Logger-ready dict of recorded step ``t`` (index into this history, not a step no.).

        Key names: see :mod:`fastgradstats.monitor.keys`; absent gradients are left out,
        ``grad_nonfinite/<name>`` appears only when that gradient held NaN/Inf.
        """
        keys = self.key_names()
        out: dict[str, float] = {
            keys.total: float(self.total_norm[t]),
            keys.clip_coef: float(self.clip_coef[t]),
            keys.nonfinite: float(self.nonfinite[t]),
            keys.skipped: float(self.skipped[t]),
            keys.spike_total: float(self.spike_total[t]),
        }
        for j, name in enumerate(self.names):
            if not self.present[t, j]:
                continue
            out[keys.norm(name)] = float(self.norms[t, j])
            out[keys.max_abs(name)] = float(self.max_abs[t, j])
            bad = int(self.nan_count[t, j] + self.inf_count[t, j])
            if bad:
                out[keys.nonfinite_count(name)] = float(bad)
        return out

    def update_ratio(self) -> np.ndarray | None:
        """||w_t - w_prev|| / ||w_t|| per step and parameter, float64 [T, n] (``None``
        without ``param_norms=True``); NaN where absent, on a parameter's first recorded
        step and where ||w_t|| = 0."""
        if self.param_norm is None or self.update_norm is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = self.update_norm / self.param_norm
        return np.where(self.present & (self.param_norm != 0), ratio, np.nan)

    def param_norm_total(self) -> np.ndarray | None:
        """The norm of every present parameter's weights as one vector, float64 [T]
        (``None`` without ``param_norms=True``)."""
        if self.param_norm is None:
            return None
        return np.array(
            [
                combine_norms(self.param_norm[t][self.present[t]], self.norm_type)
                for t in range(len(self))
            ]
        )

    def rms(self) -> np.ndarray:
        """Per-parameter norm divided by ``numel ** (1/p)``: comparable across layer sizes.

        float64 [T, n]; NaN where the gradient was absent or non-finite.
        """
        if math.isinf(self.norm_type) or self.norm_type == 0:
            scale = np.ones(len(self.names))
        else:
            scale = np.maximum(np.asarray(self.numels, dtype=np.float64), 1.0) ** (
                1.0 / self.norm_type
            )
        values = self.norms / scale
        return np.where(self.present & np.isfinite(values), values, np.nan)

    def select(self, rows: Any) -> History:
        """A copy holding only the recorded steps ``rows`` (an index array or slice), and
        the histograms of those steps."""
        arrays = {name: getattr(self, name)[rows].copy() for name in ARRAY_FIELDS}
        for name in PARAM_FIELDS:
            value = getattr(self, name)
            arrays[name] = None if value is None else value[rows].copy()
        hist = self.histograms
        if hist is not None:
            hist = hist.select(np.isin(hist.steps, arrays["steps"]))
        return History(**{**self.__dict__, **arrays, "histograms": hist})


HISTOGRAM_FIELDS = ("steps", "counts", "zero_count", "max_abs", "present")


@dataclass
class HistogramHistory:
    """Per-layer |g| histograms of some recorded steps, host (numpy) arrays, oldest first.

    Bins: :func:`fastgradstats.histogram.histogram_edges` (``B = 152``). Shapes: ``T``
    histogram steps, ``n`` parameters.

    Attributes:
        steps: int64 [T], the step numbers.
        counts: int64 [T, n, B], finite |g| per bin (0 where ``present`` is False).
        zero_count: int64 [T, n], exact zeros (also in bin 0).
        max_abs: float64 [T, n], max |g| of the step (NaN where the gradient held NaN).
        present: bool [T, n], the parameter had a gradient that step.
    """

    names: list[str]
    numels: list[int]
    steps: np.ndarray
    counts: np.ndarray
    zero_count: np.ndarray
    max_abs: np.ndarray
    present: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def select(self, rows: Any) -> HistogramHistory:
        """A copy holding only the histogram steps ``rows`` (index array, mask or slice)."""
        arrays = {name: getattr(self, name)[rows].copy() for name in HISTOGRAM_FIELDS}
        return HistogramHistory(names=list(self.names), numels=list(self.numels), **arrays)

    def report(self, t: int = -1, dtype: Any = torch.float16) -> PrecisionReport:
        """The :class:`~fastgradstats.precision.PrecisionReport` of histogram step ``t``
        (CPU tensors; every parameter, absent ones with no values)."""
        return precision_report(
            torch.from_numpy(self.counts[t]),
            torch.from_numpy(self.zero_count[t]),
            dtype=dtype,
            max_abs=torch.from_numpy(self.max_abs[t]),
        )

    def precision_dict(self, dtypes: list[Any], keys: Keys, t: int = -1) -> dict[str, float]:
        """Logger keys of histogram step ``t``: per present parameter, the zero fraction and,
        per target dtype, the shares that flush to zero, are subnormal, or overflow."""
        out: dict[str, float] = {}
        if not len(self):
            return out
        present = self.present[t]
        numels = np.maximum(np.asarray(self.numels, dtype=np.float64), 1.0)
        zero_frac = self.zero_count[t] / numels
        for j, name in enumerate(self.names):
            if present[j]:
                out[keys.zero_fraction(name)] = float(zero_frac[j])
        for dtype in dtypes:
            report = self.report(t, dtype)
            fmt = report.format.name
            for field in ("flush_to_zero", "subnormal", "overflow"):
                values = getattr(report, field).tolist()
                for j, name in enumerate(self.names):
                    if present[j]:
                        out[keys.precision(fmt, field, name)] = float(values[j])
        return out


def empty_histogram_arrays(t: int, n: int) -> dict[str, np.ndarray]:
    """The arrays of a HistogramHistory of ``t`` blank rows."""
    return {
        "steps": np.full(t, -1, dtype=np.int64),
        "counts": np.zeros((t, n, NUM_BINS), dtype=np.int64),
        "zero_count": np.zeros((t, n), dtype=np.int64),
        "max_abs": np.zeros((t, n)),
        "present": np.zeros((t, n), dtype=bool),
    }


def empty_arrays(t: int, n: int) -> dict[str, np.ndarray]:
    """The arrays of a History of ``t`` blank rows (step -1, coefficient 1, all else 0)."""
    return {
        "steps": np.full(t, -1, dtype=np.int64),
        "norms": np.zeros((t, n)),
        "max_abs": np.zeros((t, n)),
        "nan_count": np.zeros((t, n), dtype=np.int64),
        "inf_count": np.zeros((t, n), dtype=np.int64),
        "present": np.zeros((t, n), dtype=bool),
        "total_norm": np.zeros(t),
        "clip_coef": np.ones(t),
        "nonfinite": np.zeros(t, dtype=bool),
        "skipped": np.zeros(t, dtype=bool),
        "spike_total": np.zeros(t, dtype=bool),
        "spike_layer": np.zeros((t, n), dtype=bool),
    }


@dataclass
class Frame:
    """What a monitor's histories share: its parameters and settings. Makes a
    :class:`History` (or :class:`HistogramHistory`) of gathered arrays."""

    names: list[str]
    numels: list[int]
    ndims: list[int]
    norm_type: float
    max_norm: float | None
    keys: Keys | None
    param_norms: bool

    def history(self, arrays: dict[str, np.ndarray]) -> History:
        """A :class:`History` of ``arrays`` (``ARRAY_FIELDS``, and ``PARAM_FIELDS``)."""
        return History(
            names=list(self.names),
            numels=list(self.numels),
            ndims=list(self.ndims),
            norm_type=self.norm_type,
            max_norm=self.max_norm,
            keys=self.keys,
            **arrays,
        )

    def empty_arrays(self, t: int) -> dict[str, Any]:
        """The arrays of ``t`` blank rows, with the weight norms of ``param_norms=True``."""
        arrays: dict[str, Any] = empty_arrays(t, len(self.names))
        if self.param_norms:
            arrays.update(
                param_norm=np.zeros((t, len(self.names))),
                update_norm=np.zeros((t, len(self.names))),
            )
        return arrays

    def histograms(self, arrays: dict[str, np.ndarray]) -> HistogramHistory:
        """A :class:`HistogramHistory` of ``arrays`` (``HISTOGRAM_FIELDS``)."""
        return HistogramHistory(names=list(self.names), numels=list(self.numels), **arrays)


__all__ = [
    "ARRAY_FIELDS",
    "HISTOGRAM_FIELDS",
    "PARAM_FIELDS",
    "TINY",
    "Frame",
    "HistogramHistory",
    "History",
    "empty_arrays",
    "empty_histogram_arrays",
    "nonfinite_json",
]
