"""GradMonitor: per-layer gradient statistics for every training step, without host syncs.

Usage::

    monitor = GradMonitor(model, max_norm=1.0)
    for step, batch in enumerate(loader):
        loss = model(batch).mean()
        loss.backward()
        monitor.step()            # stats (+ clipping) in one pass, stays on the device
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(monitor.report())   # one host sync per logging interval

Design choices (the issue left them open):

* The parameter list is fixed at construction: every parameter with ``requires_grad``.
  A parameter whose ``.grad`` is ``None`` in a step is recorded with zero statistics and
  ``present=False``; the diagnosis, spike detection and loggers ignore it there.
* Recorded norms are the gradients as they came out of ``backward()``, before clipping;
  the clip coefficient that was applied is recorded next to them (1.0 when not clipping).
* Step numbers count calls to :meth:`GradMonitor.step` from 0 and are kept on the host
  (they are Python ints the monitor already knows), not in device memory.
* Spikes are detected on the device at every recorded step: a norm is a spike when its
  natural log exceeds an exponential moving average of the log-norm by more than
  ``spike_threshold`` EMA standard deviations *and* the norm is at least
  ``spike_min_ratio`` times the EMA level (the ratio keeps a very steady run, whose EMA
  standard deviation is tiny, from flagging harmless wiggles). Log space, because
  gradient norms vary multiplicatively.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from . import core
from .clip import clip_grad_norm_, get_total_norm
from .stats import GradStats, compute
from .torch_backend import host_to_device

_TINY = 1e-30  # floor before taking logs: a zero gradient is "very small", not -inf


# ----------------------------------------------------------------------------- history


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

    def __len__(self) -> int:
        return len(self.steps)

    def row_dict(self, t: int) -> dict[str, float]:
        """Logger-ready dict of recorded step ``t`` (index into this history, not a step no.)."""
        out: dict[str, float] = {
            "grad_norm/total": float(self.total_norm[t]),
            "grad_clip_coef": float(self.clip_coef[t]),
            "grad_nonfinite": float(self.nonfinite[t]),
            "grad_skipped": float(self.skipped[t]),
            "grad_spike/total": float(self.spike_total[t]),
        }
        for j, name in enumerate(self.names):
            if not self.present[t, j]:
                continue
            out[f"grad_norm/{name}"] = float(self.norms[t, j])
            out[f"grad_max_abs/{name}"] = float(self.max_abs[t, j])
            bad = int(self.nan_count[t, j] + self.inf_count[t, j])
            if bad:
                out[f"grad_nonfinite/{name}"] = float(bad)
        return out

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


def _nonfinite_json(value: float) -> float | str:
    # JSON has no NaN/Infinity; strings that float() parses back keep the file standard.
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


# ----------------------------------------------------------------------------- writers


class HistoryWriter(Protocol):
    """Anything with ``write(history)`` (called with the rows new since the last flush)."""

    def write(self, history: History) -> None: ...


class JsonlWriter:
    """Appends one JSON object per recorded step to ``path``.

    Keys: ``step``, ``total_norm``, ``clip_coef``, ``nonfinite``, ``skipped``,
    ``spike_total``, and per-parameter dicts ``norm``, ``max_abs``, ``nan_count``,
    ``inf_count``, ``spike`` keyed by parameter name (absent gradients left out).
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
                    "total_norm": _nonfinite_json(float(history.total_norm[t])),
                    "clip_coef": _nonfinite_json(float(history.clip_coef[t])),
                    "nonfinite": bool(history.nonfinite[t]),
                    "skipped": bool(history.skipped[t]),
                    "spike_total": bool(history.spike_total[t]),
                    "norm": per(history.norms, lambda v: _nonfinite_json(float(v))),
                    "max_abs": per(history.max_abs, lambda v: _nonfinite_json(float(v))),
                    "nan_count": per(history.nan_count, int),
                    "inf_count": per(history.inf_count, int),
                    "spike": per(history.spike_layer, bool),
                }
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


class TensorBoardWriter:
    """Logs every recorded step's :meth:`History.row_dict` as scalars to a SummaryWriter.

    ``writer`` is a ``torch.utils.tensorboard.SummaryWriter`` (or anything with
    ``add_scalar(tag, value, step)``); ``log_dir`` creates one (needs ``tensorboard``).
    """

    def __init__(self, writer: Any = None, log_dir: str | None = None) -> None:
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
            for key, value in history.row_dict(t).items():
                self.writer.add_scalar(key, value, step)


