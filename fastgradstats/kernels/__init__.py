"""Triton kernels: the fused per-tensor stats, in-place scale and clamp (no torch policy here).

Every kernel works on a whole (device, dtype) group of gradients at once through a
:class:`~fastgradstats.kernels.tables.TensorTable`: one launch covers 1 or 100,000 tensors.

Importing this package imports Triton; ``fastgradstats.dispatch`` only does so lazily.

Module-level settings (read at launch time, so tests can shrink them):

``BLOCK``
    elements per program (a power of two). 32768 suits GPUs: a program loops over its
    block ``TILE`` elements at a time with register accumulators, so the per-block
    reductions are paid once per 32768 elements. Tests use 128 so that the interpreter
    stays fast and block boundaries are crossed by small tensors.
``TILE``
    elements per loop step, or ``None`` for the default: two 16-byte loads per thread
    (``NUM_WARPS * 32 * 2 * 16 / itemsize``), capped at ``BLOCK``. Tests shrink it so that
    the loop runs several steps.
``FINALIZE_CHUNK``
    partials a finalize program reduces per loop step (a power of two).
``NUM_WARPS``
    warps per program of the per-block kernels.

``launch_counts`` counts every kernel launch by kernel name; tests read it to prove how
many launches a call costs. ``launch`` is the one place kernels are launched, so stubbing
it (``benchmarks host``) removes the device work and keeps the host work.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from ..env import triton_interpreter_on

BLOCK = 32768
TILE: int | None = None
FINALIZE_CHUNK = 1024
NUM_WARPS = 8
VECTOR_BYTES = 16  # one 128-bit load or store
UNROLL = 2  # 16-byte accesses per thread per loop step

launch_counts: Counter[str] = Counter()
_count_lock = threading.Lock()
_interpreter_lock = threading.Lock()

_ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


# Launch configs (constexpr dicts) by what they depend on: a steady-state launch builds
# none (a dict of a dozen entries per segment per call costs microseconds of host time).
# The key holds every tuning setting a config reads, so tests that change one get fresh
# configs. Few keys exist: dtypes x norms x flags x the settings ever used.
launch_configs: dict[tuple, dict] = {}


def tuning() -> tuple:
    """The settings a launch config depends on, for :data:`launch_configs` keys."""
    return (BLOCK, TILE, FINALIZE_CHUNK, NUM_WARPS, VECTOR_BYTES, UNROLL)


def launch_config(key: tuple, make: Callable[[], dict]) -> dict:
    """The config cached under ``key`` and the settings in force (``make()`` builds it on
    first use). Shared by every caller: read it, never modify it."""
    full_key = (*key, tuning())
    config = launch_configs.get(full_key)
    if config is None:
        config = launch_configs[full_key] = make()
    return config


def base_config(dtype: torch.dtype, block: int, aligned: bool) -> dict:
    """The constexprs every per-block kernel takes, and ``num_warps``."""
    return {
        "DTYPE": triton_dtype(dtype),
        "BLOCK": block,
        "TILE": tile_size(dtype, block),
        "ALIGNED": aligned,
        "num_warps": NUM_WARPS,
    }


def block_size() -> int:
    """The elements per program in force (``kernels.BLOCK``), checked to be a power of two."""
    block = int(BLOCK)
    if block < 16 or block & (block - 1) or block > 2**24:
        # Counts are kept as float32 partials: exact only up to 2**24 per block.
        raise ValueError(f"kernels.BLOCK must be a power of two in [16, 2**24], got {BLOCK}")
    return block


def tile_size(dtype: torch.dtype, block: int) -> int:
    """Elements per loop step of the per-block kernels for ``dtype`` (``kernels.TILE``)."""
    if TILE is not None:
        tile = int(TILE)
        if tile < 1 or tile & (tile - 1):
            raise ValueError(f"kernels.TILE must be a power of two, got {TILE}")
    else:
        itemsize = _ITEMSIZE.get(dtype) or torch.empty((), dtype=dtype).element_size()
        tile = NUM_WARPS * 32 * UNROLL * VECTOR_BYTES // itemsize
    return min(tile, block)


def triton_dtype(dtype: torch.dtype) -> Any:
    """The Triton element type of a supported gradient dtype."""
    try:
        return TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels do not handle {dtype} gradients") from None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it in ``launch_counts``."""
    with _count_lock:
        launch_counts[kernel.__name__] += 1
    if not triton_interpreter_on():
        kernel[grid](*args, **kwargs)
        return
    # The interpreter runs the kernel in numpy, which warns on the overflow and NaN
    # arithmetic that Inf/NaN gradients legitimately cause; GPUs do not warn. It keeps
    # global state (the grid, the builder) too, so interpreted launches take turns.
    with _interpreter_lock, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        kernel[grid](*args, **kwargs)


__all__ = [
    "BLOCK",
    "FINALIZE_CHUNK",
    "NUM_WARPS",
    "TILE",
    "base_config",
    "block_size",
    "launch",
    "launch_config",
    "launch_configs",
    "launch_counts",
    "tile_size",
    "triton",
    "triton_dtype",
    "tuning",
]
