"""Per-tensor histograms of |g| on power-of-two bins, low-precision health, and exports.

The torch reference of issue 12 (the Triton kernel is :mod:`fastgradstats.kernels.histogram`).

Bins
----
``histogram_edges()`` is float64 ``[NUM_BINS + 1]``: ``edges[0] = 0``, then every power of
two from ``2**-133`` through ``2**17``, then ``edges[-1] = inf``, so ``NUM_BINS = 152``:

* bin 0 is ``[0, 2**-133)``: exact zeros, and the (fp32/fp64-only) values below bf16's
  smallest subnormal;
* bin ``i`` in 1..150 is ``[2**(i - 134), 2**(i - 133))``: one octave, i.e. one exponent;
* bin 151 is ``[2**17, inf)``.

Counts are of finite ``|g|``; NaN and ±Inf are in no bin (the stats count them). Exact zeros
(±0) are also counted on their own (``zero_count``, Megatron's ``count_zeros``).

Because every edge is a power of two, the bin of a value is a function of its exponent bits
(plus, for subnormals, the leading mantissa bit). The reference reads the top 16 bits of each
element (sign dropped: 15 bits, 32768 patterns) and maps each pattern to its bin with a
lookup table: for bf16/fp16 the pattern is the whole value; for fp32 it is the exponent and
7 mantissa bits, which fix the bin of every value at or above ``2**-133`` (below that, fp32
subnormals land in bin 0 anyway); fp64 keeps 4 mantissa bits, likewise enough.

Precision report
----------------
:func:`precision_report` turns a histogram into, per tensor, the share of NONZERO finite
values that would flush to zero, become subnormal, or overflow when cast to fp16, bf16,
float8_e4m3fn or float8_e5m2 (round to nearest even, torch's cast), as they are and after a
per-tensor amax scale. See its docstring for the exact semantics at bin resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LOW_EXPONENT = -133  # edges[1] = 2**LOW_EXPONENT: bf16's smallest subnormal
HIGH_EXPONENT = 17  # edges[-2] = 2**HIGH_EXPONENT
NUM_BINS = HIGH_EXPONENT - LOW_EXPONENT + 2  # 152: [0, 2^-133), 150 octaves, [2^17, inf)
BIN_OFFSET = 1 - LOW_EXPONENT  # a value in [2**j, 2**(j+1)) lands in bin j + BIN_OFFSET

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Codes of the lookup table: 0..NUM_BINS-1 a bin, then these two.
_EXCLUDED = NUM_BINS  # NaN / Inf
_ZERO = NUM_BINS + 1  # exact zero (its own column, folded into bin 0 at the end)
_CODES = NUM_BINS + 2
_KEYS = 1 << 15  # top 16 bits without the sign
_CPU_BIG_NUMEL = 1 << 16  # from here a tensor gets its own bincount (below: one shared)
_CPU_CHUNK = 1 << 19  # elements per bincount: a 1 MiB int16 buffer, not numel-sized
_DEVICE_CHUNK = 1 << 24  # elements per step of the (reference) non-CPU path


def histogram_edges(device: torch.device | str | None = None) -> Tensor:
    """Bin edges, float64 ``[NUM_BINS + 1]``: 0, 2^-133, 2^-132, ..., 2^17, inf."""
    powers = torch.ldexp(
        torch.ones(NUM_BINS - 1, dtype=torch.float64),
        torch.arange(LOW_EXPONENT, HIGH_EXPONENT + 1, dtype=torch.int64),
    )
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), powers, torch.tensor([math.inf])])
    return edges if device is None else edges.to(device)


def bin_lower_exponent(index: int) -> int:
    """log2 of the lower edge of bin ``index`` in 1..NUM_BINS-1 (bin 0's lower edge is 0)."""
    if not 1 <= index < NUM_BINS:
        raise ValueError(f"index must be in 1..{NUM_BINS - 1}, got {index}")
    return index - BIN_OFFSET


# --------------------------------------------------------------------------- reference


_lut_cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}
_edges_cache: dict[torch.device, Tensor] = {}


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without a host sync (pinned on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _edges_on(device: torch.device) -> Tensor:
    """:func:`histogram_edges` on ``device``, copied there once (sync-free)."""
    edges = _edges_cache.get(device)
    if edges is None:
        edges = _edges_cache[device] = _to_device(histogram_edges(), device)
    return edges


def _lut(dtype: torch.dtype, device: torch.device) -> Tensor:
    """int64 [32768]: the code of each sign-less top-16-bit pattern of ``dtype``."""
    key = (dtype, device)
    lut = _lut_cache.get(key)
    if lut is None:
        patterns = torch.arange(_KEYS, dtype=torch.int32)
        if dtype in (torch.float16, torch.bfloat16):
            low = patterns.to(torch.int16).view(dtype).to(torch.float64)
        elif dtype == torch.float32:
            low = (patterns << 16).view(torch.float32).to(torch.float64)
        else:
            low = (patterns.to(torch.int64) << 48).view(torch.float64)
        # ``low`` is the smallest value with that pattern; the dropped low bits only move a
        # value within its octave, so the whole pattern shares one bin.
        powers = histogram_edges()[1:-1]
        lut = torch.searchsorted(powers, low, right=True)
        lut[~torch.isfinite(low)] = _EXCLUDED
        if dtype in (torch.float16, torch.bfloat16):
            lut[0] = _ZERO  # the whole value: pattern 0 is exactly ±0
        lut = _to_device(lut, device)
        _lut_cache[key] = lut
    return lut


def _check_grads(grads: Sequence[Tensor], arg_name: str) -> list[Tensor]:
    if isinstance(grads, Tensor):
        grads = [grads]
    out = list(grads)
    for i, g in enumerate(out):
        if not isinstance(g, Tensor):
            raise TypeError(f"{arg_name}[{i}] must be a Tensor, got {type(g).__name__}")
        if g.layout != torch.strided:
            raise TypeError(f"{arg_name}[{i}] has layout {g.layout}; dense tensors only")
        if g.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{arg_name}[{i}] has dtype {g.dtype}; histograms support "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
        if g.device != out[0].device:
            raise ValueError(
                f"{arg_name} must all be on one device: {arg_name}[0] is on {out[0].device}, "
                f"{arg_name}[{i}] on {g.device}"
            )
    return out


def _flat(g: Tensor) -> Tensor:
    return g.detach().reshape(-1)  # a view when dense and contiguous, else one copy


_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keys(flat: Tensor, out: Tensor | None = None) -> Tensor:
    """int16 sign-less top-16-bit pattern of each element of contiguous 1-D ``flat``.

    For 32/64-bit floats: one contiguous shift of the integer view narrowed into int16
    (vectorised), not the stride-2 int16 view (a scalar loop, 1.5-2x slower).
    """
    size = flat.element_size()
    words = flat.view(_WORD[size])
    if out is None:
        out = torch.empty(words.shape, dtype=torch.int16, device=flat.device)
    if size == 2:
        return torch.bitwise_and(words, 0x7FFF, out=out)
    torch.bitwise_right_shift(words, 8 * size - 16, out=out)
    return out.bitwise_and_(0x7FFF)


def _cpu_key_counts(flat: Tensor) -> Tensor:
    """int64 [32768]: how many elements have each key (CPU), in cache-sized chunks."""
    n = flat.numel()
    buf = torch.empty(min(n, _CPU_CHUNK), dtype=torch.int16)
    counts = None
    for start in range(0, n, _CPU_CHUNK):
        stop = min(n, start + _CPU_CHUNK)
        keys = _keys(flat[start:stop], buf[: stop - start])
        part = torch.bincount(keys, minlength=_KEYS)
        counts = part if counts is None else counts.add_(part)
    return counts if counts is not None else torch.zeros(_KEYS, dtype=torch.int64)


def _codes(flat: Tensor) -> Tensor:
    """int64 code of every element of ``flat`` (bin, excluded or zero)."""
    codes = _lut(flat.dtype, flat.device)[_keys(flat).long()]
    if flat.element_size() > 2:  # the top bits cannot tell 0 from a tiny subnormal
        codes = torch.where(flat == 0, _ZERO, codes)
    return codes


def _shared_codes_cpu(grads: list[Tensor]) -> Tensor:
    """int64 [m, _CODES] for same-dtype small CPU tensors: a gather and a bincount per batch.

    Batches of consecutive tensors of about ``_CPU_CHUNK`` elements keep the temporaries
    (int64 codes) in cache: on 10,000 tiny tensors, one 5M-element pass was 3x slower.
    """
    m = len(grads)
    numels = [g.numel() for g in grads]
    out = torch.empty((m, _CODES), dtype=torch.int64)
    start = 0
    while start < m:
        stop, total = start + 1, numels[start]
        while stop < m and total + numels[stop] <= _CPU_CHUNK:
            total += numels[stop]
            stop += 1
        count = stop - start
        values = torch.cat([g.reshape(-1) for g in grads[start:stop]])
        slots = torch.repeat_interleave(
            torch.arange(0, count * _CODES, _CODES, dtype=torch.int64),
            torch.tensor(numels[start:stop], dtype=torch.int64),
            output_size=total,
        )
        codes = _codes(values).add_(slots)
        out[start:stop] = torch.bincount(codes, minlength=count * _CODES).view(count, _CODES)
        start = stop
    return out


def _device_codes(flat: Tensor, out: Tensor) -> None:
    """Add the code counts of ``flat`` into ``out`` [_CODES] (any device, no host sync)."""
    for start in range(0, flat.numel(), _DEVICE_CHUNK):
        codes = _codes(flat[start : start + _DEVICE_CHUNK])
        ones = torch.ones((), dtype=torch.int64, device=flat.device).expand(codes.numel())
        out.scatter_add_(0, codes, ones)  # integer atomics on CUDA: no sync, deterministic


def _group_codes_device(grads: list[Tensor]) -> Tensor:
    """int64 [n, _CODES] on any device without reading a value back (the CUDA reference)."""
    ext = torch.zeros((len(grads), _CODES), dtype=torch.int64, device=grads[0].device)
    for i, g in enumerate(grads):
        _device_codes(_flat(g), ext[i])
    return ext


def _group_codes_cpu(grads: list[Tensor]) -> Tensor:
    n = len(grads)
    ext = torch.zeros((n, _CODES), dtype=torch.int64)
    small: dict[torch.dtype, list[int]] = {}
    wide_big: list[int] = []  # fp32/fp64 tensors whose zeros are still in code 0
    for i, g in enumerate(grads):
        if g.numel() < _CPU_BIG_NUMEL:
            small.setdefault(g.dtype, []).append(i)
            continue
        counts = _cpu_key_counts(_flat(g))
        ext[i].index_add_(0, _lut(g.dtype, g.device), counts)
        if g.element_size() > 2:
            wide_big.append(i)
    for indices in small.values():
        ext[indices] = _shared_codes_cpu([grads[i] for i in indices])
    if wide_big:
        # Reading a CPU tensor is free: count exact zeros only where code 0 is not empty
        # (zeros and subnormals below 2^-133 share the top-16-bit pattern 0).
        suspects = [i for i, c in zip(wide_big, ext[wide_big, 0].tolist()) if c > 0]
        for i in suspects:
            zeros = grads[i].numel() - torch.count_nonzero(grads[i]).item()
            ext[i, 0] -= zeros
            ext[i, _ZERO] = zeros
    return ext


@torch.no_grad()
def group_histogram(grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor histogram of finite ``|g|`` on :func:`histogram_edges`, and zero counts.

    Args:
        grads: tensors on one device, each fp32, bf16, fp16 or fp64 (dtypes may be mixed),
            any shape and layout (non-contiguous ones are copied once).

    Returns:
        ``(histogram, zero_count)``: int64 ``[n, NUM_BINS]`` counts of finite ``|g|`` in
        ``[edges[i], edges[i+1])`` and int64 ``[n]`` exact zeros (also counted in bin 0), on
        the tensors' device. NaN and ±Inf are in no bin. No host sync: on the CPU the only
        value read is a CPU tensor; elsewhere nothing is read.
    """
    grads = _check_grads(grads, "grads")
    if not grads:
        return torch.zeros((0, NUM_BINS), dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    ext = _group_codes_cpu(grads) if grads[0].device.type == "cpu" else _group_codes_device(grads)
    zeros = ext[:, _ZERO].clone()
    hist = ext[:, :NUM_BINS].clone()
    hist[:, 0] += zeros
    return hist, zeros


# --------------------------------------------------------------------- precision report


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


def _below(cum: Tensor, lower: Tensor, threshold: Tensor) -> Tensor:
    return _count_lower_below(cum, lower, threshold)


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
    if not isinstance(histogram, Tensor) or histogram.dim() != 2:
        raise ValueError("histogram must be a 2-D [n, NUM_BINS] tensor")
    if histogram.shape[1] != NUM_BINS:
        raise ValueError(f"histogram must have {NUM_BINS} bins, got {histogram.shape[1]}")
    n, device = histogram.shape[0], histogram.device
    if not isinstance(zero_count, Tensor) or zero_count.shape != (n,):
        raise ValueError(f"zero_count must be a tensor of shape [{n}]")
    if numel is not None and len(numel) != n:
        raise ValueError(f"numel must have {n} entries, got {len(numel)}")
    for arg, value in (("max_abs", max_abs), ("overflow_count", overflow_count)):
        if value is not None and (not isinstance(value, Tensor) or value.shape != (n,)):
            raise ValueError(f"{arg} must be a tensor of shape [{n}]")
    if not isinstance(margin, int):
        raise TypeError(f"margin must be an int, got {type(margin).__name__}")
    f64 = torch.float64
    hist = histogram.to(f64)
    zeros = zero_count.to(device, f64)
    cum = torch.cat([torch.zeros((n, 1), dtype=f64, device=device), hist.cumsum(1)], dim=1)
    total = cum[:, -1]
    nonzero = total - zeros
    denom = torch.where(nonzero > 0, nonzero, torch.ones_like(nonzero))
    edges = _edges_on(device)
    lower, upper = edges[:-1].contiguous(), edges[1:].contiguous()

    # amax: exact from max_abs when given and finite, else the highest bin's upper edge.
    bins = torch.arange(NUM_BINS, device=device)
    nonzero_hist = torch.cat([hist[:, :1] - zeros[:, None], hist[:, 1:]], dim=1)
    occupied = nonzero_hist > 0  # bins holding nonzero finite values
    top = torch.where(occupied, bins, -1).amax(1)
    amax = torch.where(top >= 0, upper[top.clamp(min=0)], torch.zeros_like(total))
    if max_abs is not None:
        given = max_abs.to(device, f64)
        amax = torch.where(torch.isfinite(given) & (given > 0), given, amax)
    has_values = nonzero > 0
    ratio = fmt.max / torch.where(has_values, amax, torch.ones_like(amax))
    _, exponent = torch.frexp(ratio)  # ratio = m * 2**e, m in [0.5, 1): floor(log2) = e - 1
    k = (exponent.to(f64) - 1).where(torch.isfinite(ratio) & (ratio > 0), math.nan)
    k = torch.where(has_values, k - margin, torch.zeros_like(k))

    def shares(scale_log2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Thresholds on the unscaled values: t * 2**-k, exact (ldexp).
        factor = torch.ldexp(torch.ones_like(scale_log2), -scale_log2.to(torch.int64))
        flush_t = fmt.flush_threshold * factor
        normal_t = math.ldexp(1.0, fmt.min_normal_exponent) * factor
        over_t = fmt.overflow_threshold * factor
        flush = _below(cum, lower, flush_t) - zeros
        below_normal = _below(cum, lower, normal_t) - zeros
        # Values >= t sit in bins with lower edge >= t (lower bound) or upper edge > t.
        over_lo = total - _count_lower_below(cum, lower, over_t)
        over_hi = total - _count_lower_below(cum, upper, over_t, strict=False)
        return flush, below_normal - flush, over_lo, over_hi

    flush, sub, over_lo, over_hi = shares(torch.zeros_like(total))
    if max_abs is not None:
        given = max_abs.to(device, f64)
        clear = torch.isfinite(given) & (
            given < fmt.overflow_threshold
            if fmt.overflow_inclusive
            else given <= fmt.overflow_threshold
        )
        over_lo = torch.where(clear, 0.0, over_lo)
        over_hi = torch.where(clear, 0.0, over_hi)
    if overflow_count is not None:
        over_lo = over_hi = overflow_count.to(device, f64)
    s_flush, s_sub, s_over, _ = shares(torch.nan_to_num(k, nan=0.0))
    unknown = torch.isnan(k)

    # Smallest k that lifts the smallest nonzero value to a normal. Bin 0's nonzero values
    # are taken as 2**-149 (fp32's smallest subnormal; fp64 gradients may hold smaller).
    low_occupied = torch.where(occupied, bins, NUM_BINS)
    first = low_occupied.amin(1)
    first_exp = torch.where(first == 0, -149.0, (first - BIN_OFFSET).to(f64))
    keep = torch.where(
        has_values & (first < NUM_BINS), fmt.min_normal_exponent - first_exp, math.nan
    )

    def frac(count: Tensor) -> Tensor:
        return count / denom

    def scaled(count: Tensor) -> Tensor:
        return torch.where(unknown, math.nan, frac(count))

    return PrecisionReport(
        format=fmt,
        nonzero=nonzero.to(torch.int64),
        flush_to_zero=frac(flush),
        subnormal=frac(sub),
        overflow=frac(over_lo),
        overflow_upper=frac(over_hi),
        scale_exponent=k,
        scaled_flush_to_zero=scaled(s_flush),
        scaled_subnormal=scaled(s_sub),
        scaled_overflow=scaled(s_over),
        keep_exponent=keep,
    )


@torch.no_grad()
def exact_overflow_count(grads: Sequence[Tensor], dtype: torch.dtype | str) -> Tensor:
    """int64 [n]: values a cast to ``dtype`` overflows (an extra read; no host sync)."""
    fmt = float_format(dtype)
    grads = _check_grads(grads, "grads")
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


# ----------------------------------------------------------------------------- exports


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


__all__ = [
    "BIN_OFFSET",
    "FORMATS",
    "HIGH_EXPONENT",
    "LOW_EXPONENT",
    "NUM_BINS",
    "SUPPORTED_DTYPES",
    "FloatFormat",
    "PrecisionReport",
    "bin_lower_exponent",
    "display_edges",
    "exact_overflow_count",
    "float_format",
    "group_histogram",
    "histogram_edges",
    "precision_lines",
    "precision_report",
    "tensorboard_histogram_kwargs",
    "wandb_np_histogram",
]