class WandbWriter:
    """Logs every recorded step to Weights & Biases against its own x axis ``grad/step``.

    Using a dedicated step metric (``define_metric``) lets the monitor log past steps at
    flush time without fighting the run's own monotonically increasing step.
    """

    def __init__(self, run: Any = None) -> None:
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
        self.run.define_metric("grad/step")
        for prefix in ("grad_norm/*", "grad_max_abs/*", "grad_nonfinite*", "grad_spike/*"):
            self.run.define_metric(prefix, step_metric="grad/step")
        for key in ("grad_clip_coef", "grad_skipped"):
            self.run.define_metric(key, step_metric="grad/step")

    def write(self, history: History) -> None:
        for t in range(len(history)):
            row = history.row_dict(t)
            row["grad/step"] = int(history.steps[t])
            self.run.log(row)


# ----------------------------------------------------------------------------- diagnosis


@dataclass
class Diagnosis:
    """What the recorded history says, in numbers and in words.

    Attributes:
        verdict: ``"exploding"`` (gradients grow across depth or over time, overflow to
            Inf, or are held at ``max_norm`` by clipping from far above), ``"vanishing"``
            (earliest layers get far smaller gradients than the latest), ``"nonfinite"``
            (NaN without signs of explosion), or ``"healthy"``.
        contained: exploding, but clipping kept every step finite.
        findings: plain-language sentences, most important first.
        depth_slope: decades of gradient RMS per layer from the first (input side) to
            the last layer (least-squares fit of log10 RMS against layer index; > 0:
            gradients shrink going backward toward the input, i.e. vanishing).
        depth_ratio: RMS of the earliest layers / RMS of the latest layers (median over
            finite steps; the first and last quarter of the weight tensors).
        time_growth: largest total norm / median total norm of the first 10% of steps
            (``inf`` once the total norm became non-finite).
        first_nonfinite: ``{name: (step, nan_count, inf_count)}`` for each parameter whose
            gradient ever held NaN/Inf, the first step it was seen.
        nonfinite_steps / skipped_steps / clipped_steps: counts over all recorded steps.
        spikes: ``[(step, name or "total", norm)]`` in step order (capped at 1000).
    """

    verdict: str
    contained: bool
    findings: list[str]
    steps: int
    depth_slope: float | None
    depth_ratio: float | None
    profile_names: list[str]
    profile_log10_rms: list[float]
    time_growth: float | None
    first_nonfinite: dict[str, tuple[int, int, int]]
    first_nonfinite_step: int | None
    nonfinite_steps: int
    skipped_steps: int
    clipped_steps: int
    spikes: list[tuple[int, str, float]]
    max_norm: float | None = None

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """A few lines for a console or a log file."""
        note = " (contained by clipping)" if self.contained else ""
        lines = [f"verdict: {self.verdict.upper()}{note}  ({self.steps} recorded steps)"]
        lines += [f"  - {text}" for text in self.findings]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats as strings ``"NaN"``/``"Infinity"``)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float):
                return _nonfinite_json(value)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        return clean(
            {
                "verdict": self.verdict,
                "contained_by_clipping": self.contained,
                "findings": self.findings,
                "steps": self.steps,
                "depth_slope_decades_per_layer": self.depth_slope,
                "depth_ratio_earliest_over_latest": self.depth_ratio,
                "profile": dict(zip(self.profile_names, self.profile_log10_rms)),
                "time_growth": self.time_growth,
                "first_nonfinite": {
                    k: {"step": s, "nan_count": a, "inf_count": b}
                    for k, (s, a, b) in self.first_nonfinite.items()
                },
                "first_nonfinite_step": self.first_nonfinite_step,
                "nonfinite_steps": self.nonfinite_steps,
                "skipped_steps": self.skipped_steps,
                "clipped_steps": self.clipped_steps,
                "spikes": [{"step": s, "name": n, "norm": v} for s, n, v in self.spikes],
                "max_norm": self.max_norm,
            }
        )


def depth_profile(history: History, rows: slice | None = None) -> tuple[list[str], np.ndarray]:
    """Per-layer log10 gradient RMS (median over the finite steps in ``rows``), in order.

    Uses the weight tensors (ndim >= 2) when there are at least two, since biases and
    norm scales sit on a different scale; layers with no finite value are dropped.
    """
    cols = [j for j, d in enumerate(history.ndims) if d >= 2]
    if len(cols) < 2:
        cols = list(range(len(history.names)))
    rms = history.rms()[rows if rows is not None else slice(None)][:, cols]
    if len(rms) == 0:
        return [], np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        logs = np.where(np.isnan(rms), np.nan, np.log10(np.maximum(rms, _TINY)))
        med = np.nanmedian(logs, axis=0)
    keep = [i for i in range(len(cols)) if np.isfinite(med[i])]
    return [history.names[cols[i]] for i in keep], med[keep]


