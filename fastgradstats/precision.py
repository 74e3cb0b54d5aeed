"""Low-precision health of gradients, read off their power-of-two histograms.

:func:`precision_report` turns a histogram (:func:`fastgradstats.histogram.group_histogram`,
or the kernels' from ``grad_stats(..., histogram=True)``) into, per tensor, the share of
NONZERO finite values that would flush to zero, become subnormal, or overflow when cast to
fp16, bf16, float8_e4m3fn or float8_e5m2 (round to nearest even, torch's cast), as they
are and after a per-tensor amax scale. See its docstring for the exact semantics at bin
resolution. :func:`precision_lines` says the same in plain words (``GradMonitor.report``).

Used by ``GradStats.precision_report`` and the monitor, so it sits beside the histograms,
below both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .constants import BIN_OFFSET, NUM_BINS
from .histogram import check_grads, edges_on


@dataclass(frozen=True)
class FloatFormat:
    """The facts of a target dtype that the precision report needs (derived from finfo)."""

    name: str  # short name used in keys and sentences: "fp16", "bf16", "fp8_e4m3fn", ...
    dtype: torch.dtype
    max: float  # largest finite value
    min_normal_exponent: int  # smallest normal = 2**min_normal_exponent
    min_subnormal_exponent: int  # smallest subnormal = 2**min_subnormal_exponent
    overflow_threshold: float  # max + half an ulp: where round-to-nearest leaves the range
    overflow_inclusive: bool  # the tie itself overflows (max's last mantissa bit is odd)

    @property
    def flush_threshold(self) -> float:
        """Half the smallest subnormal: nonzero |x| below it rounds to zero."""
        return math.ldexp(1.0, self.min_subnormal_exponent - 1)


def _format(name: str, dtype: torch.dtype) -> FloatFormat:
    info = torch.finfo(dtype)
    mantissa_bits = -round(math.log2(info.eps))
    min_normal = round(math.log2(info.smallest_normal))
    top = math.floor(math.log2(info.max))
    half_ulp = math.ldexp(1.0, top - mantissa_bits - 1)
    last_bit = int(info.max / math.ldexp(1.0, top - mantissa_bits)) & 1
    return FloatFormat(
        name=name,
        dtype=dtype,
        max=float(info.max),
        min_normal_exponent=min_normal,
        min_subnormal_exponent=min_normal - mantissa_bits,
        overflow_threshold=float(info.max) + half_ulp,
        overflow_inclusive=bool(last_bit),
    )


FORMATS: dict[torch.dtype, FloatFormat] = {
    torch.float16: _format("fp16", torch.float16),
    torch.bfloat16: _format("bf16", torch.bfloat16),
    torch.float8_e4m3fn: _format("fp8_e4m3fn", torch.float8_e4m3fn),
    torch.float8_e5m2: _format("fp8_e5m2", torch.float8_e5m2),
}
_FORMAT_NAMES = {fmt.name: fmt for fmt in FORMATS.values()}
_FORMAT_NAMES.update({"float16": FORMATS[torch.float16], "bfloat16": FORMATS[torch.bfloat16]})
_FORMAT_NAMES.update({"e4m3": FORMATS[torch.float8_e4m3fn], "e5m2": FORMATS[torch.float8_e5m2]})


def float_format(dtype: torch.dtype | str) -> FloatFormat:
    """The :class:`FloatFormat` of ``dtype`` (a torch dtype, or "fp16", "bf16", "e4m3", ...)."""
    fmt = FORMATS.get(dtype) if isinstance(dtype, torch.dtype) else _FORMAT_NAMES.get(dtype)
    if fmt is None:
        raise ValueError(
            f"dtype must be one of {', '.join(str(d) for d in FORMATS)} (or "
            f"{', '.join(repr(k) for k in _FORMAT_NAMES)}), got {dtype!r}"
        )
    return fmt


@dataclass
class PrecisionReport:
    """Per-tensor low-precision health of one histogram for one target dtype.

    Every fraction is float64 ``[n]`` on the histogram's device, a share of the tensor's
    NONZERO finite values (0.0 when it has none). ``flush_to_zero + subnormal`` is the
    share below the smallest normal. ``scaled_*`` are the same after multiplying the tensor
    by ``2**scale_exponent`` (see :func:`precision_report`).
    """

    format: FloatFormat
    nonzero: Tensor  # int64 [n]: nonzero finite values (the denominator)
    flush_to_zero: Tensor
    subnormal: Tensor
    overflow: Tensor  # lower bound (exact when overflow_count was given)
    overflow_upper: Tensor  # upper bound; equal to ``overflow`` where the bins decide
    scale_exponent: Tensor  # float64 [n]: k of the amax scale 2**k (NaN: amax unknown)
    scaled_flush_to_zero: Tensor
    scaled_subnormal: Tensor
    scaled_overflow: Tensor
    keep_exponent: Tensor  # float64 [n]: smallest k lifting every value to a normal

    FIELDS = (
        "flush_to_zero",
        "subnormal",
        "overflow",
        "overflow_upper",
        "scale_exponent",
        "scaled_flush_to_zero",
        "scaled_subnormal",
        "scaled_overflow",
    )

    def to_dict(self, names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """``{name: {"<fmt>_<field>": float}}`` for every field in ``FIELDS`` (one sync)."""
        n = self.nonzero.numel()
        names = [str(i) for i in range(n)] if names is None else list(names)
        if len(names) != n:
            raise ValueError(f"names has {len(names)} entries for {n} tensors")
        rows = torch.stack([getattr(self, f).to(torch.float64) for f in self.FIELDS]).T.tolist()
        prefix = self.format.name
        return {
            name: {f"{prefix}_{f}": v for f, v in zip(self.FIELDS, row)}
            for name, row in zip(names, rows)
        }


def _count_lower_below(
    cum: Tensor, lower_edges: Tensor, threshold: Tensor, strict: bool = True
) -> Tensor:
    """Per tensor, the count in bins whose lower edge is < threshold (<= when not strict).

    ``cum`` is [n, B + 1] with a leading zero column; ``threshold`` is float64 [n].
    """
    index = torch.searchsorted(lower_edges, threshold.contiguous(), right=not strict)
    return cum.gather(1, index.unsqueeze(1)).squeeze(1)


@dataclass(frozen=True)
class _Binned:
    """A histogram in the report's float64 terms, one row per tensor."""

    cum: Tensor  # [n, B + 1]: cumulative counts after a leading zero column
    total: Tensor  # [n] finite values, zeros included
    zeros: Tensor  # [n] exact zeros (they are in bin 0)
    nonzero: Tensor  # [n] nonzero finite values: the denominator of every share
    occupied: Tensor  # bool [n, B]: bins holding nonzero finite values
    index: Tensor  # int64 [B]: 0..B-1
    lower: Tensor  # float64 [B]: lower edges
    upper: Tensor  # float64 [B]: upper edges

    @classmethod
    def of(cls, histogram: Tensor, zero_count: Tensor) -> _Binned:
        n, device, f64 = histogram.shape[0], histogram.device, torch.float64
        hist = histogram.to(f64)
        zeros = zero_count.to(device, f64)
        cum = torch.cat([torch.zeros((n, 1), dtype=f64, device=device), hist.cumsum(1)], dim=1)
        total = cum[:, -1]
        edges = edges_on(device)
        nonzero_hist = torch.cat([hist[:, :1] - zeros[:, None], hist[:, 1:]], dim=1)
        return cls(
            cum=cum,
            total=total,
            zeros=zeros,
            nonzero=total - zeros,
            occupied=nonzero_hist > 0,
            index=torch.arange(NUM_BINS, device=device),
            lower=edges[:-1].contiguous(),
            upper=edges[1:].contiguous(),
        )

    def share(self, count: Tensor) -> Tensor:
        """``count`` as a share of the nonzero finite values (0 where there are none)."""
        return count / torch.where(self.nonzero > 0, self.nonzero, torch.ones_like(self.nonzero))

    def cast_counts(
        self, fmt: FloatFormat, scale_log2: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per tensor, after a scale by ``2**scale_log2``: the values that flush to zero,
        that are subnormal, and that overflow (lower and upper bound)."""
        # Thresholds on the unscaled values: t * 2**-k, exact (ldexp).
        factor = torch.ldexp(torch.ones_like(scale_log2), -scale_log2.to(torch.int64))
        flush_t = fmt.flush_threshold * factor
        normal_t = math.ldexp(1.0, fmt.min_normal_exponent) * factor
        over_t = fmt.overflow_threshold * factor
        flush = _count_lower_below(self.cum, self.lower, flush_t) - self.zeros
        below_normal = _count_lower_below(self.cum, self.lower, normal_t) - self.zeros
        # Values >= t sit in bins with lower edge >= t (lower bound) or upper edge > t.
        over_lo = self.total - _count_lower_below(self.cum, self.lower, over_t)
        over_hi = self.total - _count_lower_below(self.cum, self.upper, over_t, strict=False)
        return flush, below_normal - flush, over_lo, over_hi


def _check_report_args(
    histogram: Any, zero_count: Any, numel: Any, max_abs: Any, overflow_count: Any, margin: Any
) -> None:
    """Raise naming the argument of :func:`precision_report` that has the wrong shape or type."""
    if not isinstance(histogram, Tensor) or histogram.dim() != 2:
        raise ValueError("histogram must be a 2-D [n, NUM_BINS] tensor")
    if histogram.shape[1] != NUM_BINS:
        raise ValueError(f"histogram must have {NUM_BINS} bins, got {histogram.shape[1]}")
    n = histogram.shape[0]
    if not isinstance(zero_count, Tensor) or zero_count.shape != (n,):
        raise ValueError(f"zero_count must be a tensor of shape [{n}]")
    if numel is not None and len(numel) != n:
        raise ValueError(f"numel must have {n} entries, got {len(numel)}")
    for arg, value in (("max_abs", max_abs), ("overflow_count", overflow_count)):
        if value is not None and (not isinstance(value, Tensor) or value.shape != (n,)):
            raise ValueError(f"{arg} must be a tensor of shape [{n}]")
    if not isinstance(margin, int):
        raise TypeError(f"margin must be an int, got {type(margin).__name__}")


def _scale_exponent(
    binned: _Binned, fmt: FloatFormat, max_abs: Tensor | None, margin: int
) -> Tensor:
    """float64 [n]: ``k = floor(log2(fmt.max / amax)) - margin`` (NaN: amax unknown; 0 for
    a tensor without nonzero finite values). ``amax``: ``max_abs`` when given and finite,
    else the upper edge of the highest occupied bin."""
    device, f64 = binned.total.device, torch.float64
    top = torch.where(binned.occupied, binned.index, -1).amax(1)
    amax = torch.where(top >= 0, binned.upper[top.clamp(min=0)], torch.zeros_like(binned.total))
    if max_abs is not None:
        given = max_abs.to(device, f64)
        amax = torch.where(torch.isfinite(given) & (given > 0), given, amax)
    has_values = binned.nonzero > 0
    ratio = fmt.max / torch.where(has_values, amax, torch.ones_like(amax))
    _, exponent = torch.frexp(ratio)  # ratio = m * 2**e, m in [0.5, 1): floor(log2) = e - 1
    k = (exponent.to(f64) - 1).where(torch.isfinite(ratio) & (ratio > 0), math.nan)
    return torch.where(has_values, k - margin, torch.zeros_like(k))


def _settle_overflow(
    fmt: FloatFormat,
    over_lo: Tensor,
    over_hi: Tensor,
    max_abs: Tensor | None,
    overflow_count: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The overflow bounds with what is known exactly: none where ``max_abs`` is below the
    threshold, and ``overflow_count`` itself when given."""
    device = over_lo.device
    if max_abs is not None:
        given = max_abs.to(device, torch.float64)
        clear = torch.isfinite(given) & (
            given < fmt.overflow_threshold
            if fmt.overflow_inclusive
            else given <= fmt.overflow_threshold
        )
        over_lo = torch.where(clear, 0.0, over_lo)
        over_hi = torch.where(clear, 0.0, over_hi)
    if overflow_count is not None:
        over_lo = over_hi = overflow_count.to(device, torch.float64)
    return over_lo, over_hi


def _keep_exponent(binned: _Binned, fmt: FloatFormat) -> Tensor:
    """float64 [n]: the smallest k that lifts the smallest nonzero value to a normal (NaN:
    no nonzero finite value). Bin 0's nonzero values are taken as 2**-149 (fp32's smallest
    subnormal; fp64 gradients may hold smaller)."""
    first = torch.where(binned.occupied, binned.index, NUM_BINS).amin(1)
    first_exp = torch.where(first == 0, -149.0, (first - BIN_OFFSET).to(torch.float64))
    has_values = binned.nonzero > 0
    return torch.where(
        has_values & (first < NUM_BINS), fmt.min_normal_exponent - first_exp, math.nan
    )


def precision_report(
    histogram: Tensor,
    zero_count: Tensor,
    numel: Any = None,
    dtype: torch.dtype | str = torch.float16,
    *,
    max_abs: Tensor | None = None,
    overflow_count: Tensor | None = None,
    margin: int = 0,
) -> PrecisionReport:
    """Which share of each tensor's nonzero finite values a cast to ``dtype`` would hurt.

    Args:
        histogram: int64 ``[n, NUM_BINS]`` from :func:`group_histogram` (or the kernel).
        zero_count: int64 ``[n]``, the exact zeros (they are in bin 0 and are taken out).
        numel: unused by the fractions (their denominator is the nonzero finite count);
            accepted so the call mirrors ``GradStats`` and checked to have ``n`` entries.
        dtype: torch.float16, torch.bfloat16, torch.float8_e4m3fn or torch.float8_e5m2.
        max_abs: optional float ``[n]`` max |g| (e.g. ``GradStats.max_abs``); non-finite
            entries are ignored. Gives the exact amax, and settles the overflow bin.
        overflow_count: optional int ``[n]`` exact count of values at/over the overflow
            threshold (``|g| >= t``, or ``> t`` for e4m3fn); makes ``overflow`` exact.
        margin: as Transformer Engine's: the scale is divided by ``2**margin``.

    Semantics, exact at bin resolution wherever the threshold is a bin edge:

    * flush_to_zero: ``0 < |x| < 2**(s - 1)``, ``2**s`` the smallest subnormal: what round
      to nearest even sends to 0. The tie ``|x| == 2**(s - 1)`` also rounds to 0 but shares
      its bin with values that do not, and is counted as kept.
    * subnormal: ``2**(s - 1) <= |x| < 2**e``, ``2**e`` the smallest normal (input value:
      values a hair below ``2**e`` that round up to it still count).
    * overflow: ``|x| >= t`` (``> t`` for e4m3fn, whose tie rounds down to 448), ``t`` the
      largest finite value plus half an ulp (fp16: 65520): the cast gives ±Inf, or for
      e4m3fn (no Inf) torch saturates to ±448. ``t`` is no power of two, so the
      bin holding it is ambiguous: ``overflow`` leaves it out (lower bound),
      ``overflow_upper`` counts it, and both are 0 where ``max_abs < t``.
    * A threshold inside bin 0 (below ``2**-133``: bf16's flush threshold, scaled
      thresholds) counts bin 0's nonzero values as below it ("lower-edge rule"); the last
      bin [2**17, inf) is likewise treated by its lower edge.
    * Scaled: ``scale = 2**k`` with ``k = floor(log2(dtype_max / amax)) - margin``, i.e.
      the fp8 recipes' ``dtype_max / amax`` rounded down to a power of two (torchao's
      ``round_scales_to_power_of_2``), which keeps the report exact at bin resolution.
      ``amax`` is ``max_abs`` when given and finite, else the upper edge of the highest
      nonempty bin (an upper bound, so the scaled tensor cannot overflow); when that bin is
      the last one the amax is unknown and the scaled fields are NaN. A tensor without
      nonzero finite values gets ``k = 0`` (Transformer Engine's scale of 1).
    """
    fmt = float_format(dtype)
    _check_report_args(histogram, zero_count, numel, max_abs, overflow_count, margin)
    binned = _Binned.of(histogram, zero_count)
    k = _scale_exponent(binned, fmt, max_abs, margin)
    flush, sub, over_lo, over_hi = binned.cast_counts(fmt, torch.zeros_like(binned.total))
    over_lo, over_hi = _settle_overflow(fmt, over_lo, over_hi, max_abs, overflow_count)
    s_flush, s_sub, s_over, _ = binned.cast_counts(fmt, torch.nan_to_num(k, nan=0.0))
    unknown = torch.isnan(k)
    return PrecisionReport(
        format=fmt,
        nonzero=binned.nonzero.to(torch.int64),
        flush_to_zero=binned.share(flush),
        subnormal=binned.share(sub),
        overflow=binned.share(over_lo),
        overflow_upper=binned.share(over_hi),
        scale_exponent=k,
        scaled_flush_to_zero=torch.where(unknown, math.nan, binned.share(s_flush)),
        scaled_subnormal=torch.where(unknown, math.nan, binned.share(s_sub)),
        scaled_overflow=torch.where(unknown, math.nan, binned.share(s_over)),
        keep_exponent=_keep_exponent(binned, fmt),
    )


@torch.no_grad()
def exact_overflow_count(grads: Sequence[Tensor], dtype: torch.dtype | str) -> Tensor:
    """int64 [n]: values a cast to ``dtype`` overflows (an extra read; no host sync)."""
    fmt = float_format(dtype)
    grads = check_grads(grads, "grads")
    if not grads:
        return torch.zeros(0, dtype=torch.int64)
    t = fmt.overflow_threshold
    counts = []
    for g in grads:
        a = g.detach().abs()
        hit = (a >= t) if fmt.overflow_inclusive else (a > t)
        counts.append((hit & torch.isfinite(a)).sum())
    return torch.stack(counts)


def _percent(fraction: float) -> str:
    value = 100.0 * fraction
    if value >= 9.95:
        return f"{value:.0f}%"
    if value >= 0.995:
        return f"{value:.1f}%"
    return f"{value:.2g}%"


def precision_lines(
    report: PrecisionReport, names: Sequence[str] | None = None, min_fraction: float = 0.01
) -> list[str]:
    """Plain-words findings of ``report`` (one host sync), worst first.

    E.g. "41% of `layers.3.mlp.w2` gradients fall below fp16's smallest normal (12% flush
    to zero); a loss scale of 2^9 would keep them". Shares below ``min_fraction`` are left
    out, except a definite overflow (``report.overflow > 0``), which is always reported.
    """
    n = report.nonzero.numel()
    names = [str(i) for i in range(n)] if names is None else list(names)
    if len(names) != n:
        raise ValueError(f"names has {len(names)} entries for {n} tensors")
    fmt = report.format
    fields = [
        report.flush_to_zero,
        report.subnormal,
        report.overflow,
        report.overflow_upper,
        report.keep_exponent,
        report.scale_exponent,
        report.scaled_flush_to_zero,
        report.scaled_subnormal,
    ]
    rows = torch.stack([f.to(torch.float64) for f in fields]).T.tolist()
    scale_word = "a loss scale" if fmt.name in ("fp16", "bf16") else "a per-tensor scale"
    found: list[tuple[float, str]] = []
    for name, (flush, sub, over, over_hi, keep, safe, s_flush, s_sub) in zip(names, rows):
        below = flush + sub
        if below >= min_fraction:
            line = (
                f"{_percent(below)} of `{name}` gradients fall below {fmt.name}'s smallest normal"
            )
            if flush >= min_fraction:
                line += f" ({_percent(flush)} flush to zero)"
            if not math.isnan(keep) and (math.isnan(safe) or keep <= safe):
                line += f"; {scale_word} of 2^{int(keep)} would keep them"
            elif not math.isnan(safe):
                line += (
                    f"; no scale keeps them all without overflow: 2^{int(safe)}, the largest "
                    f"safe one, leaves {_percent(s_flush + s_sub)} below"
                )
            found.append((below, line))
        if over_hi >= min_fraction or over > 0:
            share = _percent(over) if over == over_hi else f"{_percent(over)}-{_percent(over_hi)}"
            sign = ">=" if fmt.overflow_inclusive else ">"
            line = (
                f"{share} of `{name}` gradients overflow {fmt.name} "
                f"(|g| {sign} {fmt.overflow_threshold:g})"
            )
            if not math.isnan(safe) and safe < 0:
                line += f"; a scale of 2^{int(safe)} would fit them"
            found.append((over_hi, line))
    found.sort(key=lambda item: -item[0])
    return [line for _, line in found]


__all__ = [
    "FORMATS",
    "FloatFormat",
    "PrecisionReport",
    "exact_overflow_count",
    "float_format",
    "precision_lines",
    "precision_report",
]
