"""Fused per-tensor gradient statistics: one read of every element, one launch per segment.

Two stages, deterministic (fixed reduction order, no float atomics in any result):

1. :func:`stats_kernel`, grid ``(blocks of the segment,)``: each program owns one block of
   ``BLOCK`` elements of one tensor and loops over it ``TILE`` elements at a time (two
   16-byte loads per thread), accumulating in registers: the p-partial (sum g^2, sum |g|
   or max |g|) and, for full statistics, max |g| (NaN-propagating). The block's reductions
   happen once, after the loop (16-bit: one sum and one max per 16-byte vector, so that
   few registers are live; see ``_accumulate``). NaN/Inf are counted only in a block whose
   max |g| is not finite (a second read of that block alone): the steady-state loop does 2
   floating point operations per element. With the ``HISTOGRAM`` constexpr (``grad_stats(...,
   histogram=True)``) the same loop also bins each tile's raw bits (:mod:`.binning`) and
   counts exact zeros; each block then adds its counts to the per-tensor int64 outputs with
   integer atomics (order-independent, so deterministic). With it off, the code of every
   other variant is unchanged (``benchmarks codegen`` checks the budgets).
2. :func:`finalize_kernel`, grid ``(n_tensors,)``: each program reduces its tensor's
   partials in block order and writes the per-tensor p-norm, max |g|, NaN/Inf counts. With
   ``FINISH`` the last program to finish (an int32 ticket counter, reset by that program)
   also computes the total norm and the clip coefficient, rounded the way
   ``torch.nn.utils`` rounds them, so no torch op runs between the launches.

Partials are a float32 ``[4, num_blocks]`` workspace: p-partial, max |g|, #NaN, #Inf
(counts are exact in float32: a block holds <= 2**24 elements).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernels as settings
from ..constants import CLIP_EPS
from . import tile_size, triton_dtype
from .binning import abs_bits_of, bin_tile, binning_config, flush_histogram
from .tables import TensorTable

N_PARTIALS = 4  # p-partial, max |g|, NaN count, Inf count
NORM_CODES = {1.0: 1, 2.0: 2, float("inf"): 0}  # the NORM constexpr
FINISH_NONE, FINISH_TOTAL, FINISH_CLIP = 0, 1, 2
_CLIP_EPS = tl.constexpr(CLIP_EPS)  # a jit function reads only constexpr globals


@triton.jit
def max_nan(a, b):
    """max that propagates NaN (one FMNMX.NAN on sm_80+)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def abs_max(x, axis):
    """max |x| along ``axis`` of a float32 tensor, NaN if any element is NaN.

    Reduced as int32 bits with the sign cleared (the clear is the abs): a NaN's bits then
    order above +inf and every finite value, so a built-in integer max propagates it. A
    ``tl.reduce`` with a NaN-propagating combine function would give the same on a GPU, but
    the Triton interpreter runs a custom combine once per element in Python: about 40x
    slower than this whole kernel on a 10 kB model, and CI runs every kernel that way.
    """
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(bits, axis=axis).to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in ``DTYPE``.

    bfloat16 is rounded with integer ops: the Triton interpreter truncates fp32 -> bf16 casts,
    which would make CPU tests disagree with torch (and with the GPU) by one ulp.
    """
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a constexpr, not a constant)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def round_trip(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to ``DTYPE`` and back to float32 (what a torch op in DTYPE keeps)."""
    if DTYPE == tl.float32:  # noqa: SIM300
        return x
    else:
        return round_to(x, DTYPE).to(tl.float32)


@triton.jit
def wide(x):
    """``x`` as int64. Integer arguments arrive as int32 (Triton passes an int that fits
    in 32 bits as i32), and ``5 * n_tensors`` or ``3 * num_blocks`` would then be computed
    in 32 bits and wrap before any widening: with BLOCK = 16 (the least ``block_size()``
    allows) ``3 * num_blocks`` passes 2**31 at 11.5e9 elements. Every kernel widens its
    count arguments first."""
    return tl.cast(x, tl.int64)