def _profile_shape(profile: np.ndarray) -> tuple[float, float]:
    """(slope in decades per layer, log10 of earliest-quarter over latest-quarter RMS)."""
    slope = float(np.polyfit(np.arange(len(profile), dtype=np.float64), profile, 1)[0])
    quarter = max(1, len(profile) // 4)
    return slope, float(profile[:quarter].mean() - profile[-quarter:].mean())


def diagnose(
    history: History,
    *,
    events: _Events | None = None,
    decades: float = 2.0,
    growth_decades: float = 3.0,
) -> Diagnosis:
    """Verdict on a history: vanishing / exploding across depth or time, NaN/Inf, spikes.

    Args:
        history: recorded steps (e.g. ``monitor.history()``).
        events: counts and first-seen records that outlive the ring buffer (the monitor
            passes its own); computed from ``history`` alone when ``None``.
        decades: ``|log10(depth_ratio)|`` at or above which the depth profile is called
            vanishing (earliest layers smaller) or exploding (earliest layers larger).
        growth_decades: growth of the total norm over time (log10) called exploding.
    """
    if events is None:
        events = _Events()
        events.add(history, spike_cap=1000)
    findings: list[str] = []
    # The depth profile can change a lot during training (a deep sigmoid net that has
    # collapsed to predicting the mean has tiny gradients everywhere), so look at the
    # whole window, its oldest fifth and its latest fifth, and report the most extreme.
    count = len(history)
    fifth = max(1, count // 5)
    windows = {
        "": slice(None),
        " in the oldest recorded steps": slice(0, fifth),
        " in the latest recorded steps": slice(count - fifth, count),
    }
    best = None
    for label, rows in windows.items():
        names_w, profile_w = depth_profile(history, rows)
        if len(profile_w) >= 2:
            slope_w, log_ratio_w = _profile_shape(profile_w)
            if best is None or abs(log_ratio_w) > abs(best[3]) + 0.5:
                best = (label, names_w, profile_w, log_ratio_w, slope_w)
    names, profile = depth_profile(history)
    slope = ratio = None
    if best is not None:
        label, names, profile, log_ratio, slope = best
        ratio = float(10.0**log_ratio)
        where = f"from {names[0]} (first) to {names[-1]} (last){label}"
        if log_ratio <= -decades:
            findings.append(
                f"VANISHING across depth: the earliest layers get {1 / ratio:.3g}x smaller "
                f"gradients than the latest ({slope:.2f} decades lost per layer going "
                f"backward, {where}). The first layers barely learn: use ReLU/GELU instead "
                "of sigmoid/tanh, residual connections, normalization layers, or a "
                "variance-preserving init (Kaiming/Xavier)."
            )
        elif log_ratio >= decades:
            findings.append(
                f"EXPLODING across depth: the earliest layers get {ratio:.3g}x larger "
                f"gradients than the latest ({-slope:.2f} decades gained per layer going "
                f"backward, {where}). "
                "Each layer amplifies the backward signal: reduce the init scale, add "
                "normalization, lower the learning rate, and clip the gradient norm."
            )
        else:
            findings.append(
                f"Depth profile balanced: earliest/latest layer gradient RMS ratio "
                f"{ratio:.3g} ({slope:+.2f} decades per layer)."
            )

    growth = None
    finite = np.isfinite(history.total_norm)
    finite_total = history.total_norm[finite]
    if len(finite_total) >= 2:
        head = finite_total[: max(1, len(finite_total) // 10)]
        base = float(np.median(head))
        growth = float(finite_total.max() / base) if base > 0 else None
    grew = growth is not None and growth >= 10**growth_decades
    if grew:
        findings.append(
            f"EXPLODING over time: the total gradient norm grew {growth:.3g}x during the "
            "recorded steps."
        )
    if events.overflow_steps:
        last = f" (last finite value {finite_total[-1]:.3g})" if len(finite_total) else ""
        findings.append(
            f"EXPLODING: gradients overflowed to Inf on {events.overflow_steps} step(s){last}. "
            "Lower the learning rate or the init scale, and clip the gradient norm."
        )
    contained = False
    clip_share = events.clipped_steps / events.recorded if events.recorded else 0.0
    if history.max_norm is not None and history.max_norm > 0 and len(finite_total):
        typical = float(np.median(finite_total))
        far_above = typical >= 10.0 * history.max_norm and clip_share >= 0.5
        if far_above and not events.nonfinite_steps:
            contained = True
            findings.append(
                f"Contained by clipping: the raw total norm is typically {typical:.3g} "
                f"({typical / history.max_norm:.3g}x max_norm) and no NaN/Inf appeared; "
                "without clipping these updates would blow up. The scale is still wrong: "
                "check the init and the learning rate."
            )

    if events.first_nonfinite_step is not None:
        ordered = sorted(events.first_nonfinite.items(), key=lambda kv: kv[1][0])
        listed = ", ".join(f"{n} (step {s})" for n, (s, _, _) in ordered[:5])
        more = f" and {len(ordered) - 5} more" if len(ordered) > 5 else ""
        first = events.first_nonfinite_step
        overflow_first = not ordered or ordered[0][1][0] > first
        how = " (the total norm overflowed first)" if overflow_first and ordered else ""
        findings.insert(
            0,
            f"NaN/Inf gradients on {events.nonfinite_steps} step(s), first at step "
            f"{first}{how}: {listed or 'total norm overflowed'}{more}.",
        )
    if events.skipped_steps:
        findings.append(
            f"{events.skipped_steps} optimizer update(s) skipped because the gradients "
            "were not finite."
        )
    if history.max_norm is not None and events.recorded:
        findings.append(
            f"Clipping at max_norm={history.max_norm:g} scaled the gradients on "
            f"{events.clipped_steps} of {events.recorded} steps ({clip_share:.0%})."
        )
    if events.spikes:
        total_spikes = [s for s in events.spikes if s[1] == "total"]
        shown = ", ".join(f"step {s} ({v:.3g})" for s, _, v in total_spikes[:5])
        findings.append(
            f"{events.spike_count} gradient-norm spike(s) flagged "
            f"({len(total_spikes)} on the total norm{': ' + shown if shown else ''})."
        )

    deep_exploding = ratio is not None and math.log10(ratio) >= decades
    exploding = deep_exploding or grew or bool(events.overflow_steps) or contained
    vanishing = ratio is not None and math.log10(ratio) <= -decades
    if exploding:
        verdict = "exploding"
    elif vanishing:
        verdict = "vanishing"
    elif events.nonfinite_steps:
        verdict = "nonfinite"
    else:
        verdict = "healthy"
        findings.insert(0, "No NaN/Inf, no runaway growth, no vanishing profile.")
    return Diagnosis(
        verdict=verdict,
        contained=contained,
        findings=findings,
        steps=events.recorded,
        depth_slope=slope,
        depth_ratio=ratio,
        profile_names=names,
        profile_log10_rms=[float(v) for v in profile],
        time_growth=growth,
        first_nonfinite=dict(events.first_nonfinite),
        first_nonfinite_step=events.first_nonfinite_step,
        nonfinite_steps=events.nonfinite_steps,
        skipped_steps=events.skipped_steps,
        clipped_steps=events.clipped_steps,
        spikes=list(events.spikes),
        max_norm=history.max_norm,
    )


@dataclass
class _Events:
    """Host-side tallies kept across flushes, so they survive the ring buffer wrapping."""

    recorded: int = 0
    nonfinite_steps: int = 0
    nonfinite_total_steps: int = 0
    overflow_steps: int = 0
    skipped_steps: int = 0
    clipped_steps: int = 0
    spike_count: int = 0
    first_nonfinite: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    first_nonfinite_step: int | None = None
    spikes: list[tuple[int, str, float]] = field(default_factory=list)

    def add(self, chunk: History, spike_cap: int) -> None:
        self.recorded += len(chunk)
        self.nonfinite_steps += int(chunk.nonfinite.sum())
        self.nonfinite_total_steps += int((~np.isfinite(chunk.total_norm)).sum())
        self.skipped_steps += int(chunk.skipped.sum())
        self.clipped_steps += int((chunk.clip_coef < 1.0).sum())
        bad = (chunk.nan_count + chunk.inf_count) > 0
        overflow = (chunk.inf_count > 0).any(axis=1) | (chunk.total_norm == np.inf)
        self.overflow_steps += int(overflow.sum())
        for t in np.flatnonzero(chunk.nonfinite):
            step = int(chunk.steps[t])
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = step
            for j in np.flatnonzero(bad[t]):
                name = chunk.names[j]
                if name not in self.first_nonfinite:
                    self.first_nonfinite[name] = (
                        step,
                        int(chunk.nan_count[t, j]),
                        int(chunk.inf_count[t, j]),
                    )
        for t in np.flatnonzero(chunk.spike_total | chunk.spike_layer.any(axis=1)):
            step = int(chunk.steps[t])
            if chunk.spike_total[t]:
                self._spike(step, "total", float(chunk.total_norm[t]), spike_cap)
            for j in np.flatnonzero(chunk.spike_layer[t]):
                self._spike(step, chunk.names[j], float(chunk.norms[t, j]), spike_cap)

    def _spike(self, step: int, name: str, value: float, cap: int) -> None:
        self.spike_count += 1
        if len(self.spikes) < cap:
            self.spikes.append((step, name, value))


# ----------------------------------------------------------------------------- monitor


def _named_parameters(model: Any) -> list[tuple[str, Tensor]]:
    if isinstance(model, nn.Module):
        pairs = list(model.named_parameters())
    elif isinstance(model, Tensor):
        pairs = [("0", model)]
    elif isinstance(model, Iterable) and not isinstance(model, (str, bytes)):
        pairs = []
        for index, item in enumerate(model):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                pairs.append(item)
            elif isinstance(item, Tensor):
                pairs.append((str(index), item))
            else:
                raise TypeError(
                    f"model[{index}] must be a Tensor or a (name, Tensor) pair, "
                    f"got {type(item).__name__}"
                )
    else:
        raise TypeError(
            "model must be an nn.Module, a Tensor, or an iterable of Tensors or "
            f"(name, Tensor) pairs; got {type(model).__name__}"
        )
    pairs = [(name, p) for name, p in pairs if p.requires_grad]
    if not pairs:
        raise ValueError("model has no parameter with requires_grad=True to monitor")
    return pairs


def _positive_int(value: Any, arg_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg_name} must be a positive int, got {value!r}")
    return value


def _positive_float(value: Any, arg_name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg_name} must be a number, got {value!r}") from None
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{arg_name} must be a finite number > 0, got {value!r}")
    return number


class GradMonitor:
    """Watches every parameter's gradient every step, on the device, and diagnoses trouble.

    Args:
        model: an ``nn.Module`` (its ``named_parameters()`` with ``requires_grad``), or an
            iterable of Tensors / ``(name, Tensor)`` pairs. Fixed at construction.
        max_norm: when set, :meth:`step` also clips the total gradient norm to it (same
            single pass as the stats; torch's ``clip_grad_norm_`` semantics).
        norm_type: p of the norms (2, 1, ``inf``, any p torch accepts).
        history: ring-buffer length in recorded steps; the device holds ``history`` rows
            of ``n_params`` floats per field. Call :meth:`flush` (or anything that syncs:
            :meth:`report`, :meth:`to_dict`, :meth:`history`) at least every ``history``
            recorded steps or the oldest rows are lost to the writers and tallies.
        every: record every ``every``-th step (clipping and ``skip_nonfinite`` still act on
            every step).
        skip_nonfinite: on a step whose gradients hold NaN/Inf, suppress the optimizer
            update without a host sync. With an optimizer that supports AMP's
            ``found_inf`` (``torch.optim.Adam/AdamW/SGD(fused=True)``), pass it as
            ``optimizer=`` and it receives ``optimizer.found_inf`` so the fused kernel skips
            the update and its step counter; otherwise every gradient is set to 0 on that
            step (masked on the device), which stops plain SGD but not momentum or Adam
            moments already accumulated.
        optimizer: see ``skip_nonfinite`` (also accepted by :meth:`step`).
        spike_threshold: z-score (in log-norm, EMA statistics) above which a norm is a spike.
        spike_min_ratio: a spike must also be this many times the EMA level of the norm.
        spike_beta: EMA decay per recorded step (0.98: about 50 steps of memory).
        spike_warmup: recorded steps before spikes can be flagged.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (default: ``$FASTGRADSTATS_BACKEND``).
        foreach: passed to the torch backend.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[Any],
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
        history: int = 1000,
        every: int = 1,
        *,
        skip_nonfinite: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        spike_threshold: float = 6.0,
        spike_min_ratio: float = 2.0,
        spike_beta: float = 0.98,
        spike_warmup: int = 20,
        backend: str | None = None,
        foreach: bool | None = None,
    ) -> None:
        pairs = _named_parameters(model)
        self.names = [name for name, _ in pairs]
        self.params = [p for _, p in pairs]
        self.numels = [p.numel() for p in self.params]
        self.ndims = [p.dim() for p in self.params]
        self._index = {name: j for j, name in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError("model has duplicate parameter names")
        self.max_norm = None if max_norm is None else core.check_max_norm(max_norm)
        self.norm_type = core.check_norm_type(norm_type)
        self.capacity = _positive_int(history, "history")
        self.every = _positive_int(every, "every")
        self.skip_nonfinite = bool(skip_nonfinite)
        self.optimizer = optimizer
        self.spike_threshold = _positive_float(spike_threshold, "spike_threshold")
        self.spike_min_ratio = _positive_float(spike_min_ratio, "spike_min_ratio")
        if not 0.0 < float(spike_beta) < 1.0:
            raise ValueError(f"spike_beta must be in (0, 1), got {spike_beta!r}")
        self.spike_beta = float(spike_beta)
        if isinstance(spike_warmup, bool) or not isinstance(spike_warmup, int) or spike_warmup < 0:
            raise ValueError(f"spike_warmup must be a non-negative int, got {spike_warmup!r}")
        self.spike_warmup = spike_warmup
        self.backend = backend
        self.foreach = foreach

        self.device = self.params[0].device
        self.dtype = (
            torch.float64
            if any(p.dtype in (torch.float64, torch.complex128) for p in self.params)
            else torch.float32
        )
        self._writers: list[HistoryWriter] = []
        self.reset()

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything recorded (buffers are reallocated and zeroed)."""
        h, n, dev, dt = self.capacity, len(self.names), self.device, self.dtype
        self._norms = torch.zeros(h, n, dtype=dt, device=dev)
        self._max_abs = torch.zeros(h, n, dtype=dt, device=dev)
        self._nan = torch.zeros(h, n, dtype=torch.int64, device=dev)
        self._inf = torch.zeros(h, n, dtype=torch.int64, device=dev)
        self._present = torch.zeros(h, n, dtype=torch.bool, device=dev)
        self._total = torch.zeros(h, dtype=dt, device=dev)
        self._coef = torch.ones(h, dtype=dt, device=dev)
        self._found = torch.zeros(h, dtype=torch.bool, device=dev)
        self._skipped = torch.zeros(h, dtype=torch.bool, device=dev)
        self._spike = torch.zeros(h, n + 1, dtype=torch.bool, device=dev)  # last: total
        self._ema_mean = torch.zeros(n + 1, dtype=dt, device=dev)
        self._ema_var = torch.zeros(n + 1, dtype=dt, device=dev)
        self._ema_updates = 0
        self._host_steps = np.full(h, -1, dtype=np.int64)
        self._calls = 0  # calls to step()
        self._recorded = 0  # rows written to the ring
        self._flushed = 0  # rows copied to the host
        self._mirror: History | None = None  # host copy of the ring, filled by flush()
        self._events = _Events()
        self.lost_rows = 0
        self.found_inf: Tensor | None = None
        self.last_stats: GradStats | None = None
        self._all_index = torch.arange(n, device=dev)
        self._index_cache: dict[tuple[int, ...], Tensor] = {}

    @property
    def num_steps(self) -> int:
        """Calls to :meth:`step` so far."""
        return self._calls

    def add_writer(self, writer: HistoryWriter) -> HistoryWriter:
        """Send every flushed chunk of history to ``writer`` (``write(history)``)."""
        if not callable(getattr(writer, "write", None)):
            raise TypeError("writer must have a write(history) method")
        self._writers.append(writer)
        return writer

    # -- the per-step path: no host sync below ------------------------------------------

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer | None = None) -> Tensor | None:
        """Record (and clip) this step's gradients. Call after backward, before optimizer.step.

        Returns the total gradient norm before clipping (0-d tensor on the device), or
        ``None`` on a step that is neither recorded nor needs a norm. Never syncs.
        """
        step_no = self._calls
        self._calls += 1
        record = step_no % self.every == 0
        pairs = list(zip(self.names, self.params))
        stats: GradStats | None = None
        total: Tensor | None = None
        if self.max_norm is not None:
            if record:
                total, stats = clip_grad_norm_(
                    pairs,
                    self.max_norm,
                    self.norm_type,
                    foreach=self.foreach,
                    return_stats=True,
                    backend=self.backend,
                )
            else:
                total = clip_grad_norm_(
                    pairs, self.max_norm, self.norm_type, foreach=self.foreach, backend=self.backend
                )
        elif record:
            grads = core.collect(pairs)
            stats = compute(grads, self.norm_type, self.backend, self.foreach)
            total = stats.total_norm
        elif self.skip_nonfinite:
            grads = [p.grad for p in self.params if p.grad is not None]
            total = get_total_norm(
                grads, self.norm_type, foreach=self.foreach, backend=self.backend
            )

        if total is not None:
            total = total.to(self.device)
            self.found_inf = ~torch.isfinite(total)
            if self.skip_nonfinite:
                self._suppress_update(self.found_inf, optimizer or self.optimizer)
        if stats is not None:
            self.last_stats = stats
            self._write_row(step_no, stats)
        return total

    def _suppress_update(self, found_inf: Tensor, optimizer: Any) -> None:
        if optimizer is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused optimizers read this attribute (as set by torch.amp.GradScaler) and
            # skip the update and the step counter on the device when it is 1.
            optimizer.found_inf = found_inf.to(torch.float32)
            return
        for p in self.params:
            if p.grad is not None:
                # masked_fill, not a multiply: NaN * 0 is still NaN.
                p.grad.masked_fill_(found_inf.to(p.grad.device), 0)

    def _present_index(self, names: list[str]) -> Tensor:
        key = tuple(self._index[name] for name in names)
        index = self._index_cache.get(key)
        if index is None:
            # pinned, non-blocking: step() must not wait for the GPU
            index = host_to_device(list(key), torch.int64, self.device)
            self._index_cache[key] = index
        return index

    def _write_row(self, step_no: int, stats: GradStats) -> None:
        row = self._recorded % self.capacity
        self._recorded += 1
        self._host_steps[row] = step_no
        n = len(self.names)
        fields = [
            (self._norms, stats.norms),
            (self._max_abs, stats.max_abs),
            (self._nan, stats.nan_count),
            (self._inf, stats.inf_count),
        ]
        if len(stats) == n:
            for buf, value in fields:
                buf[row].copy_(value)
            self._present[row].fill_(True)
        else:
            index = self._present_index(stats.names)
            for buf, value in fields:
                buf[row].zero_()
                if len(stats):
                    buf[row].index_copy_(0, index, value.to(self.device, buf.dtype))
            self._present[row].zero_()
            if len(stats):
                self._present[row].index_fill_(0, index, True)
        total = stats.total_norm.to(self.device, self.dtype)
        self._total[row].copy_(total)
        if stats.clip_coef is not None:
            self._coef[row].copy_(stats.clip_coef)
        else:
            self._coef[row].fill_(1.0)
        # A NaN/Inf anywhere makes the total norm non-finite, and so does an overflow.
        self._found[row].copy_(~torch.isfinite(total))
        if self.skip_nonfinite:
            self._skipped[row].copy_(self._found[row])
        self._update_spikes(row, total)

    def _update_spikes(self, row: int, total: Tensor) -> None:
        values = torch.cat([self._norms[row], total.reshape(1)])
        present = torch.cat([self._present[row], self._present.new_ones(1)])
        valid = present & torch.isfinite(values)
        logs = torch.log(values.clamp_min(_TINY))
        if self._ema_updates >= max(self.spike_warmup, 1):
            deviation = logs - self._ema_mean
            std = self._ema_var.sqrt()
            spike = (
                valid
                & (deviation > self.spike_threshold * std)
                & (deviation > math.log(self.spike_min_ratio))
            )
            self._spike[row].copy_(spike)
        else:
            self._spike[row].zero_()
        # Average over the first steps, then a plain EMA (no start-up bias toward 0).
        alpha = max(1.0 / (self._ema_updates + 1), 1.0 - self.spike_beta)
        delta = torch.where(valid, logs - self._ema_mean, 0.0)
        self._ema_mean.add_(alpha * delta)
        self._ema_var.copy_(
            torch.where(
                valid, (1.0 - alpha) * (self._ema_var + alpha * delta * delta), self._ema_var
            )
        )
        self._ema_updates += 1

    # -- syncing side: once per logging interval ----------------------------------------

    def flush(self) -> History:
        """Copy the rows recorded since the last flush to the host (one sync) and log them.

        Returns those rows as a :class:`History` (oldest first); updates the tallies
        (NaN/Inf first seen, spikes, skipped and clipped steps) and calls the writers.
        """
        new = self._recorded - self._flushed
        lost = max(0, new - self.capacity)
        self.lost_rows += lost
        count = new - lost
        first = self._recorded - count
        rows = [r % self.capacity for r in range(first, self._recorded)]
        chunk = self._gather(rows)
        self._flushed = self._recorded
        self._merge_mirror(rows, chunk)
        self._events.add(chunk, spike_cap=1000)
        if lost:
            warnings.warn(
                f"GradMonitor: {lost} recorded steps were overwritten before flush(); "
                f"flush at least every history={self.capacity} recorded steps",
                stacklevel=2,
            )
        for writer in self._writers:
            writer.write(chunk)
        return chunk

    def _gather(self, rows: list[int]) -> History:
        n, t = len(self.names), len(rows)
        if t:
            index = torch.tensor(rows, dtype=torch.int64).to(self.device)
            pieces = [
                self._norms[index],
                self._max_abs[index],
                self._nan[index],
                self._inf[index],
                self._present[index],
                self._spike[index],
                self._total[index, None],
                self._coef[index, None],
                self._found[index, None],
                self._skipped[index, None],
            ]
            # One float64 block, one device->host copy: the only sync of a flush.
            packed = torch.cat([p.to(torch.float64) for p in pieces], dim=1).cpu().numpy()
        else:
            packed = np.zeros((0, 6 * n + 5))
        cols = np.cumsum([0, n, n, n, n, n, n + 1, 1, 1, 1, 1])
        part = [packed[:, cols[i] : cols[i + 1]] for i in range(len(cols) - 1)]
        spike = part[5].astype(bool)
        return History(
            names=list(self.names),
            numels=list(self.numels),
            ndims=list(self.ndims),
            norm_type=self.norm_type,
            max_norm=self.max_norm,
            steps=self._host_steps[rows].copy() if t else np.zeros(0, dtype=np.int64),
            norms=part[0],
            max_abs=part[1],
            nan_count=part[2].astype(np.int64),
            inf_count=part[3].astype(np.int64),
            present=part[4].astype(bool),
            total_norm=part[6][:, 0],
            clip_coef=part[7][:, 0],
            nonfinite=part[8][:, 0].astype(bool),
            skipped=part[9][:, 0].astype(bool),
            spike_total=spike[:, n],
            spike_layer=spike[:, :n],
        )

    def _merge_mirror(self, rows: list[int], chunk: History) -> None:
        if self._mirror is None:
            h, n = self.capacity, len(self.names)
            empty = self._gather([])
            self._mirror = History(
                **{
                    **empty.__dict__,
                    "steps": np.full(h, -1, dtype=np.int64),
                    "norms": np.zeros((h, n)),
                    "max_abs": np.zeros((h, n)),
                    "nan_count": np.zeros((h, n), dtype=np.int64),
                    "inf_count": np.zeros((h, n), dtype=np.int64),
                    "present": np.zeros((h, n), dtype=bool),
                    "total_norm": np.zeros(h),
                    "clip_coef": np.ones(h),
                    "nonfinite": np.zeros(h, dtype=bool),
                    "skipped": np.zeros(h, dtype=bool),
                    "spike_total": np.zeros(h, dtype=bool),
                    "spike_layer": np.zeros((h, n), dtype=bool),
                }
            )
        for name in _ARRAY_FIELDS:
            getattr(self._mirror, name)[rows] = getattr(chunk, name)

    def history(self) -> History:
        """The last ``min(recorded, history)`` recorded steps, oldest first (flushes)."""
        self.flush()
        count = min(self._recorded, self.capacity)
        rows = [r % self.capacity for r in range(self._recorded - count, self._recorded)]
        if self._mirror is None:
            return self._gather([])
        return History(
            **{
                **self._mirror.__dict__,
                **{name: getattr(self._mirror, name)[rows].copy() for name in _ARRAY_FIELDS},
            }
        )

    def report(self, **kwargs: Any) -> Diagnosis:
        """Flush and diagnose (see :func:`diagnose` for ``kwargs``); ``str()`` it to print."""
        return diagnose(self.history(), events=self._events, **kwargs)

    def to_dict(self) -> dict[str, float]:
        """The latest recorded step as ``{"grad_norm/<name>": ..., "grad_norm/total": ...}``.

        Also ``grad_max_abs/<name>``, ``grad_nonfinite/<name>`` (only when non-zero),
        ``grad_clip_coef``, ``grad_nonfinite``, ``grad_skipped``, ``grad_spike/total``, and
        running tallies ``grad_stats/nonfinite_steps``, ``grad_stats/skipped_steps``,
        ``grad_stats/spikes``. Plain floats for any logger; one sync (a flush).
        """
        hist = self.history()
        out = hist.row_dict(len(hist) - 1) if len(hist) else {}
        out["grad_stats/nonfinite_steps"] = float(self._events.nonfinite_steps)
        out["grad_stats/skipped_steps"] = float(self._events.skipped_steps)
        out["grad_stats/spikes"] = float(self._events.spike_count)
        return out

    def log_jsonl(self, path: str | Path) -> JsonlWriter:
        """Append every flushed step to a JSON-lines file (see :class:`JsonlWriter`)."""
        return self.add_writer(JsonlWriter(path))  # type: ignore[return-value]

    def log_csv(self, path: str | Path) -> CsvWriter:
        """Append every flushed step to a long-format CSV file (see :class:`CsvWriter`)."""
        return self.add_writer(CsvWriter(path))  # type: ignore[return-value]

    def log_tensorboard(self, writer: Any = None, log_dir: str | None = None) -> TensorBoardWriter:
        """Log every flushed step to TensorBoard (needs ``tensorboard``)."""
        return self.add_writer(TensorBoardWriter(writer, log_dir))  # type: ignore[return-value]

    def log_wandb(self, run: Any = None) -> WandbWriter:
        """Log every flushed step to Weights & Biases (needs ``wandb``)."""
        return self.add_writer(WandbWriter(run))  # type: ignore[return-value]

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save the heatmap + total-norm figure of :meth:`history` as a PNG (matplotlib)."""
        from .plot import plot_history

        return plot_history(self.history(), path, title=title)


_ARRAY_FIELDS = (
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

__all__ = [
    "CsvWriter",
    "Diagnosis",
    "GradMonitor",
    "History",
    "JsonlWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "depth_profile",
    "diagnose",
]
