"""Tensor tables: where each gradient of a list lives, so one launch covers a whole segment.

A table is ONE int64 device tensor laid out as::

    [ ptrs (n) | numels (n) | block_start (n) | block_end (n) | kinds (n) | block_tensor (B) ]

* ``ptrs[t]``: address of tensor ``t``'s lowest element (its ``data_ptr()``);
* ``numels[t]``: its element count (int64, so tensors over 2**31 elements work);
* ``block_start[t] .. block_end[t] - 1``: its blocks (an empty tensor owns none); block
  ``b`` starts at element ``(b - block_start[t]) * BLOCK`` of its tensor;
* ``kinds[t]``: its dtype code (:data:`KIND_CODES`), which the finalize needs to round each
  per-tensor norm the way torch does;
* ``block_tensor[b]``: the tensor block ``b`` belongs to.

Tensors keep their input order (``t`` is the input position), so per-tensor results come
out in input order. Blocks are grouped into *segments* of one dtype and one alignment:
each segment is one launch of a per-block kernel (``DTYPE`` and ``ALIGNED`` are compile
time constants), and a tensor whose address is not 16-byte aligned goes into its own
segment instead of taking 128-bit loads away from the others.

It is built on the host from Python ints (no device value is read) and copied to the device
in one small H2D copy (pinned, non-blocking on CUDA). Tables are cached by the exact layout
``(device, BLOCK, TILE, data_ptrs, numels, dtypes)``, so a cached table is never stale.

Kernels treat each tensor as a flat run of ``numel`` elements starting at ``data_ptr()``.
That is true of every *non-overlapping and dense* tensor (contiguous, channels_last,
transposed, ...), whatever the order of its strides: element order does not matter for
sums, maxima, counts, scaling or clamping. Other tensors (gapped slices, expanded views)
must not be given to a table; :func:`is_dense` tells which are which.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..overlap import overlap_rounds

CACHE_SIZE = 32  # distinct layouts kept (a model's grads, a subset for stats, ...)
ALIGN_BYTES = 16  # alignment that lets the compiler emit 16-byte vector loads
KIND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROWS = 5  # ptrs, numels, block_start, block_end, kinds

_cache: OrderedDict[tuple, TensorTable] = OrderedDict()
_lock = threading.Lock()  # one thread per GPU is common: the cache is shared
cache_stats = {"hits": 0, "builds": 0}


@dataclass(frozen=True)
class Segment:
    """Blocks ``lo .. hi - 1`` of a table: one dtype, one alignment, one kernel launch."""

    dtype: torch.dtype
    aligned: bool  # every data_ptr of the segment is a multiple of ALIGN_BYTES
    lo: int
    hi: int

    @property
    def num_blocks(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class TensorTable:
    """One list's table on its device, plus the host-side facts kernels are launched with."""

    device: torch.device
    block: int  # elements per block (the kernels' BLOCK)
    n_tensors: int
    num_blocks: int  # total blocks over all tensors
    segments: tuple[Segment, ...]
    data: Tensor  # int64 [ROWS * n_tensors + num_blocks] on ``device``
    host: Tensor  # the host copy; kept alive until the (non-blocking) H2D copy is done
    # Tensors sharing memory (a parameter passed twice): the in-place scale launches one
    # table per round of disjoint tensors, in turn (see ``fastgradstats.overlap``); empty
    # when no two tensors overlap: the table itself is written in one go.
    write_rounds: tuple[TensorTable, ...] = ()

    @property
    def aligned(self) -> bool:
        return all(s.aligned for s in self.segments)


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


def build(
    device: torch.device,
    block: int,
    ptrs: list[int],
    numels: list[int],
    dtypes: list[torch.dtype],
) -> TensorTable:
    """A table for tensors at ``ptrs`` (never cached; see :func:`table_for`)."""
    n = len(ptrs)
    order: dict[tuple[torch.dtype, bool], list[int]] = {}
    for t in range(n):
        order.setdefault((dtypes[t], ptrs[t] % ALIGN_BYTES == 0), []).append(t)
    block_start = [0] * n
    block_end = [0] * n
    block_tensor: list[int] = []
    segments = []
    for (dtype, aligned), members in order.items():
        lo = len(block_tensor)
        for t in members:
            count = -(-numels[t] // block)
            block_start[t] = len(block_tensor)
            block_tensor.extend([t] * count)
            block_end[t] = len(block_tensor)
        if len(block_tensor) > lo:
            segments.append(Segment(dtype, aligned, lo, len(block_tensor)))
    kinds = [KIND_CODES.get(d, 0) for d in dtypes]
    rounds = overlap_rounds(ptrs, [numels[t] * dtypes[t].itemsize for t in range(n)])
    write_rounds = ()
    if rounds is not None:
        write_rounds = tuple(
            build(device, block, [ptrs[t] for t in members], [numels[t] for t in members],
                  [dtypes[t] for t in members])
            for members in rounds
        )  # fmt: skip
    host = torch.tensor(ptrs + numels + block_start + block_end + kinds + block_tensor,
                        dtype=torch.int64)  # fmt: skip
    if device.type == "cuda":
        host = host.pin_memory()
        data = host.to(device, non_blocking=True)
    else:
        data = host.to(device)
    return TensorTable(device, block, n, len(block_tensor), tuple(segments), data, host,
                       write_rounds)  # fmt: skip


def table_for(tensors: list[Tensor], block: int, cache: bool = True) -> TensorTable:
    """The table of ``tensors`` (one device, all :func:`is_dense`).

    Built with one small H2D copy, or taken from the cache when the same storage layout
    was seen before. ``cache=False`` builds a throwaway table (for temporary copies).
    """
    if not tensors:
        raise ValueError("tensors must not be empty")
    device = tensors[0].device
    ptrs = [t.data_ptr() for t in tensors]
    numels = [t.numel() for t in tensors]
    dtypes = [t.dtype for t in tensors]
    if not cache:
        with _lock:
            cache_stats["builds"] += 1
        return build(device, block, ptrs, numels, dtypes)
    key = (device, block, tuple(ptrs), tuple(numels), tuple(dtypes))
    return cached(key, lambda: build(device, block, ptrs, numels, dtypes))


def cached(key: tuple, make) -> TensorTable:
    """``_cache[key]``, made by ``make()`` on a miss; safe to call from many threads."""
    with _lock:
        table = _cache.get(key)
        if table is not None:
            cache_stats["hits"] += 1
            _cache.move_to_end(key)
            return table
    table = make()  # outside the lock: the H2D copy must not serialize other threads
    with _lock:
        cache_stats["builds"] += 1
        table = _cache.setdefault(key, table)
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return table


def clear_cache() -> None:
    """Forget every cached table (and reset ``cache_stats``)."""
    with _lock:
        _cache.clear()
        cache_stats["hits"] = 0
        cache_stats["builds"] = 0


__all__ = [
    "KIND_CODES",
    "Segment",
    "TensorTable",
    "build",
    "cache_stats",
    "cached",
    "clear_cache",
    "is_dense",
    "table_for",
]
