"""In-place scale (clip_grad_norm_) and clamp (clip_grad_value_) over a group's table.

One launch per group, grid ``(num_blocks,)``. The scale kernel reads the clip coefficient
from device memory, so the host never learns whether clipping happens; when it does not
(coefficient >= 1) every program returns before touching gradient memory. A NaN
coefficient is applied (the gradients become NaN), as torch does.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .. import kernels as settings
from . import launch, triton_dtype
from .stats import block_location
from .tables import TensorTable


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
def scale_kernel(
    table_ptr,  # int64 table of the group (see tables.py for its layout)
    coef_ptr,  # 0-d float tensor: the factor, read on the device
    n_tensors,  # tensors in the group
    DTYPE: tl.constexpr,  # element type of the gradients
    BLOCK: tl.constexpr,  # elements per block (the table's block size)
    ALIGNED: tl.constexpr,  # every data_ptr is 16-byte aligned (enables vector access)
):
    coef = tl.load(coef_ptr)
    # Multiply in float32 by the float32 factor, as torch's mul_ does for 16-bit grads.
    factor = coef.to(tl.float32)
    # "not (coef >= 1)": a NaN coefficient must still be applied.
    if (coef < 1.0) | (coef != coef):
        pid = tl.program_id(0).to(tl.int64)
        base, offsets, numel, full = block_location(
            table_ptr, pid, n_tensors, DTYPE, BLOCK, ALIGNED
        )
        pointers = base + offsets
        if full:
            x = tl.load(pointers)
            tl.store(pointers, round_to(x.to(tl.float32) * factor, DTYPE))
        else:
            mask = offsets < numel
            x = tl.load(pointers, mask=mask, other=0.0)
            tl.store(pointers, round_to(x.to(tl.float32) * factor, DTYPE), mask=mask)


@triton.jit
def clamp_kernel(
    table_ptr,  # int64 table of the group
    clip_value,  # float32 scalar >= 0: gradients are clamped to [-clip_value, clip_value]
    n_tensors,  # tensors in the group
    DTYPE: tl.constexpr,  # element type of the gradients
    BLOCK: tl.constexpr,  # elements per block
    ALIGNED: tl.constexpr,  # every data_ptr is 16-byte aligned
):
    pid = tl.program_id(0).to(tl.int64)
    base, offsets, numel, full = block_location(table_ptr, pid, n_tensors, DTYPE, BLOCK, ALIGNED)
    pointers = base + offsets
    in_tensor = offsets < numel
    if full:  # unmasked load: vectorizable
        x = tl.load(pointers).to(tl.float32)
    else:
        x = tl.load(pointers, mask=in_tensor, other=0.0).to(tl.float32)
    too_big = x > clip_value
    too_small = x < -clip_value
    bound = round_to(tl.where(too_big, clip_value, -clip_value), DTYPE)
    # Only changed elements are stored: NaN compares false and stays NaN, as in torch.
    tl.store(pointers, bound, mask=in_tensor & (too_big | too_small))


def scale_(table: TensorTable, coef: Tensor) -> None:
    """Multiply every gradient of ``table`` by the 0-d device tensor ``coef``, in place."""
    if table.num_blocks == 0:
        return
    launch(
        scale_kernel,
        (table.num_blocks,),
        table.data,
        coef,
        table.n_tensors,
        DTYPE=triton_dtype(table.dtype),
        BLOCK=table.block,
        ALIGNED=table.aligned,
        num_warps=settings.NUM_WARPS,
    )


def clamp_(table: TensorTable, clip_value: float) -> None:
    """Clamp every gradient of ``table`` to ``[-clip_value, clip_value]``, in place."""
    if table.num_blocks == 0:
        return
    launch(
        clamp_kernel,
        (table.num_blocks,),
        table.data,
        float(clip_value),
        table.n_tensors,
        DTYPE=triton_dtype(table.dtype),
        BLOCK=table.block,
        ALIGNED=table.aligned,
        num_warps=settings.NUM_WARPS,
    )


__all__ = ["clamp_", "clamp_kernel", "round_to", "scale_", "scale_kernel"]
