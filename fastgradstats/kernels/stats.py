"""Fused per-tensor gradient statistics: one read of every element, one launch per group.

Two stages, deterministic (fixed reduction order, no float atomics):

1. :func:`block_partials_kernel`, grid ``(num_blocks,)``: each program reads one block of
   one tensor once and writes five float32 partials: sum g^2, sum |g|, max |g| (NaN
   ignored), NaN count, Inf count (counts are exact in float32: a block holds <= 2**24).
2. :func:`finalize_kernel`, grid ``(n_tensors,)``: each program reduces its tensor's
   partials in block order and writes the per-tensor p-norm, max |g| (NaN when the tensor
   holds a NaN), and int64 NaN/Inf counts.

Accumulation is float32 for every supported gradient dtype (fp32, bf16, fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernels as settings
from . import launch, triton_dtype
from .tables import TensorTable

N_PARTIALS = 5  # sum g^2, sum |g|, max |g|, NaN count, Inf count
NORM_CODES = {1.0: 1, 2.0: 2, float("inf"): 0}  # the NORM constexpr of finalize_kernel


@triton.jit
def block_location(table_ptr, pid, n_tensors, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGNED: tl.constexpr):  # fmt: skip
    """Where block ``pid`` lives: (typed base pointer, int64 element offsets [BLOCK],
    tensor numel, whether the whole block lies inside the tensor)."""
    t = tl.load(table_ptr + 3 * n_tensors + 1 + pid)
    address = tl.load(table_ptr + t)
    if ALIGNED:
        address = tl.multiple_of(address, 16)
    base = address.to(tl.pointer_type(DTYPE))
    numel = tl.load(table_ptr + n_tensors + t)
    start = (pid - tl.load(table_ptr + 2 * n_tensors + t)) * BLOCK  # int64: no overflow
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)
    return base, offsets, numel, start + BLOCK <= numel


@triton.jit
def _load_block(table_ptr, pid, n_tensors, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                ALIGNED: tl.constexpr):  # fmt: skip
    """Program ``pid``'s block as float32 [BLOCK] (0 past the tensor's end)."""
    base, offsets, numel, full = block_location(table_ptr, pid, n_tensors, DTYPE, BLOCK, ALIGNED)
    if full:  # unmasked, so the compiler can emit vector loads
        x = tl.load(base + offsets)
    else:
        x = tl.load(base + offsets, mask=offsets < numel, other=0.0)
    return x.to(tl.float32)


@triton.jit
def block_partials_kernel(
    table_ptr,  # int64 table of the group (see tables.py for its layout)
    partials_ptr,  # float32 [5, num_blocks] out: sum g^2, sum |g|, max |g|, #NaN, #Inf
    n_tensors,  # tensors in the group
    num_blocks,  # blocks in the group: the grid size and the partials' row stride
    DTYPE: tl.constexpr,  # element type of the gradients
    BLOCK: tl.constexpr,  # elements per block (the table's block size)
    ALIGNED: tl.constexpr,  # every data_ptr is 16-byte aligned (enables vector loads)
):
    pid = tl.program_id(0).to(tl.int64)
    x = _load_block(table_ptr, pid, n_tensors, DTYPE, BLOCK, ALIGNED)
    magnitude = tl.abs(x)
    is_nan = x != x
    is_inf = magnitude == float("inf")
    # NaN is counted instead of maxed: how maximum treats NaN differs between backends.
    block_max = tl.max(tl.where(is_nan, 0.0, magnitude), axis=0)
    out = partials_ptr + pid
    tl.store(out, tl.sum(x * x, axis=0))
    tl.store(out + num_blocks, tl.sum(magnitude, axis=0))
    tl.store(out + 2 * num_blocks, block_max)
    tl.store(out + 3 * num_blocks, tl.sum(is_nan.to(tl.float32), axis=0))
    tl.store(out + 4 * num_blocks, tl.sum(is_inf.to(tl.float32), axis=0))


@triton.jit
def finalize_kernel(
    table_ptr,  # int64 table of the group (first_block is read)
    partials_ptr,  # float32 [5, num_blocks] from block_partials_kernel
    floats_ptr,  # float32 [2, n_tensors] out: p-norm, max |g|
    counts_ptr,  # int64 [2, n_tensors] out: NaN count, Inf count
    n_tensors,  # tensors in the group: the grid size
    num_blocks,  # row stride of the partials
    NORM: tl.constexpr,  # 2: sqrt(sum g^2), 1: sum |g|, 0: max |g| (the inf-norm)
    CHUNK: tl.constexpr,  # partials reduced per loop step
):
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(table_ptr + 2 * n_tensors + t)
    last = tl.load(table_ptr + 2 * n_tensors + t + 1)
    sum_sq = tl.zeros([CHUNK], dtype=tl.float32)
    sum_abs = tl.zeros([CHUNK], dtype=tl.float32)
    max_abs = tl.zeros([CHUNK], dtype=tl.float32)
    nan_count = tl.zeros([CHUNK], dtype=tl.int64)
    inf_count = tl.zeros([CHUNK], dtype=tl.int64)
    for chunk_start in range(first, last, CHUNK):
        index = chunk_start + tl.arange(0, CHUNK).to(tl.int64)
        mask = index < last
        row = partials_ptr + index
        sum_sq += tl.load(row, mask=mask, other=0.0)
        sum_abs += tl.load(row + num_blocks, mask=mask, other=0.0)
        max_abs = tl.maximum(max_abs, tl.load(row + 2 * num_blocks, mask=mask, other=0.0))
        nan_count += tl.load(row + 3 * num_blocks, mask=mask, other=0.0).to(tl.int64)
        inf_count += tl.load(row + 4 * num_blocks, mask=mask, other=0.0).to(tl.int64)
    nans = tl.sum(nan_count, axis=0)
    tensor_max = tl.max(max_abs, axis=0)
    tensor_max = tl.where(nans > 0, float("nan"), tensor_max)
    if NORM == 2:
        norm = tl.sqrt_rn(tl.sum(sum_sq, axis=0))
    elif NORM == 1:
        norm = tl.sum(sum_abs, axis=0)
    else:
        norm = tensor_max
    norm = tl.where(nans > 0, float("nan"), norm)
    tl.store(floats_ptr + t, norm)
    tl.store(floats_ptr + n_tensors + t, tensor_max)
    tl.store(counts_ptr + t, nans)
    tl.store(counts_ptr + n_tensors + t, tl.sum(inf_count, axis=0))


def group_stats(table: TensorTable, norm_type: float) -> tuple[Tensor, Tensor]:
    """Per-tensor stats of the group described by ``table`` (no host sync).

    Returns ``(floats, counts)``: float32 [2, n] (p-norm, max |g|) and int64 [2, n]
    (NaN count, Inf count) on the table's device. Two launches: partials, finalize.
    """
    n, num_blocks = table.n_tensors, table.num_blocks
    device = table.device
    floats = torch.empty((2, n), dtype=torch.float32, device=device)
    counts = torch.empty((2, n), dtype=torch.int64, device=device)
    partials = torch.empty((N_PARTIALS, max(num_blocks, 1)), dtype=torch.float32, device=device)
    if num_blocks > 0:  # all tensors empty: nothing to read, finalize writes zeros
        launch(
            block_partials_kernel,
            (num_blocks,),
            table.data,
            partials,
            n,
            num_blocks,
            DTYPE=triton_dtype(table.dtype),
            BLOCK=table.block,
            ALIGNED=table.aligned,
            num_warps=settings.NUM_WARPS,
        )
    launch(
        finalize_kernel,
        (n,),
        table.data,
        partials,
        floats,
        counts,
        n,
        max(num_blocks, 1),
        NORM=NORM_CODES[float(norm_type)],
        CHUNK=settings.FINALIZE_CHUNK,
    )
    return floats, counts


__all__ = [
    "NORM_CODES",
    "block_location",
    "block_partials_kernel",
    "finalize_kernel",
    "group_stats",
]
