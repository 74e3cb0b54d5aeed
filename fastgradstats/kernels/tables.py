"""Tensor tables: where each gradient of a group lives, so one launch can cover them all.

A table is ONE int64 device tensor laid out as::

    [ ptrs (n) | numels (n) | first_block (n + 1) | block_tensor (num_blocks) ]

* ``ptrs[t]``: address of tensor ``t``'s lowest element (its ``data_ptr()``);
* ``numels[t]``: its element count (int64, so tensors over 2**31 elements work);
* ``first_block[t]``: index of its first block; its blocks are
  ``first_block[t] .. first_block[t + 1] - 1`` (an empty tensor owns none);
* ``block_tensor[b]``: the tensor block ``b`` belongs to; the block starts at element
  ``(b - first_block[t]) * BLOCK`` of that tensor.

It is built on the host from Python ints (no device value is read) and copied to the device
in one small H2D copy (pinned, non-blocking on CUDA). Tables are cached by the exact layout
``(device, dtype, BLOCK, data_ptrs, numels)``: the same storage gives the same table, and
``zero_grad(set_to_none=True)`` followed by a new backward (new storage) gives a new one.
Because the key holds every address and size, a cached table is never stale.

Kernels treat each tensor as a flat run of ``numel`` elements starting at ``data_ptr()``.
That is true of every *non-overlapping and dense* tensor (contiguous, channels_last,
transposed, ...), whatever the order of its strides: element order does not matter for
sums, maxima, counts, scaling or clamping. Other tensors (gapped slices, expanded views)
must not be given to a table; :func:`is_dense` tells which are which.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

CACHE_SIZE = 32  # distinct layouts kept (a model's grads, a subset for stats, ...)
ALIGN_BYTES = 16  # alignment that lets the compiler emit 16-byte vector loads

_cache: OrderedDict[tuple, TensorTable] = OrderedDict()
cache_stats = {"hits": 0, "builds": 0}


@dataclass(frozen=True)
class TensorTable:
    """One group's table on its device, plus the host-side facts kernels are launched with."""

    device: torch.device
    dtype: torch.dtype
    block: int  # elements per block (the kernels' BLOCK)
    n_tensors: int
    num_blocks: int  # total blocks over all tensors: the grid of the per-block kernels
    aligned: bool  # every data_ptr is a multiple of ALIGN_BYTES
    data: Tensor  # int64 [3 * n_tensors + 1 + num_blocks] on ``device``
    host: Tensor  # the host copy; kept alive until the (non-blocking) H2D copy is done

    @property
    def first_block(self) -> Tensor:
        """int64 [n_tensors + 1] device view: each tensor's first block index."""
        n = self.n_tensors
        return self.data[2 * n : 3 * n + 1]


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements from ``data_ptr()``.

    That is, non-overlapping and dense in some stride order (contiguous, channels_last,
    transposed). Gapped slices and expanded (stride 0) views are not.
    """
    if t.numel() <= 1 or t.is_contiguous():
        return True
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _build(
    device: torch.device,
    dtype: torch.dtype,
    block: int,
    ptrs: list[int],
    numels: list[int],
) -> TensorTable:
    n = len(ptrs)
    blocks_per_tensor = [-(-m // block) for m in numels]
    first_block = [0] * (n + 1)
    for t, count in enumerate(blocks_per_tensor):
        first_block[t + 1] = first_block[t] + count
    num_blocks = first_block[n]
    head = torch.tensor(ptrs + numels + first_block, dtype=torch.int64)
    block_tensor = torch.repeat_interleave(
        torch.arange(n, dtype=torch.int64), torch.tensor(blocks_per_tensor, dtype=torch.int64)
    )
    host = torch.cat([head, block_tensor])
    if device.type == "cuda":
        host = host.pin_memory()
        data = host.to(device, non_blocking=True)
    else:
        data = host.to(device)
    aligned = all(p % ALIGN_BYTES == 0 for p in ptrs)
    return TensorTable(device, dtype, block, n, num_blocks, aligned, data, host)


def table_for(tensors: list[Tensor], block: int, cache: bool = True) -> TensorTable:
    """The table of ``tensors`` (same device and dtype, all :func:`is_dense`).

    Built with one small H2D copy, or taken from the cache when the same storage layout
    was seen before. ``cache=False`` builds a throwaway table (for temporary copies).
    """
    if not tensors:
        raise ValueError("tensors must not be empty")
    device, dtype = tensors[0].device, tensors[0].dtype
    ptrs = [t.data_ptr() for t in tensors]
    numels = [t.numel() for t in tensors]
    if not cache:
        cache_stats["builds"] += 1
        return _build(device, dtype, block, ptrs, numels)
    key = (device, dtype, block, tuple(ptrs), tuple(numels))
    table = _cache.get(key)
    if table is not None:
        cache_stats["hits"] += 1
        _cache.move_to_end(key)
        return table
    cache_stats["builds"] += 1
    table = _build(device, dtype, block, ptrs, numels)
    _cache[key] = table
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return table


def clear_cache() -> None:
    """Forget every cached table (and reset ``cache_stats``)."""
    _cache.clear()
    cache_stats["hits"] = 0
    cache_stats["builds"] = 0


__all__ = ["TensorTable", "cache_stats", "clear_cache", "is_dense", "table_for"]
