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

Ownership on CUDA (issue 19): the copy is queued on the stream that builds the table, and
an event is recorded after it. The first use on any other stream makes that stream wait
for the event and tells the caching allocator that the stream uses the table's memory
(``record_stream``), so neither a read before the copy lands nor a reuse of the memory
after eviction, while that stream's kernels are pending, can happen. A table used while a
CUDA graph is being captured is pinned for the life of the process: the graph keeps its
raw address, and no cache eviction may free it.

Kernels treat each tensor as a flat run of ``numel`` elements starting at ``data_ptr()``.
That is true of every *non-overlapping and dense* tensor (contiguous, channels_last,
transposed, ...), whatever the order of its strides: element order does not matter for
sums, maxima, counts, scaling or clamping. Other tensors (gapped slices, expanded views)
must not be given to a table; :func:`is_dense` tells which are which.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..lru import Lru
from ..overlap import overlap_rounds

CACHE_SIZE = 32  # distinct layouts kept (a model's grads, a subset for stats, ...)
ALIGN_BYTES = 16  # alignment that lets the compiler emit 16-byte vector loads
KIND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROWS = 5  # ptrs, numels, block_start, block_end, kinds

_cache = Lru(CACHE_SIZE)  # one thread per GPU is common: the cache is shared
_lock = threading.Lock()  # the stream bookkeeping of tables and the pinned list
cache_stats = {"hits": 0, "builds": 0}
_pinned: list[TensorTable] = []  # used under CUDA-graph capture: kept for the process's life


def current_stream(device: torch.device) -> Any:
    """The current CUDA stream of ``device``, or ``None`` off CUDA (launches run in order)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def capturing(device: torch.device) -> bool:
    """True while the current stream of CUDA ``device`` is being captured into a graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _use_on(tensor: Tensor, stream: Any) -> None:
    """The allocator must not hand ``tensor``'s memory out again before the work queued on
    ``stream`` when it is freed has run (memory is otherwise only ordered on its own
    stream)."""
    if tensor.is_cuda:
        tensor.record_stream(stream)


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
    ready: Any = field(default=None, compare=False)  # CUDA event after the H2D copy
    streams: set = field(default_factory=set, compare=False)  # stream handles ordered after it
    is_pinned: bool = field(default=False, compare=False)  # see ``pin``

    @property
    def aligned(self) -> bool:
        return all(s.aligned for s in self.segments)

    def order_on(self, stream: Any) -> None:
        """Before a launch on ``stream``: the first time, make it wait for the H2D copy and
        keep the table's memory for it (see the module docstring). Nothing to do on the
        building stream, off CUDA, or while capturing (a captured graph may not wait on an
        event from outside; capture follows an eager warm-up on the capturing stream)."""
        if self.ready is None or stream.cuda_stream in self.streams:
            return
        if capturing(self.device):
            return
        with _lock:
            if stream.cuda_stream in self.streams:
                return
            stream.wait_event(self.ready)
            _use_on(self.data, stream)
            self.streams.add(stream.cuda_stream)
        for part in self.write_rounds:
            part.order_on(stream)

    def pin(self) -> None:
        """Keep this table (and its write rounds) for the life of the process."""
        if not self.is_pinned:
            with _lock:
                if not self.is_pinned:
                    _pinned.append(self)
                    object.__setattr__(self, "is_pinned", True)  # frozen: set once, here


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
    stream = current_stream(device)
    ready, streams = None, set()
    if stream is not None and not capturing(device):
        ready = stream.record_event()  # the copy (and the rounds' copies) are queued before it
        streams.add(stream.cuda_stream)
    return TensorTable(device, block, n, len(block_tensor), tuple(segments), data, host,
                       write_rounds, ready, streams)  # fmt: skip


