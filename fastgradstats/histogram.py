"""Per-tensor histograms of |g| on power-of-two bins: the torch reference.

The torch implementation of issue 12 (the Triton kernels bin in
:mod:`fastgradstats.kernels.histogram` and in the stats kernel's own read). The bin layout
is in :mod:`fastgradstats.constants`; the precision report built on these histograms is
:mod:`fastgradstats.precision`, the TensorBoard/W&B exports are in
:mod:`fastgradstats.monitor.writers`.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .constants import BIN_OFFSET, HIGH_EXPONENT, LOW_EXPONENT, NUM_BINS

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


def edges_on(device: torch.device) -> Tensor:
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


def check_grads(grads: Sequence[Tensor], arg_name: str) -> list[Tensor]:
    """``grads`` as a list, checked: dense tensors of SUPPORTED_DTYPES on one device."""
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
    grads = check_grads(grads, "grads")
    if not grads:
        return torch.zeros((0, NUM_BINS), dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    ext = _group_codes_cpu(grads) if grads[0].device.type == "cpu" else _group_codes_device(grads)
    zeros = ext[:, _ZERO].clone()
    hist = ext[:, :NUM_BINS].clone()
    hist[:, 0] += zeros
    return hist, zeros


__all__ = [
    "SUPPORTED_DTYPES",
    "bin_lower_exponent",
    "check_grads",
    "edges_on",
    "group_histogram",
    "histogram_edges",
]