@triton.jit
def block_location(table_ptr, b, n_tensors, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGNED: tl.constexpr):  # fmt: skip
    """Block ``b``: (typed pointer to its first element, elements in it (1..BLOCK)).

    The alignment hint goes on the pointer after the int -> pointer cast (on the int64
    address the compiler loses it); the block start is a multiple of BLOCK elements, so
    with ALIGNED every TILE step starts on a 16-byte boundary.
    """
    n_tensors = wide(n_tensors)
    t = tl.load(table_ptr + 5 * n_tensors + b)
    base = tl.load(table_ptr + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    numel = tl.load(table_ptr + n_tensors + t)
    start = (b - tl.load(table_ptr + 2 * n_tensors + t)) * BLOCK  # int64: no overflow
    return base + start, tl.minimum(numel - start, BLOCK)


@triton.jit
def _accumulate(x, acc, big, NORM: tl.constexpr, STATS: tl.constexpr, VEC: tl.constexpr,
                FOLD: tl.constexpr):  # fmt: skip
    """Add one float32 tile ``x`` [TILE] to the loop-carried accumulators.

    Registers decide how many warps an SM keeps resident, hence how many bytes of loads it
    has in flight (``benchmarks codegen`` reports both). A 16-bit tile's two 16-byte loads
    per thread hold 16 elements: per-element float32 accumulators took 32 registers, 2 per
    loaded register (55 in all: 32 warps, 32 KiB in flight per SM on sm_90). So, 16-bit
    (``VEC`` = 8 elements, one 16-byte load; ``FOLD``):

    * ``big`` holds one max |g| per vector ([TILE // VEC]): the thread reduces its vector in
      its own registers first. Exact: max does not depend on order (NaN propagates).
    * ``acc`` (with ``FOLD``) holds one sum per vector: each vector is summed (a pairwise
      tree) before it is added, a float32 summation order of its own.

    float32 keeps ``VEC`` = 1 and per-element sums: its code is unchanged (4 elements per
    load; it already has 80 KiB in flight, and folding costs instructions).
    """
    rows = tl.reshape(x, [x.shape[0] // VEC, VEC])  # a thread's vector is one row
    if NORM == 2:
        if FOLD:
            acc += tl.sum(rows * rows, axis=1)
        else:
            acc += x * x
    elif NORM == 1:
        if FOLD:
            acc += tl.sum(tl.abs(rows), axis=1)
        else:
            acc += tl.abs(x)
    if STATS or NORM == 0:
        big = max_nan(big, abs_max(rows, 1))
    return acc, big


@triton.jit
def stats_kernel(
    table_ptr,  # int64 table (see tables.py for its layout)
    partials_ptr,  # float32 [4, num_blocks] out: p-partial, max |g|, #NaN, #Inf
    n_tensors,  # tensors in the table
    num_blocks,  # blocks in the table: the partials' row stride
    block_lo,  # the segment's first block
    hist_ptr,  # int64 [n_tensors, NUM_BINS] out, zero-initialised (HISTOGRAM only)
    zeros_ptr,  # int64 [n_tensors] out, zero-initialised: exact zeros (HISTOGRAM only)
    DTYPE: tl.constexpr,  # element type of the segment's gradients
    BLOCK: tl.constexpr,  # elements per block (the table's block size)
    TILE: tl.constexpr,  # elements per loop step
    ALIGNED: tl.constexpr,  # every data_ptr of the segment is 16-byte aligned
    NORM: tl.constexpr,  # 2: sum g^2, 1: sum |g|, 0: max |g|
    STATS: tl.constexpr,  # also max |g| and the NaN/Inf counts
    HISTOGRAM: tl.constexpr,  # also bin every finite |g| and count exact zeros
    SUBNORMALS: tl.constexpr,  # inputs can be fp32 subnormals (fp32, bf16); False for fp16
    NUM_BINS: tl.constexpr,  # histogram bins (fastgradstats.histogram.NUM_BINS)
    HIST_BINS: tl.constexpr,  # power of two >= NUM_BINS (tl.histogram's size)
    VEC: tl.constexpr,  # elements per 16-byte load (capped at TILE): one max |g| per vector
    FOLD: tl.constexpr,  # sum each vector before accumulating (see _accumulate)
):
    n_tensors = wide(n_tensors)
    num_blocks = wide(num_blocks)
    b = wide(block_lo) + tl.program_id(0).to(tl.int64)
    base, count = block_location(table_ptr, b, n_tensors, DTYPE, BLOCK, ALIGNED)
    lanes = tl.arange(0, TILE)
    acc = tl.zeros([TILE // VEC if FOLD else TILE], dtype=tl.float32)
    big = tl.zeros([TILE // VEC], dtype=tl.float32)
    if HISTOGRAM:  # compile-time: the other variants do not see these lines
        hist = tl.zeros([HIST_BINS], dtype=tl.int32)  # a block holds <= 2**24 elements
    full = count // TILE
    for i in range(full):  # the steady state: unmasked, contiguous, aligned -> 128-bit loads
        raw = tl.load(base + i * TILE + lanes)
        acc, big = _accumulate(raw.to(tl.float32), acc, big, NORM, STATS, VEC, FOLD)
        if HISTOGRAM:  # bits of the raw load: exact for bf16 subnormals (see binning)
            hist = bin_tile(abs_bits_of(raw, DTYPE), hist, DTYPE, SUBNORMALS, NUM_BINS,
                            HIST_BINS)  # fmt: skip
    rest = count - full * TILE
    if rest > 0:
        raw = tl.load(base + full * TILE + lanes, mask=lanes < rest, other=0.0)
        acc, big = _accumulate(raw.to(tl.float32), acc, big, NORM, STATS, VEC, FOLD)
        if HISTOGRAM:  # lanes past the end read 0.0: make them non-finite (no bin, no zero)
            u = tl.where(lanes < rest, abs_bits_of(raw, DTYPE), 0x7F800000)
            hist = bin_tile(u, hist, DTYPE, SUBNORMALS, NUM_BINS, HIST_BINS)
    if HISTOGRAM:
        t = tl.load(table_ptr + 5 * n_tensors + b)
        flush_histogram(hist, hist_ptr, zeros_ptr, t, DTYPE, NUM_BINS, HIST_BINS)
    out = partials_ptr + b
    if NORM == 0:
        tl.store(out, abs_max(big, 0))
    else:
        tl.store(out, tl.sum(acc, axis=0))
    if STATS:
        block_max = abs_max(big, 0)
        tl.store(out + num_blocks, block_max)
        if (block_max != block_max) | (block_max == float("inf")):
            # Rare: this block holds a NaN or an Inf. Read it again and count them.
            # Reduced per step into scalars: few live registers, so no spills here either.
            nans = tl.sum(tl.zeros([TILE], dtype=tl.int32), axis=0)
            infs = nans
            for j in range(tl.cdiv(count, TILE)):
                offsets = j * TILE + lanes
                y = tl.load(base + offsets, mask=offsets < count, other=0.0).to(tl.float32)
                nans += tl.sum((y != y).to(tl.int32), axis=0)
                infs += tl.sum((tl.abs(y) == float("inf")).to(tl.int32), axis=0)
            tl.store(out + 2 * num_blocks, nans.to(tl.float32))
            tl.store(out + 3 * num_blocks, infs.to(tl.float32))
        else:
            tl.store(out + 2 * num_blocks, 0.0)
            tl.store(out + 3 * num_blocks, 0.0)


@triton.jit
def _norm_of(acc, NORM: tl.constexpr):
    """The p-norm from per-lane partials ([CHUNK] sums, or maxima for the inf-norm)."""
    if NORM == 0:
        return abs_max(acc, 0)
    elif NORM == 2:
        return tl.sqrt_rn(tl.sum(acc, axis=0))
    else:
        return tl.sum(acc, axis=0)


@triton.jit
def _add_norm(acc, v, NORM: tl.constexpr):
    """Fold per-tensor norms ``v`` into the total's per-lane partials."""
    if NORM == 0:
        return max_nan(acc, v)
    elif NORM == 2:
        return acc + v * v
    else:
        return acc + v


@triton.jit
def finalize_kernel(
    table_ptr,  # int64 table (block_start, block_end, kinds are read)
    partials_ptr,  # float32 [4, num_blocks] from stats_kernel
    floats_ptr,  # float32 [2, n_tensors] out: p-norm, max |g| (max |g| only with STATS)
    counts_ptr,  # int64 [2, n_tensors] out: NaN count, Inf count (only with STATS)
    total_ptr,  # 0-d RESULT out: the total norm rounded as torch rounds it (FINISH)
    exact_total_ptr,  # float32 out: the total norm of the float32 per-tensor norms (FINISH)
    coef_ptr,  # float32 out: the clip coefficient (FINISH == 2)
    ticket_ptr,  # int32, 0 between calls: counts finished programs (FINISH)
    n_tensors,  # tensors in the table: the grid size
    num_blocks,  # row stride of the partials
    max_norm,  # float32 (FINISH == 2)
    NORM: tl.constexpr,  # 2, 1 or 0 (the inf-norm)
    STATS: tl.constexpr,  # max |g| and counts are wanted
    FINISH: tl.constexpr,  # 0: per-tensor only; 1: + total; 2: + total and clip coefficient
    RESULT: tl.constexpr,  # dtype of the returned total (the promoted gradient dtype)
    CHUNK: tl.constexpr,  # partials (and, for the total, tensors) per loop step
):
    n_tensors = wide(n_tensors)
    num_blocks = wide(num_blocks)
    t = tl.program_id(0).to(tl.int64)
    lo = tl.load(table_ptr + 2 * n_tensors + t)
    hi = tl.load(table_ptr + 3 * n_tensors + t)
    lanes = tl.arange(0, CHUNK).to(tl.int64)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    big = tl.zeros([CHUNK], dtype=tl.float32)
    nan_count = tl.zeros([CHUNK], dtype=tl.int64)
    inf_count = tl.zeros([CHUNK], dtype=tl.int64)
    for start in range(lo, hi, CHUNK):
        index = start + lanes
        mask = index < hi
        row = partials_ptr + index
        part = tl.load(row, mask=mask, other=0.0)
        if NORM == 0:
            acc = max_nan(acc, part)
        else:
            acc += part
        if STATS:
            big = max_nan(big, tl.load(row + num_blocks, mask=mask, other=0.0))
            nan_count += tl.load(row + 2 * num_blocks, mask=mask, other=0.0).to(tl.int64)
            inf_count += tl.load(row + 3 * num_blocks, mask=mask, other=0.0).to(tl.int64)
    tl.store(floats_ptr + t, _norm_of(acc, NORM))
    if STATS:
        tl.store(floats_ptr + n_tensors + t, abs_max(big, 0))
        tl.store(counts_ptr + t, tl.sum(nan_count, axis=0))
        tl.store(counts_ptr + n_tensors + t, tl.sum(inf_count, axis=0))
    if FINISH > 0:
        # The last program to get here reduces every tensor's norm, in tensor order
        # (deterministic). Barrier + acq_rel atomic: every program's stores above are
        # visible to whichever program draws the last ticket.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == n_tensors - 1:
            exact = tl.zeros([CHUNK], dtype=tl.float32)
            torchlike = tl.zeros([CHUNK], dtype=tl.float32)
            for first in range(0, n_tensors, CHUNK):
                index = first + lanes
                mask = index < n_tensors
                # .cg: read from L2, where the other programs' stores are
                norm = tl.load(floats_ptr + index, mask=mask, other=0.0, cache_modifier=".cg")
                kind = tl.load(table_ptr + 4 * n_tensors + index, mask=mask, other=0)
                # torch.nn.utils rounds each per-tensor norm to its gradient's dtype, then
                # stacks them in the promoted dtype
                rounded = tl.where(
                    kind == 1,
                    round_trip(norm, tl.bfloat16),
                    tl.where(kind == 2, round_trip(norm, tl.float16), norm),
                )
                rounded = round_trip(rounded, RESULT)
                exact = _add_norm(exact, norm, NORM)
                torchlike = _add_norm(torchlike, rounded, NORM)
            total = round_trip(_norm_of(torchlike, NORM), RESULT)
            tl.store(exact_total_ptr, _norm_of(exact, NORM))
            tl.store(total_ptr, round_to(total, RESULT))
            if FINISH == 2:
                # clamp(max_norm / (total + eps), max=1) with torch's roundings: the add,
                # the reciprocal (x / y is y.reciprocal() * x) and the product are each
                # rounded to RESULT; the division is IEEE (div.rn), as torch's.
                shifted = round_trip(total + _CLIP_EPS, RESULT)
                inverse = round_trip(tl.div_rn(1.0, shifted), RESULT)
                coef = round_trip(inverse * max_norm, RESULT)
                tl.store(coef_ptr, tl.where(coef > 1.0, 1.0, coef))  # NaN stays NaN
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")  # ready for next call


def stats_config(
    dtype: torch.dtype,
    block: int,
    aligned: bool,
    norm_type: float,
    stats: bool,
    histogram: bool = False,
) -> dict:
    """The constexprs and ``num_warps`` :func:`stats_kernel` is launched with (also what
    ``benchmarks codegen`` compiles). Shared by every caller: read it, never modify it."""
    return settings.launch_config(
        ("stats", dtype, block, aligned, norm_type, stats, histogram),
        lambda: {
            **settings.base_config(dtype, block, aligned),
            "NORM": NORM_CODES[float(norm_type)],
            "STATS": stats,
            "HISTOGRAM": histogram,
            **binning_config(dtype),
            **_accumulator_config(dtype, tile_size(dtype, block)),
        },
    )


def _accumulator_config(dtype: torch.dtype, tile: int) -> dict:
    """VEC and FOLD of :func:`stats_kernel` (see ``_accumulate``): 16-bit dtypes fold."""
    if dtype.itemsize != 2:
        return {"VEC": 1, "FOLD": False}  # fp32: per-element accumulators, as before
    return {"VEC": min(settings.VECTOR_BYTES // 2, tile), "FOLD": True}


def finalize_config(norm_type: float, stats: bool, finish: int, result: torch.dtype) -> dict:
    """The constexprs :func:`finalize_kernel` is launched with (default ``num_warps``).
    Shared by every caller: read it, never modify it."""
    return settings.launch_config(
        ("finalize", norm_type, stats, finish, result),
        lambda: {
            "NORM": NORM_CODES[float(norm_type)],
            "STATS": stats,
            "FINISH": finish,
            "RESULT": triton_dtype(result),
            "CHUNK": settings.FINALIZE_CHUNK,
        },
    )


def launch_stats(*args: Any, **kwargs: Any) -> None:
    """One :func:`stats_kernel` launch per segment of ``table``, into ``partials``: the
    launches :func:`stats_launches` lists for the same arguments, made at once."""
    replay_stats(stats_launches(*args, **kwargs))


def stats_launches(
    table: TensorTable,
    partials: Tensor,
    norm_type: float,
    stats: bool,
    histogram: tuple[Tensor, Tensor] | None = None,
    row_stride: int | None = None,
) -> list[tuple[tuple[int], tuple, dict]]:
    """The ``(grid, args, config)`` of each :func:`stats_kernel` launch, one per segment
    of ``table``, into ``partials`` (:func:`launch_stats` makes them at once). A caller
    that launches the same table into the same buffer again and again
    (``fastgradstats.backward``, once per bucket per backward) keeps this list and replays
    it with :func:`replay_stats`: a launch then builds no argument tuple and looks up no
    config.

    ``histogram``: zero-filled int64 ``([n, NUM_BINS], [n])`` tensors that the same read
    also adds each tensor's bin counts and exact zeros to.

    ``row_stride``: the partials' row stride when ``partials`` is a column slice of a
    wider buffer (block ``b`` of the table lands in column ``b`` of the slice; default
    ``partials.shape[1]``). ``fastgradstats.backward`` measures each bucket into its own
    columns of one model-wide buffer this way, with the kernel unchanged.
    """
    # Off: any int64 tensor stands in (never read), so the launched signature is the one
    # ``benchmarks codegen`` compiles (``*i64`` for both).
    hist, zeros = histogram if histogram is not None else (table.data, table.data)
    stride = partials.shape[1] if row_stride is None else row_stride
    return [
        (
            (seg.num_blocks,),
            (table.data, partials, table.n_tensors, stride, seg.lo, hist, zeros),
            stats_config(
                seg.dtype, table.block, seg.aligned, norm_type, stats, histogram is not None
            ),
        )
        for seg in table.segments
    ]


def replay_stats(launches: list[tuple[tuple[int], tuple, dict]]) -> None:
    """Make the launches :func:`stats_launches` listed, in order."""
    for grid, args, config in launches:
        settings.launch(stats_kernel, grid, *args, **config)


def launch_finalize(
    table: TensorTable,
    partials: Tensor,
    floats: Tensor,
    counts: Tensor,
    norm_type: float,
    stats: bool,
    finish: int = FINISH_NONE,
    total: Tensor | None = None,
    exact_total: Tensor | None = None,
    coef: Tensor | None = None,
    ticket: Tensor | None = None,
    max_norm: float = 0.0,
) -> None:
    """The :func:`finalize_kernel` launch (grid: one program per tensor)."""
    launch = finalize_args(table, partials, floats, counts, total, exact_total, coef, ticket)
    result = total.dtype if total is not None else torch.float32
    replay_finalize(launch, max_norm, finalize_config(norm_type, stats, finish, result))


def finalize_args(
    table: TensorTable,
    partials: Tensor,
    floats: Tensor,
    counts: Tensor,
    total: Tensor | None = None,
    exact_total: Tensor | None = None,
    coef: Tensor | None = None,
    ticket: Tensor | None = None,
) -> tuple[tuple[int], tuple]:
    """The grid and the positional arguments but ``max_norm`` of a :func:`finalize_kernel`
    launch (see :func:`launch_finalize`): a caller that finalizes into the same outputs
    again makes them once and launches with :func:`replay_finalize`."""
    return (table.n_tensors,), (
        table.data,
        partials,
        floats,
        counts,
        total if total is not None else floats,
        exact_total if exact_total is not None else floats,
        coef if coef is not None else floats,
        ticket if ticket is not None else counts,
        table.n_tensors,
        partials.shape[1],
    )


def replay_finalize(launch: tuple[tuple[int], tuple], max_norm: float, config: dict) -> None:
    """The :func:`finalize_kernel` launch of :func:`finalize_args`' grid and arguments,
    with ``config`` from :func:`finalize_config`."""
    grid, args = launch
    settings.launch(finalize_kernel, grid, *args, float(max_norm), **config)


def group_stats(table: TensorTable, norm_type: float) -> tuple[Tensor, Tensor]:
    """Per-tensor stats of the tensors described by ``table`` (no host sync).

    Returns ``(floats, counts)``: float32 [2, n] (p-norm, max |g|) and int64 [2, n]
    (NaN count, Inf count) on the table's device. One launch per segment, then finalize.
    """
    n, device = table.n_tensors, table.device
    floats = torch.empty((2, n), dtype=torch.float32, device=device)
    counts = torch.empty((2, n), dtype=torch.int64, device=device)
    partials = torch.empty((N_PARTIALS, max(table.num_blocks, 1)), dtype=torch.float32,
                           device=device)  # fmt: skip
    launch_stats(table, partials, norm_type, True)  # no segment when every tensor is empty
    launch_finalize(table, partials, floats, counts, norm_type, True)
    return floats, counts


__all__ = [
    "FINISH_CLIP",
    "FINISH_NONE",
    "FINISH_TOTAL",
    "NORM_CODES",
    "block_location",
    "finalize_args",
    "finalize_config",
    "finalize_kernel",
    "group_stats",
    "launch_finalize",
    "launch_stats",
    "max_nan",
    "replay_finalize",
    "replay_stats",
    "round_to",
    "round_trip",
    "stats_config",
    "stats_kernel",
    "stats_launches",
    "wide",
]
