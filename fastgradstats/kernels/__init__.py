"""Triton kernels: the fused per-tensor stats, in-place scale and clamp (no torch policy here).

Every kernel works on a whole (device, dtype) group of gradients at once through a
:class:`~fastgradstats.kernels.tables.TensorTable`: one launch covers 1 or 100,000 tensors.

Importing this package imports Triton; ``fastgradstats.dispatch`` only does so lazily.

Module-level settings (read at launch time, so tests can shrink them):

``BLOCK``
    elements per program (a power of two). 4096 suits GPUs; tests use 128 so that the
    interpreter stays fast and block boundaries are crossed by small tensors.
``FINALIZE_CHUNK``
    partials a finalize program reduces per loop step (a power of two).

``launch_counts`` counts every kernel launch by kernel name; tests read it to prove that a
group costs exactly one stats launch (plus its tiny finalize).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 4096
FINALIZE_CHUNK = 1024
NUM_WARPS = 8

launch_counts: Counter[str] = Counter()

TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def block_size() -> int:
    """The elements per program in force (``kernels.BLOCK``), checked to be a power of two."""
    block = int(BLOCK)
    if block < 16 or block & (block - 1) or block > 2**24:
        # Counts are kept as float32 partials: exact only up to 2**24 per block.
        raise ValueError(f"kernels.BLOCK must be a power of two in [16, 2**24], got {BLOCK}")
    return block


def triton_dtype(dtype: torch.dtype) -> Any:
    """The Triton element type of a supported gradient dtype."""
    try:
        return TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels do not handle {dtype} gradients") from None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it in ``launch_counts``."""
    launch_counts[kernel.__name__] += 1
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        kernel[grid](*args, **kwargs)
        return
    # The interpreter runs the kernel in numpy, which warns on the overflow and NaN
    # arithmetic that Inf/NaN gradients legitimately cause; GPUs do not warn.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        kernel[grid](*args, **kwargs)


__all__ = [
    "BLOCK",
    "FINALIZE_CHUNK",
    "NUM_WARPS",
    "block_size",
    "launch",
    "launch_counts",
    "triton",
    "triton_dtype",
]
