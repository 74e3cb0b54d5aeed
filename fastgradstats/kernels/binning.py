"""Bit-pattern binning of |g| for the histogram kernels (see :mod:`.histogram` for the bins).

A module of its own so that both ``stats_kernel`` (the fused histogram) and the standalone
``histogram_kernel`` use it without importing each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import NUM_BINS

HIST_BINS = 256  # tl.histogram's bin count must be a power of two >= NUM_BINS
FINITE_LIMIT = 0x7F800000  # sign-less float32 patterns below this are finite


def binning_config(dtype: torch.dtype) -> dict:
    """The binning constexprs of the kernels that bin (stats with HISTOGRAM, histogram)."""
    return {
        # fp16 values upcast to fp32 are never fp32 subnormals: 3 integer ops fewer
        "SUBNORMALS": dtype != torch.float16,
        "NUM_BINS": NUM_BINS,
        "HIST_BINS": HIST_BINS,
    }


@triton.jit
def abs_bits(x):
    """Sign-less int32 bit pattern of float32 ``x`` (``u < FINITE_LIMIT``: finite)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def abs_bits_of(x, DTYPE: tl.constexpr):
    """Sign-less float32 bit pattern of ``x`` as loaded (fp32, bf16 or fp16).

    bf16 is widened in integers (it is the top half of an fp32): exact everywhere, where the
    CPU interpreter's float conversion flushes bf16 subnormals (Triton 3.9).
    """
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a constexpr argument)
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16) & 0x7FFFFFFF
    else:
        return abs_bits(x.to(tl.float32))


@triton.jit
def bin_index(u, SUBNORMALS: tl.constexpr, LAST_BIN: tl.constexpr):
    """Histogram bin (int32, 0..LAST_BIN) of the float32 whose sign-less pattern is ``u``.

    Non-finite patterns map to LAST_BIN: callers mask them (``u < FINITE_LIMIT``).
    ``SUBNORMALS=False`` is exact only when no input is an fp32 subnormal (fp16 upcasts).
    """
    e = u >> 23
    if SUBNORMALS:
        # e == 0: u itself is the subnormal's integer significand; float(u) is exact and
        # its exponent field is floor(log2 u) + 127, so the bin is that minus 142.
        lead = (u.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 142
        b = tl.where(e == 0, tl.maximum(lead, 0), e + 7)
    else:
        b = tl.where(e == 0, 0, e + 7)  # a normal 2**(e - 127) is in bin e + 7
    return tl.minimum(b, LAST_BIN)


@triton.jit
def bin_tile(u, hist, DTYPE: tl.constexpr, SUBNORMALS: tl.constexpr, NUM_BINS: tl.constexpr,
             HIST_BINS: tl.constexpr):  # fmt: skip
    """``hist`` plus one tile's sign-less float32 patterns ``u``, in HIST_BINS slots.

    No mask (a masked histogram branches around every shared-memory atomic): non-finite
    patterns go to the spare slot HIST_BINS - 1. fp32 exact zeros go to the spare slot
    HIST_BINS - 2, because fp32 subnormals below 2**-133 share bin 0 with them; for bf16
    and fp16 bin 0 holds exact zeros only, so no per-element zero count is needed at all.
    :func:`flush_histogram` folds the slots back.
    """
    b = bin_index(u, SUBNORMALS, NUM_BINS - 1)
    b = tl.where(u < 0x7F800000, b, HIST_BINS - 1)  # finite (FINITE_LIMIT) or spare
    if DTYPE == tl.float32:  # noqa: SIM300 (DTYPE is a constexpr argument)
        b = tl.where(u == 0, HIST_BINS - 2, b)
    return hist + tl.histogram(b, HIST_BINS)


@triton.jit
def flush_histogram(hist, hist_ptr, zeros_ptr, t, DTYPE: tl.constexpr, NUM_BINS: tl.constexpr,
                    HIST_BINS: tl.constexpr):  # fmt: skip
    """Add a block's :func:`bin_tile` slots to tensor ``t``'s int64 bins and zero count.

    Integer atomics: the sums do not depend on the order programs run in (deterministic).
    Only the occupied bins are added: a block of real gradients touches ~10-30 of 152.
    """
    index = tl.arange(0, HIST_BINS)
    if DTYPE == tl.float32:  # noqa: SIM300
        zeros = tl.sum(tl.where(index == HIST_BINS - 2, hist, 0), axis=0)
        hist = tl.where(index == 0, hist + zeros, hist)  # zeros are in bin 0 too
    else:
        zeros = tl.sum(tl.where(index == 0, hist, 0), axis=0)
    tl.atomic_add(
        hist_ptr + t * NUM_BINS + index,
        hist.to(tl.int64),
        mask=(index < NUM_BINS) & (hist > 0),
        sem="relaxed",
    )
    zeros = zeros.to(tl.int64)
    tl.atomic_add(zeros_ptr + t, zeros, mask=zeros > 0, sem="relaxed")


__all__ = [
    "FINITE_LIMIT",
    "HIST_BINS",
    "abs_bits",
    "abs_bits_of",
    "bin_index",
    "bin_tile",
    "binning_config",
    "flush_histogram",
]
