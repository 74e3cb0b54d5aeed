"""Per-tensor |g| histograms on power-of-two bins: bit-pattern binning and one launch per group.

The bins are those of :mod:`fastgradstats.constants` (``NUM_BINS = 152``): bin 0 is
``[0, 2**-133)``, bin ``j + 134`` is ``[2**j, 2**(j+1))`` for ``-133 <= j < 17``, bin 151 is
``[2**17, inf)``. For a float32 ``x`` with sign-less bit pattern ``u``:

* normal (exponent field ``e = u >> 23`` in 1..254): ``|x|`` is in ``[2**(e-127),
  2**(e-126))``, so the bin is ``e + 7`` (clamped to 151);
* subnormal (``e == 0``): ``|x| = u * 2**-149``, so the bin is ``floor(log2 u) - 15``
  (0 when negative: ``u < 2**16`` means ``|x| < 2**-133``). ``floor(log2 u)`` is read off the
  exponent field of ``float(u)``, exact because ``u < 2**23``: no count-leading-zeros needed,
  and no float arithmetic on subnormals, so a flush-to-zero mode cannot change a bin.

:func:`bin_index` is that mapping in integer ops (and, shift, convert, shift, add, max,
select, min: 8 ops; 5 when ``SUBNORMALS`` is off, for fp16 inputs, whose upcast values are
never fp32 subnormals). The standalone :func:`histogram_kernel` runs on the tables of
:mod:`~fastgradstats.kernels.tables` like ``stats_kernel``: one launch per segment, one
program per block (located by the shared ``block_location``), looping over it ``TILE``
elements at a time with a register histogram, then adding the block's counts to the
int64 ``[n, NUM_BINS]`` output with integer atomics: sums of integers do not depend on the
order the programs run in, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernels as settings
from ..constants import NUM_BINS
from . import launch
from .binning import abs_bits_of, bin_tile, binning_config, flush_histogram
from .stats import block_location, wide
from .tables import TensorTable


@triton.jit
def histogram_kernel(
    table_ptr,  # int64 table (see tables.py for its layout)
    counts_ptr,  # int64 [n_tensors, NUM_BINS] out, zero-initialised: finite |g| per bin
    zeros_ptr,  # int64 [n_tensors] out, zero-initialised: exact zeros
    n_tensors,  # tensors in the table
    block_lo,  # the segment's first block
    DTYPE: tl.constexpr,  # element type of the segment's gradients
    BLOCK: tl.constexpr,  # elements per block (the table's block size)
    TILE: tl.constexpr,  # elements per loop step
    ALIGNED: tl.constexpr,  # every data_ptr of the segment is 16-byte aligned
    SUBNORMALS: tl.constexpr,  # inputs can be fp32 subnormals (fp32, bf16); False for fp16
    NUM_BINS: tl.constexpr,  # 152
    HIST_BINS: tl.constexpr,  # power of two >= NUM_BINS (tl.histogram's size)
):
    n_tensors = wide(n_tensors)
    b = wide(block_lo) + tl.program_id(0).to(tl.int64)
    # The same block location as stats_kernel (alignment hint on the typed pointer).
    base, count = block_location(table_ptr, b, n_tensors, DTYPE, BLOCK, ALIGNED)
    t = tl.load(table_ptr + 5 * n_tensors + b)
    lanes = tl.arange(0, TILE)
    hist = tl.zeros([HIST_BINS], dtype=tl.int32)  # a block holds <= 2**24 elements
    full = count // TILE
    for i in range(full):  # the steady state: unmasked, contiguous, aligned -> 128-bit loads
        u = abs_bits_of(tl.load(base + i * TILE + lanes), DTYPE)
        hist = bin_tile(u, hist, DTYPE, SUBNORMALS, NUM_BINS, HIST_BINS)
    rest = count - full * TILE
    if rest > 0:  # past the end reads NaN: in no bin and not a zero
        x = tl.load(base + full * TILE + lanes, mask=lanes < rest, other=float("nan"))
        hist = bin_tile(abs_bits_of(x, DTYPE), hist, DTYPE, SUBNORMALS, NUM_BINS, HIST_BINS)
    flush_histogram(hist, counts_ptr, zeros_ptr, t, DTYPE, NUM_BINS, HIST_BINS)


def histogram_config(dtype: torch.dtype, block: int, aligned: bool) -> dict:
    """The constexprs and ``num_warps`` :func:`histogram_kernel` is launched with (also what
    ``benchmarks codegen`` compiles). Shared by every caller: read it, never modify it."""
    return settings.launch_config(
        ("histogram", dtype, block, aligned),
        lambda: {**settings.base_config(dtype, block, aligned), **binning_config(dtype)},
    )


def group_histogram_triton(table: TensorTable) -> tuple[Tensor, Tensor]:
    """Per-tensor histogram and zero counts of the tensors described by ``table`` (no sync).

    Returns ``(counts, zeros)``: int64 ``[n, NUM_BINS]`` and int64 ``[n]`` on the table's
    device, as :func:`fastgradstats.histogram.group_histogram` defines them. One launch per
    segment of the table (plus the two zero fills); none when every tensor is empty.
    """
    n, device = table.n_tensors, table.device
    counts = torch.zeros((n, NUM_BINS), dtype=torch.int64, device=device)
    zeros = torch.zeros(n, dtype=torch.int64, device=device)
    for seg in table.segments:
        launch(
            histogram_kernel,
            (seg.num_blocks,),
            table.data,
            counts,
            zeros,
            n,
            seg.lo,
            **histogram_config(seg.dtype, table.block, seg.aligned),
        )
    return counts, zeros


__all__ = [
    "group_histogram_triton",
    "histogram_config",
    "histogram_kernel",
]
