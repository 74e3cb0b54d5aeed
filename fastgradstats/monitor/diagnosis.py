"""Diagnosis of a recorded history: vanishing / exploding across depth or time, NaN/Inf."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .events import Events
from .history import TINY, History, nonfinite_json

NO_GRADIENT_STEPS = 5  # this many latest recorded steps without any gradient: "no_gradients"


@dataclass
class Diagnosis:
    """What the recorded history says, in numbers and in words.

    Attributes:
        verdict: ``"exploding"`` (gradients grow across depth or over time, or overflow
            to Inf; a high but steady level is not growth), ``"vanishing"``
            (earliest layers get far smaller gradients than the latest), ``"nonfinite"``
            (NaN without signs of explosion), ``"no_gradients"`` (no monitored parameter had
            a gradient in any recorded step, or in the latest ``NO_GRADIENT_STEPS``),
            ``"clipped"`` (most steps clipped with a raw total norm typically >= 10x
            ``max_norm``, but no growth: not an explosion), ``"no_data"`` (no recorded step
            yet: no verdict), or ``"healthy"``.
        contained: exploding (growth over time or across depth), but clipping on at least
            half of the steps kept every step finite.
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
                return nonfinite_json(value)
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
        logs = np.where(np.isnan(rms), np.nan, np.log10(np.maximum(rms, TINY)))
        med = np.nanmedian(logs, axis=0)
    keep = [i for i in range(len(cols)) if np.isfinite(med[i])]
    return [history.names[cols[i]] for i in keep], med[keep]


