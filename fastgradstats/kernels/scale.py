"""In-place scale (clip_grad_norm_), clamp (clip_grad_value_) and conditional zeroing
(``GradMonitor(skip_nonfinite=True)``) over a table's segments.

One launch per segment, grid ``(blocks of the segment,)``; each program loops over its
block ``TILE`` elements at a time (128-bit loads and stores on aligned segments). The scale
kernel reads the clip coefficient from device memory, so the host never learns whether
clipping happens; when it does not (coefficient >= 1) every program returns before
touching gradient memory. A NaN coefficient is applied (the gradients become NaN), as
torch does. The zero kernel reads a device flag the same way: unset, nothing is touched;
set, the gradients are overwritten with zeros (stores only: NaN * 0 would stay NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernels as settings
from .stats import block_location, round_to, wide
from .tables import TensorTable


@triton.jit
def scale_kernel(
    table_ptr,  # int64 table (see tables.py for its layout)
    coef_ptr,  # 0-d float tensor: the factor, read on the device
    n_tensors,  # tensors in the table
    block_lo,  # the segment's first block
    DTYPE: tl.constexpr,  # element type of the segment's gradients
    BLOCK: tl.constexpr,  # elements per block (the table's block size)
    TILE: tl.constexpr,  # elements per loop step
    ALIGNED: tl.constexpr,  # every data_ptr of the segment is 16-byte aligned
):
    coef = tl.load(coef_ptr)
    # Multiply in float32 by the float32 factor, as torch's mul_ does for 16-bit grads.
    factor = coef.to(tl.float32)
    # "not (coef >= 1)": a NaN coefficient must still be applied.
    if (coef < 1.0) | (coef != coef):
        b = wide(block_lo) + tl.program_id(0).to(tl.int64)
        base, count = block_location(table_ptr, b, n_tensors, DTYPE, BLOCK, ALIGNED)
        lanes = tl.arange(0, TILE)
        full = count // TILE
        for i in range(full):
            pointers = base + i * TILE + lanes
            x = tl.load(pointers)
            tl.store(pointers, round_to(x.to(tl.float32) * factor, DTYPE))
        rest = count - full * TILE
        if rest > 0:
            pointers = base + full * TILE + lanes
            mask = lanes < rest
            x = tl.load(pointers, mask=mask, other=0.0)
            tl.store(pointers, round_to(x.to(tl.float32) * factor, DTYPE), mask=mask)


@triton.jit
def zero_kernel(
    table_ptr,  # int64 table
    flag_ptr,  # 0-d bool tensor, read on the device: zero the gradients when set
    n_tensors,  # tensors in the table
    block_lo,  # the segment's first block
    DTYPE: tl.constexpr,  # element type of the segment's gradients
    BLOCK: tl.constexpr,  # elements per block
    TILE: tl.constexpr,  # elements per loop step
    ALIGNED: tl.constexpr,  # every data_ptr of the segment is 16-byte aligned
):
    if tl.load(flag_ptr) != 0:
        b = wide(block_lo) + tl.program_id(0).to(tl.int64)
        base, count = block_location(table_ptr, b, n_tensors, DTYPE, BLOCK, ALIGNED)
        lanes = tl.arange(0, TILE)
        zeros = tl.zeros([TILE], dtype=DTYPE)
        full = count // TILE
        for i in range(full):
            tl.store(base + i * TILE + lanes, zeros)
        rest = count - full * TILE
        if rest > 0:
            tl.store(base + full * TILE + lanes, zeros, mask=lanes < rest)


@triton.jit
def _clamp_step(pointers, mask, clip_value, DTYPE: tl.constexpr):
    x = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    too_big = x > clip_value
    too_small = x < -clip_value
    bound = round_to(tl.where(too_big, clip_value, -clip_value), DTYPE)
    # Only changed elements are stored: NaN compares false and stays NaN, as in torch.
    tl.store(pointers, bound, mask=mask & (too_big | too_small))


@triton.jit
def clamp_kernel(
    table_ptr,  # int64 table
    clip_value,  # float32 scalar >= 0: gradients are clamped to [-clip_value, clip_value]
    n_tensors,  # tensors in the table
    block_lo,  # the segment's first block
    DTYPE: tl.constexpr,  # element type of the segment's gradients
    BLOCK: tl.constexpr,  # elements per block
    TILE: tl.constexpr,  # elements per loop step
    ALIGNED: tl.constexpr,  # every data_ptr of the segment is 16-byte aligned
):
    b = wide(block_lo) + tl.program_id(0).to(tl.int64)
    base, count = block_location(table_ptr, b, n_tensors, DTYPE, BLOCK, ALIGNED)
    lanes = tl.arange(0, TILE)
    full = count // TILE
    for i in range(full):  # an all-true mask keeps the loads 128-bit
        _clamp_step(base + i * TILE + lanes, lanes < TILE, clip_value, DTYPE)
    rest = count - full * TILE
    if rest > 0:
        _clamp_step(base + full * TILE + lanes, lanes < rest, clip_value, DTYPE)


def elementwise_config(dtype: torch.dtype, block: int, aligned: bool) -> dict:
    """The constexprs and ``num_warps`` scale/clamp are launched with (and compiled with by
    ``benchmarks codegen``). Shared by every caller: read it, never modify it."""
    key = ("elementwise", dtype, block, aligned)
    return settings.launch_config(key, lambda: settings.base_config(dtype, block, aligned))


ScaleLaunch = tuple[tuple[int], Tensor, int, int, dict]  # grid, table, n_tensors, block_lo, config


def scale_(table: TensorTable, coef: Tensor) -> None:
    """Multiply every gradient of ``table`` by the 0-d device tensor ``coef``, in place.

    Tensors that share memory are scaled one round after the other (as many times as
    they were passed, as torch's ``_foreach_mul_`` does), never by two programs of one
    launch at once. Clamp and zero need no rounds: they store the same values whichever
    program gets there first.
    """
    replay_scale(scale_launches(table), coef)


def scale_launches(table: TensorTable) -> list[ScaleLaunch]:
    """The ``(grid, table, n_tensors, block_lo, config)`` of each :func:`scale_` launch,
    in order. A caller that scales the same table again and again (a cached plan) keeps
    this list and replays it with :func:`replay_scale`: a launch then builds no config."""
    return [
        ((seg.num_blocks,), part.data, part.n_tensors, seg.lo,
         elementwise_config(seg.dtype, table.block, seg.aligned))
        for part in table.write_rounds or (table,)
        for seg in part.segments
    ]  # fmt: skip


def replay_scale(launches: list[ScaleLaunch], coef: Tensor) -> None:
    """Make the launches :func:`scale_launches` listed, each reading ``coef``."""
    for grid, data, n_tensors, block_lo, config in launches:
        settings.launch(scale_kernel, grid, data, coef, n_tensors, block_lo, **config)


def zero_where_(table: TensorTable, flag: Tensor) -> None:
    """Zero every gradient of ``table`` in place when the 0-d bool device tensor ``flag``
    is set; decided on the device (no sync), no memory touched when it is not."""
    for seg in table.segments:
        settings.launch(
            zero_kernel,
            (seg.num_blocks,),
            table.data,
            flag,
            table.n_tensors,
            seg.lo,
            **elementwise_config(seg.dtype, table.block, seg.aligned),
        )


def clamp_(table: TensorTable, clip_value: float) -> None:
    """Clamp every gradient of ``table`` to ``[-clip_value, clip_value]``, in place."""
    for seg in table.segments:
        settings.launch(
            clamp_kernel,
            (seg.num_blocks,),
            table.data,
            float(clip_value),
            table.n_tensors,
            seg.lo,
            **elementwise_config(seg.dtype, table.block, seg.aligned),
        )


__all__ = [
    "clamp_",
    "clamp_kernel",
    "elementwise_config",
    "replay_scale",
    "scale_",
    "scale_kernel",
    "scale_launches",
    "zero_kernel",
    "zero_where_",
]