def build_placed(
    device: torch.device,
    block: int,
    ptrs: list[int],
    numels: list[int],
    dtypes: list[torch.dtype],
    starts: list[int],
    read: list[bool],
) -> TensorTable:
    """A table whose blocks the caller places (never cached): tensor ``t`` owns the
    ``ceil(numels[t] / block)`` blocks from ``starts[t]`` on, so its partials land at a
    position fixed in advance whatever its address (``fastgradstats.backward`` keeps one
    model-wide partials layout across steps).

    Segments are the maximal runs, in block order, of blocks of tensors with ``read[t]``
    and one (dtype, alignment): a caller that places each dtype's tensors next to each
    other gets one segment per dtype while every address is aligned, more (never a wrong
    placement) when one is not. Tensors not read (``ptrs[t]`` may be 0) are in no segment;
    the ``block_tensor`` row stops after the last block read (a finalize-only table, every
    ``read`` false, has none).
    """
    n = len(ptrs)
    counts = [-(-numels[t] // block) for t in range(n)]
    ends = [starts[t] + counts[t] for t in range(n)]
    placed = sorted((starts[t], t) for t in range(n) if read[t] and counts[t])
    last = max((ends[t] for _, t in placed), default=0)
    block_tensor = [0] * last
    segments: list[Segment] = []
    for start, t in placed:
        block_tensor[start : ends[t]] = [t] * counts[t]
        key = (dtypes[t], ptrs[t] % ALIGN_BYTES == 0)
        prev = segments[-1] if segments else None
        if prev is not None and (prev.dtype, prev.aligned) == key and prev.hi == start:
            segments[-1] = Segment(prev.dtype, prev.aligned, prev.lo, ends[t])
        else:
            segments.append(Segment(key[0], key[1], start, ends[t]))
    kinds = [KIND_CODES.get(d, 0) for d in dtypes]
    host = torch.tensor(list(ptrs) + list(numels) + list(starts) + ends + kinds + block_tensor,
                        dtype=torch.int64)  # fmt: skip
    if device.type == "cuda":
        host = host.pin_memory()
        data = host.to(device, non_blocking=True)
    else:
        data = host.to(device)
    stream = current_stream(device)
    ready, streams = None, set()
    if stream is not None and not capturing(device):
        ready = stream.record_event()
        streams.add(stream.cuda_stream)
    return TensorTable(device, block, n, max(ends, default=0), tuple(segments), data, host,
                       (), ready, streams)  # fmt: skip


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
        cache_stats["builds"] += 1
        return ready_for_launch(build(device, block, ptrs, numels, dtypes))
    key = (device, block, tuple(ptrs), tuple(numels), tuple(dtypes))
    if capturing(device):
        # A table first built under capture is filled by the graph's copy, at replay only:
        # the graph owns it (pinned), eager calls must not find it in the cache.
        table = _cache.get(key)
        if table is None:
            table = build(device, block, ptrs, numels, dtypes)
        return ready_for_launch(table)
    return ready_for_launch(cached(key, lambda: build(device, block, ptrs, numels, dtypes)))


def ready_for_launch(table: TensorTable) -> TensorTable:
    """``table``, ordered on the current stream, or pinned when a graph is being captured."""
    if capturing(table.device):
        table.pin()
    else:
        stream = current_stream(table.device)
        if stream is not None:
            table.order_on(stream)
    return table


def cached(key: tuple, make) -> TensorTable:
    """``_cache[key]``, made by ``make()`` on a miss; safe to call from many threads."""
    table = _cache.get(key)
    if table is not None:
        cache_stats["hits"] += 1
        return table
    table = make()  # outside the lock: the H2D copy must not serialize other threads
    cache_stats["builds"] += 1
    return _cache.put(key, table, keep_existing=True)


def clear_cache() -> None:
    """Forget every cached table (and reset ``cache_stats``)."""
    _cache.clear()
    cache_stats["hits"] = 0
    cache_stats["builds"] = 0


__all__ = [
    "KIND_CODES",
    "Segment",
    "TensorTable",
    "build",
    "build_placed",
    "cache_stats",
    "cached",
    "capturing",
    "clear_cache",
    "current_stream",
    "is_dense",
    "ready_for_launch",
    "table_for",
]