def _profile_shape(profile: np.ndarray) -> tuple[float, float]:
    """(slope in decades per layer, log10 of earliest-quarter over latest-quarter RMS)."""
    slope = float(np.polyfit(np.arange(len(profile), dtype=np.float64), profile, 1)[0])
    quarter = max(1, len(profile) // 4)
    return slope, float(profile[:quarter].mean() - profile[-quarter:].mean())


@dataclass
class _DepthShape:
    """The depth profile a diagnosis judges: per-layer log10 RMS and its fitted shape."""

    names: list[str]
    profile: np.ndarray
    slope: float | None = None  # decades per layer (None: fewer than two layers)
    log_ratio: float | None = None  # log10 of earliest-quarter over latest-quarter RMS
    label: str = ""  # which window of the history, for the sentence

    @property
    def ratio(self) -> float | None:
        return None if self.log_ratio is None else float(10.0**self.log_ratio)


def _steepest_depth_profile(history: History) -> _DepthShape:
    """The depth profile of the whole history, its oldest fifth or its latest fifth,
    whichever is the most extreme (by more than half a decade over the earlier ones).

    The depth profile can change a lot during training (a deep sigmoid net that has
    collapsed to predicting the mean has tiny gradients everywhere), so no one window
    tells it all.
    """
    count = len(history)
    fifth = max(1, count // 5)
    windows = {
        "": slice(None),
        " in the oldest recorded steps": slice(0, fifth),
        " in the latest recorded steps": slice(count - fifth, count),
    }
    best = None
    for label, rows in windows.items():
        names, profile = depth_profile(history, rows)
        if len(profile) >= 2:
            slope, log_ratio = _profile_shape(profile)
            if best is None or abs(log_ratio) > abs(best.log_ratio) + 0.5:
                best = _DepthShape(names, profile, slope, log_ratio, label)
    return best if best is not None else _DepthShape(*depth_profile(history))


def _depth_findings(depth: _DepthShape, decades: float) -> list[str]:
    if depth.log_ratio is None or depth.slope is None or depth.ratio is None:
        return []
    ratio, slope, names = depth.ratio, depth.slope, depth.names
    where = f"from {names[0]} (first) to {names[-1]} (last){depth.label}"
    if depth.log_ratio <= -decades:
        return [
            f"VANISHING across depth: the earliest layers get {1 / ratio:.3g}x smaller "
            f"gradients than the latest ({slope:.2f} decades lost per layer going "
            f"backward, {where}). The first layers barely learn: use ReLU/GELU instead "
            "of sigmoid/tanh, residual connections, normalization layers, or a "
            "variance-preserving init (Kaiming/Xavier)."
        ]
    if depth.log_ratio >= decades:
        return [
            f"EXPLODING across depth: the earliest layers get {ratio:.3g}x larger "
            f"gradients than the latest ({-slope:.2f} decades gained per layer going "
            f"backward, {where}). "
            "Each layer amplifies the backward signal: reduce the init scale, add "
            "normalization, lower the learning rate, and clip the gradient norm."
        ]
    return [
        f"Depth profile balanced: earliest/latest layer gradient RMS ratio "
        f"{ratio:.3g} ({slope:+.2f} decades per layer)."
    ]


def _time_growth(finite_total: np.ndarray, events: Events) -> float | None:
    """Late over early total norm: medians of the first and last tenth of the finite
    steps (a sustained rise, not one spike: spikes are reported on their own), or the
    largest finite norm over the early median once the run blew up."""
    if len(finite_total) < 2:
        return None
    tenth = max(1, len(finite_total) // 10)
    base = float(np.median(finite_total[:tenth]))
    late = float(np.median(finite_total[-tenth:]))
    if events.nonfinite_steps:  # the run blew up: its largest finite norm tells
        late = float(finite_total.max())
    return late / base if base > 0 else None


def _growth_findings(growth: float | None, events: Events, finite_total: np.ndarray) -> list[str]:
    """Sentences on growth over time (``growth``: None when it is below the threshold)
    and on overflow to Inf."""
    findings = []
    if growth is not None:
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
    return findings


def _clipping_level(
    history: History, events: Events, finite_total: np.ndarray, clip_share: float, growing: bool
) -> tuple[bool, bool, list[str]]:
    """``(contained, far_above, findings)`` from the raw total norm's level against
    ``max_norm``.

    Exploding needs growth (over the run or across depth) or an overflow. A level far
    above max_norm is not growth: a run held at 93 -> 183 -> 133 -> 92 (140x max_norm)
    is clipped every step, not exploding, and says so in its own verdict.
    """
    max_norm = history.max_norm
    if max_norm is None or not max_norm > 0 or not len(finite_total):
        return False, False, []
    typical = float(np.median(finite_total))
    far_above = typical >= 10.0 * max_norm and clip_share >= 0.5
    if growing and clip_share >= 0.5 and not events.nonfinite_steps:
        return (
            True,
            far_above,
            [
                f"Contained by clipping: the raw total norm is typically {typical:.3g} "
                f"({typical / max_norm:.3g}x max_norm) and no NaN/Inf appeared; "
                "without clipping these updates would blow up. The scale is still wrong: "
                "check the init and the learning rate."
            ],
        )
    if far_above:
        return (
            False,
            True,
            [
                f"CLIPPED on {clip_share:.0%} of steps: the raw total norm is typically "
                f"{typical:.3g} ({typical / max_norm:.3g}x max_norm) but did not "
                "grow over the run, so this is not an explosion; every update is scaled "
                "down to max_norm. If that is not intended, raise max_norm or check the "
                "init scale, the loss scale and the learning rate."
            ],
        )
    return False, False, []


def _nonfinite_findings(events: Events) -> list[str]:
    if events.first_nonfinite_step is None:
        return []
    ordered = sorted(events.first_nonfinite.items(), key=lambda kv: kv[1][0])
    listed = ", ".join(f"{n} (step {s})" for n, (s, _, _) in ordered[:5])
    more = f" and {len(ordered) - 5} more" if len(ordered) > 5 else ""
    first = events.first_nonfinite_step
    overflow_first = not ordered or ordered[0][1][0] > first
    how = " (the total norm overflowed first)" if overflow_first and ordered else ""
    return [
        f"NaN/Inf gradients on {events.nonfinite_steps} step(s), first at step "
        f"{first}{how}: {listed or 'total norm overflowed'}{more}."
    ]


def _count_findings(history: History, events: Events, clip_share: float) -> list[str]:
    """Sentences on skipped updates, clipping and spikes: counts, no judgement."""
    findings = []
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
    elif events.clipped_steps:  # an adaptive clipper (ZClip, AutoClip) decided
        findings.append(
            f"Adaptive clipping scaled the gradients on {events.clipped_steps} of "
            f"{events.recorded} steps ({clip_share:.0%})."
        )
    if events.spikes:
        total_spikes = [s for s in events.spikes if s[1] == "total"]
        shown = ", ".join(f"step {s} ({v:.3g})" for s, _, v in total_spikes[:5])
        findings.append(
            f"{events.spike_count} gradient-norm spike(s) flagged "
            f"({len(total_spikes)} on the total norm{': ' + shown if shown else ''})."
        )
    return findings


def _has_no_gradients(events: Events) -> bool:
    return events.recorded > 0 and (
        events.empty_steps == events.recorded or events.trailing_empty_steps >= NO_GRADIENT_STEPS
    )


def _no_gradients_finding(events: Events) -> str:
    where = (
        f"any of the {events.recorded} recorded steps"
        if events.empty_steps == events.recorded
        else f"the latest {events.trailing_empty_steps} recorded steps"
    )
    return (
        f"NO GRADIENTS: no monitored parameter had a gradient in {where}, so nothing "
        "was measured or clipped. Call step() after backward() and before zero_grad(); "
        "if the model was reloaded or the monitor unpickled apart from it, call "
        "monitor.attach(model); DeepSpeed ZeRO keeps gradients outside .grad."
    )


# The first finding of these verdicts (the others lead with what they found).
_VERDICT_LEADS = {
    # Nothing measured yet: no verdict, above all not "healthy".
    "no_data": (
        "NO DATA: no step has been recorded yet, so there is nothing to judge. Call "
        "monitor.step() after backward() and before optimizer.step()."
    ),
    "healthy": "No NaN/Inf, no runaway growth, no vanishing profile.",
}


def _verdict(
    events: Events, exploding: bool, vanishing: bool, no_gradients: bool, far_above: bool
) -> str:
    """The one word: the first that applies, in order of severity."""
    if not events.recorded:
        return "no_data"
    if exploding:
        return "exploding"
    if vanishing:
        return "vanishing"
    if events.nonfinite_steps:
        return "nonfinite"
    if no_gradients:
        return "no_gradients"
    if far_above:
        return "clipped"
    return "healthy"


def diagnose(
    history: History,
    *,
    events: Events | None = None,
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
        events = Events()
        events.add(history, spike_cap=1000)
    depth = _steepest_depth_profile(history)
    ratio = depth.ratio
    finite_total = history.total_norm[np.isfinite(history.total_norm)]
    growth = _time_growth(finite_total, events)
    grew = growth is not None and growth >= 10**growth_decades
    clip_share = events.clipped_steps / events.recorded if events.recorded else 0.0
    deep_exploding = ratio is not None and math.log10(ratio) >= decades
    contained, far_above, clip_findings = _clipping_level(
        history, events, finite_total, clip_share, grew or deep_exploding
    )
    no_gradients = _has_no_gradients(events)
    verdict = _verdict(
        events,
        exploding=deep_exploding or grew or bool(events.overflow_steps) or contained,
        vanishing=ratio is not None and math.log10(ratio) <= -decades,
        no_gradients=no_gradients,
        far_above=far_above,
    )
    findings = [
        *([_VERDICT_LEADS[verdict]] if verdict in _VERDICT_LEADS else []),
        *([_no_gradients_finding(events)] if no_gradients else []),
        *_nonfinite_findings(events),
        *_depth_findings(depth, decades),
        *_growth_findings(growth if grew else None, events, finite_total),
        *clip_findings,
        *_count_findings(history, events, clip_share),
    ]
    return Diagnosis(
        verdict=verdict,
        contained=contained,
        findings=findings,
        steps=events.recorded,
        depth_slope=depth.slope,
        depth_ratio=ratio,
        profile_names=depth.names,
        profile_log10_rms=[float(v) for v in depth.profile],
        time_growth=growth,
        first_nonfinite=dict(events.first_nonfinite),
        first_nonfinite_step=events.first_nonfinite_step,
        nonfinite_steps=events.nonfinite_steps,
        skipped_steps=events.skipped_steps,
        clipped_steps=events.clipped_steps,
        spikes=list(events.spikes),
        max_norm=history.max_norm,
    )


__all__ = ["Diagnosis", "depth_profile", "diagnose"]
