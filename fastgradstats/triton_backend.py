"""Triton backend: the backend contract of ``torch_backend`` on fused Triton kernels.

Two entry points:

* the **fused path** (``plan_for`` / ``run_fused`` / ``scale_fused``, used by
  ``core.fused``): a whole call's gradients (one device, fp32/bf16/fp16, dense) in one
  cached plan; stats (one launch per (dtype, alignment) segment) and ONE finalize that
  writes the per-tensor results, the total norm and the clip coefficient, then one scale
  launch per segment. No torch op between the launches, no host sync.
* the **group functions** of the backend contract, per (device, dtype) group (float32,
  bfloat16, float16; p in {1, 2, inf}), for the generic path (sharded gradients, mixed
  devices, non-dense layouts, torch.compile):

  - ``group_stats`` / ``group_norms``: one stats launch per segment reads every element
    once and a finalize launch reduces per tensor (deterministic, float32 accumulation);
  - ``scale_``: one launch per segment that reads the coefficient on the device and leaves
    gradient memory untouched when it is >= 1 (NaN is applied);
  - ``clamp_``: one launch per segment that stores only the elements that change.

No host sync anywhere: tables are built from Python ints (``data_ptr()``, ``numel()``) and
cached per storage layout (see ``kernels/tables.py``); every cache is thread-safe.

Layouts: any non-overlapping and dense gradient (contiguous, channels_last, transposed)
is read in place. Other strided gradients (gapped slices, expanded views) take the generic
path: the stats read a contiguous copy (same single launch, uncached table), while
scale/clamp apply the torch op to those tensors only, after checking (before any write)
that none of them has overlapping elements.

float64 and complex gradients, and other p, are not handled here: ``supports`` says so and
``dispatch`` sends them to the torch backend (whose conventions this backend follows).
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import kernels, torch_backend
from .constants import NUM_BINS
from .env import triton_interpreter_on
from .kernels import scale as scale_kernels
from .kernels import stats as stats_kernels
from .kernels import tables
from .lru import Lru
from .torch_backend import GroupStats

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_NORMS = (1.0, 2.0, math.inf)
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_PLAIN = {Tensor, torch.nn.Parameter}  # the tensor types a plan is built for (_fusable)
_DATA_PTR = Tensor.data_ptr
CHECK_CHUNK = 1024  # gradients per run of Plan.matches (see there)
_Chunk = tuple[int, int, tuple[int, ...], Any]  # start, stop, addresses, guard (or None)
try:  # the C++ tensor check torch.compile's guards use (dtype, device, shape, strides)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover (older or stripped torch builds)
    _TensorGuards = None


def supports(device: torch.device, dtype: torch.dtype, norm_type: float) -> bool:
    """True for fp32/bf16/fp16 groups and p in {1, 2, inf}, on CUDA (or CPU when interpreted)."""
    device = torch.device(device)
    runs_here = device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on())
    return runs_here and dtype in SUPPORTED_DTYPES and float(norm_type) in SUPPORTED_NORMS


def _check_group(grads: list[Tensor]) -> None:
    device, dtype = grads[0].device, grads[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton backend does not handle {dtype} gradients")
    for g in grads:
        if g.device != device or g.dtype != dtype:
            raise ValueError(
                "grads must share one device and dtype, got "
                f"{device}/{dtype} and {g.device}/{g.dtype}"
            )


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device`` (Triton uses the current CUDA device and stream)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _bump_versions(tensors: list[Tensor]) -> None:
    # Kernels write through raw pointers, which autograd cannot see; tell it.
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _split_dense(grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    dense, other = [], []
    for g in grads:
        (dense if tables.is_dense(g) else other).append(g)
    return dense, other


def _fused_stats_eager(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    dense = [g if tables.is_dense(g) else g.contiguous() for g in grads]
    cacheable = all(d is g for d, g in zip(dense, grads))
    with _on_device(grads[0].device):
        table = tables.table_for(dense, kernels.block_size(), cache=cacheable)
        return stats_kernels.group_stats(table, norm_type)


def _check_writable(grads: list[Tensor]) -> None:
    """Refuse, before anything is written, a gradient that in-place ops cannot write."""
    for i, g in enumerate(grads):
        if not tables.is_dense(g) and torch._debug_has_internal_overlap(g) == 1:
            raise RuntimeError(
                f"gradient {i} of the group (shape {tuple(g.shape)}, stride {g.stride()}) has "
                "elements that share memory (an expanded view); it cannot be scaled or "
                "clamped in place. No gradient was modified"
            )


def _scale_eager(grads: list[Tensor], coef: Tensor) -> None:
    _check_writable(grads)
    dense, other = _split_dense(grads)
    if dense:
        with _on_device(coef.device):
            scale_kernels.scale_(tables.table_for(dense, kernels.block_size()), coef)
        _bump_versions(dense)
    if other:
        # Same rule as the kernel, decided on the device: coef >= 1 leaves values as they are.
        effective = torch.where(coef >= 1.0, torch.ones_like(coef), coef)
        for g in other:
            g.mul_(effective)


def _clamp_eager(grads: list[Tensor], clip_value: float) -> None:
    _check_writable(grads)
    dense, other = _split_dense(grads)
    if dense:
        with _on_device(grads[0].device):
            scale_kernels.clamp_(tables.table_for(dense, kernels.block_size()), clip_value)
        _bump_versions(dense)
    for g in other:
        g.clamp_(min=-clip_value, max=clip_value)


def zero_where_(grads: list[Tensor], flag: Tensor, foreach: bool | None = None) -> None:
    """Set each gradient of a same-device, same-dtype list to 0 in place where the 0-d
    bool tensor ``flag`` is true; decided on the device (no sync), nothing written when
    it is false."""
    _check_group(grads)
    _check_writable(grads)
    flag = flag.to(grads[0].device, torch.bool).reshape(())
    dense, other = _split_dense(grads)
    if dense:
        with _on_device(flag.device):
            scale_kernels.zero_where_(tables.table_for(dense, kernels.block_size()), flag)
        _bump_versions(dense)
    for g in other:
        g.masked_fill_(flag, 0)


# torch.compile cannot trace Triton launches over raw pointer tables (nor the interpreter):
# while compiling, the same work goes through opaque custom ops with shape-only fake
# implementations. Eager calls skip the op layer and its dispatch overhead.


@torch.library.custom_op("fastgradstats::triton_group_stats", mutates_args=())
def _group_stats_op(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    floats, counts = _fused_stats_eager(grads, norm_type)
    return floats, counts


@_group_stats_op.register_fake
def _(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    n = len(grads)
    return (
        grads[0].new_empty((2, n), dtype=torch.float32),
        grads[0].new_empty((2, n), dtype=torch.int64),
    )


@torch.library.custom_op("fastgradstats::triton_scale_", mutates_args=("grads",))
def _scale_op(grads: list[Tensor], coef: Tensor) -> None:
    _scale_eager(grads, coef)


@_scale_op.register_fake
def _(grads: list[Tensor], coef: Tensor) -> None:
    return None


@torch.library.custom_op("fastgradstats::triton_clamp_", mutates_args=("grads",))
def _clamp_op(grads: list[Tensor], clip_value: float) -> None:
    _clamp_eager(grads, clip_value)


@_clamp_op.register_fake
def _(grads: list[Tensor], clip_value: float) -> None:
    return None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _fused_stats(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    _check_group(grads)
    if _compiling():
        return _group_stats_op(grads, float(norm_type))
    return _fused_stats_eager(grads, norm_type)


def group_norms(grads: list[Tensor], norm_type: float, foreach: bool | None = None) -> Tensor:
    """Per-tensor ``norm_type``-norms of a same-device, same-dtype list, float32 [n].

    ``foreach`` is accepted for the contract and ignored (the kernel is always fused).
    """
    if float(norm_type) not in SUPPORTED_NORMS:
        return torch_backend.group_norms(grads, norm_type, foreach)
    floats, _ = _fused_stats(grads, norm_type)
    return floats[0]


def group_stats(grads: list[Tensor], norm_type: float, foreach: bool | None = None) -> GroupStats:
    """Per-tensor p-norm, max |g|, NaN and Inf counts (each [n]) in one read of the group."""
    if float(norm_type) not in SUPPORTED_NORMS:
        return torch_backend.group_stats(grads, norm_type, foreach)
    floats, counts = _fused_stats(grads, norm_type)
    return GroupStats(floats[0], floats[1], counts[0], counts[1])


def group_histogram(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor |g| histograms of one group: a read of its own, one launch per table
    segment (dense layouts read in place, others through a copy). Returns int64
    ``[n, NUM_BINS]`` counts and int64 ``[n]`` zero counts."""
    from .kernels.histogram import group_histogram_triton

    dense = [g if tables.is_dense(g) else g.contiguous() for g in grads]
    cacheable = all(d is g for d, g in zip(dense, grads))
    table = tables.table_for(dense, kernels.block_size(), cache=cacheable)
    with _on_device(grads[0].device):
        return group_histogram_triton(table)


def scale_(grads: list[Tensor], coef: Tensor, foreach: bool | None = None) -> None:
    """Multiply each gradient in place by the 0-d device tensor ``coef`` (float32 math).

    Nothing is read or written when ``coef >= 1``; a NaN ``coef`` is applied. The decision
    is taken on the device: no host sync.
    """
    _check_group(grads)
    device = grads[0].device
    if not isinstance(coef, Tensor):
        coef = torch.tensor(float(coef), dtype=torch.float32)
    if coef.numel() != 1:
        raise ValueError(f"coef must hold a single number, got shape {tuple(coef.shape)}")
    coef = coef.to(device).reshape(())
    if _compiling():
        _scale_op(grads, coef)
    else:
        _scale_eager(grads, coef)


def clamp_(grads: list[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """Clamp each gradient in place to ``[-clip_value, clip_value]`` (NaN stays NaN)."""
    _check_group(grads)
    if _compiling():
        _clamp_op(grads, float(clip_value))
    else:
        _clamp_eager(grads, float(clip_value))


# --- fused calls: a plan per gradient layout, 2 launches per segment + 1 ----------------
#
# The public functions (core) take this path when every gradient is a dense fp32/bf16/fp16
# tensor on one device and Triton handles them all. The plan (table, workspace) is cached
# per layout; a call then costs: stats (one launch per segment), finalize (one launch:
# per-tensor results, total norm, clip coefficient), and, when clipping, scale (one launch
# per segment). No torch op runs between them; the only torch calls are ``torch.empty`` for
# the tensors handed back to the caller.


@dataclass
class Workspace:
    """Scratch buffers a plan's launches write and read back; stream-ordered, reused."""

    partials: Tensor  # float32 [4, max(num_blocks, 1)]
    floats: Tensor  # float32 [2, n]: per-tensor results nobody asked for
    counts: Tensor  # int64 [2, n]
    ticket: Tensor  # int32 [1], 0 between calls (the finalize resets it)
    # (norm_type, stats, tuning settings) -> the stats launches into ``partials``
    launches: dict[tuple, list] = field(default_factory=dict)


def _workspace(table: tables.TensorTable) -> Workspace:
    device, n = table.device, table.n_tensors
    return Workspace(
        torch.empty((stats_kernels.N_PARTIALS, max(table.num_blocks, 1)), device=device),
        torch.empty((2, n), device=device),
        torch.empty((2, n), dtype=torch.int64, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
    )


@dataclass
class Plan:
    """Everything a fused call needs that depends only on the gradients' layout."""

    table: tables.TensorTable
    ptrs: tuple[int, ...]
    numels: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    result_dtype: torch.dtype  # promoted gradient dtype: the dtype of the returned total
    device: torch.device
    workspaces: dict[Any, Workspace] = field(default_factory=dict)
    numel_list: list[int] = field(default_factory=list)
    _names: list[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    pinned: bool = False  # used under CUDA-graph capture: kept for the process's life
    # (start, stop, addresses, TensorGuards or None) per run of CHECK_CHUNK gradients
    chunks: list[_Chunk] = field(default_factory=list)
    _scale: dict[tuple, list] = field(default_factory=dict)  # tuning -> scale launches

    def stats_launches(self, ws: Workspace, norm_type: float, stats: bool) -> list:
        """The stats launches of this plan into ``ws`` (made once per setting: a steady
        call builds no argument tuple and looks up no config)."""
        key = (norm_type, stats, kernels.tuning())
        launches = ws.launches.get(key)
        if launches is None:
            launches = stats_kernels.stats_launches(self.table, ws.partials, norm_type, stats)
            ws.launches[key] = launches
        return launches

    def scale_launches(self) -> list:
        """The scale launches of this plan (made once per setting)."""
        key = kernels.tuning()
        launches = self._scale.get(key)
        if launches is None:
            launches = self._scale[key] = scale_kernels.scale_launches(self.table)
        return launches

    @property
    def position_names(self) -> list[str]:
        """``["0", "1", ...]``: the names of unnamed gradients (shared; do not mutate)."""
        if self._names is None:
            self._names = [str(i) for i in range(self.table.n_tensors)]
        return self._names

    def matches(self, grads: list[Tensor]) -> bool:
        """Same addresses, and every gradient's dtype, size and density unchanged behind
        them: a gradient that became bf16 at the same address and size must not be read
        (and scaled) as fp32. ``False`` too for a ``None`` or non-tensor item.

        One walk in runs of :data:`CHECK_CHUNK` gradients: each run's addresses, then
        its C++ layout check (``guard``: torch.compile's tensor check of type, dtype,
        device, shape and strides) while the run's tensors are still in cache. Checked
        as two whole-list passes, the second misses the cache at 10,000 tensors and the
        pair costs about a third more. Where the guard is missing or refuses (a dispatch
        mode or grad-mode state other than at build, a new stride order), a Python walk
        decides: sizes, dtypes, and :func:`tables.is_dense` (what the kernels need).
        """
        if len(grads) != len(self.ptrs):
            return False
        try:
            for start, stop, ptrs, guard in self.chunks:
                part = grads if stop - start == len(grads) else grads[start:stop]
                if tuple(map(_DATA_PTR, part)) != ptrs:
                    return False
                checked = guard is not None and guard.check(*part)
                if not checked and not self._same_layout(part, start, stop):
                    return False
        except (AttributeError, TypeError, RuntimeError):  # None, DTensor, not a tensor
            return False
        return True

    def _same_layout(self, part: list[Tensor], start: int, stop: int) -> bool:
        # what the guard checks and the kernels need: plain tensors on the plan's device,
        # the same sizes and dtypes, dense
        return (
            set(map(type, part)) <= _PLAIN
            and set(map(_DEVICE, part)) == {self.device}
            and tuple(map(Tensor.numel, part)) == self.numels[start:stop]
            and tuple(map(_DTYPE, part)) == self.dtypes[start:stop]
            and all(map(tables.is_dense, part))
        )

    def prepare(self) -> Any:
        """Before this call's launches: pin the plan when a CUDA graph is being captured
        (the graph keeps raw pointers to its table and workspace), and order the table's
        H2D copy before the current stream's launches (``TensorTable.order_on``). Returns
        the current stream's handle (``None`` off CUDA): the key of its workspace."""
        if not self.pinned and tables.capturing(self.device):
            _pin(self)
        stream = tables.current_stream(self.device)
        if stream is None:
            return None  # CPU (the interpreter): launches run in the caller; see ``lock``
        self.table.order_on(stream)
        return stream.cuda_stream

    def workspace(self, key: Any = None) -> Workspace:
        """The workspace of stream ``key`` (from :meth:`prepare`): CUDA launches on one
        stream are ordered, so reuse is safe; another stream gets its own. Made on the
        first call on a stream, e.g. the warm-up before a CUDA graph capture."""
        ws = self.workspaces.get(key)
        if ws is None:
            with _plans_lock:
                ws = self.workspaces.get(key)
                if ws is None:
                    ws = self.workspaces[key] = _workspace(self.table)
        return ws

    @property
    def lock(self) -> threading.Lock:
        """Held across one call's stats and finalize launches, on every device: two
        threads on one stream share its workspace, and their launches must not interleave
        (stats A, stats B, finalize A would reduce B's partials). On CUDA it orders the
        enqueueing; the stream then runs each call's launches back to back."""
        return self._lock


PLAN_CACHE_SIZE = 32  # keys: two per layout (see plan_for), so 16 layouts
_plans = Lru(PLAN_CACHE_SIZE)  # key -> Plan, or the addresses of a list that cannot fuse
_pinned_plans: list[Plan] = []  # used under CUDA-graph capture; never evicted nor cleared
_plans_lock = threading.Lock()  # the pinned list and the plans' workspaces
plan_stats = {"hits": 0, "builds": 0}


def _fusable(grads: list[Tensor]) -> bool:
    device = grads[0].device
    if not (device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on())):
        return False
    for g in grads:
        if type(g) not in _PLAIN or g.device != device:
            return False
        if g.dtype not in SUPPORTED_DTYPES or g.layout != torch.strided or not tables.is_dense(g):
            return False
    return True


def guard_for(grads: list[Tensor]) -> Any:
    """torch.compile's C++ tensor check for ``grads`` (it keeps no reference to them), or
    ``None`` where this torch has no such check: ``Plan.matches`` then walks in Python."""
    if _TensorGuards is None:
        return None
    try:
        guard = _TensorGuards(*grads, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        # It refuses a tensor passed twice (aliasing), whatever its layout: such lists
        # (and any other it would refuse at once) take the Python walk.
        return guard if guard.check(*grads) else None
    except Exception:  # another signature in another torch: the Python walk is as right
        return None


def _check_chunks(grads: list[Tensor], ptrs: tuple[int, ...]) -> list[_Chunk]:
    return [
        (start, min(start + CHECK_CHUNK, len(grads)), ptrs[start : start + CHECK_CHUNK],
         guard_for(grads[start : start + CHECK_CHUNK]))
        for start in range(0, len(grads), CHECK_CHUNK)
    ]  # fmt: skip


def build_plan(grads: list[Tensor]) -> Plan | None:
    """A plan for ``grads``, or ``None`` when they cannot take the fused path."""
    if not grads or not _fusable(grads):
        return None
    device = grads[0].device
    dtypes = [g.dtype for g in grads]
    result = dtypes[0]
    for d in set(dtypes):
        result = torch.promote_types(result, d)
    numels = [g.numel() for g in grads]
    with _on_device(device):
        table = tables.build(
            device, kernels.block_size(), [g.data_ptr() for g in grads], numels, dtypes
        )
    ptrs = tuple(g.data_ptr() for g in grads)
    return Plan(table, ptrs, tuple(numels), tuple(dtypes), result, device,
                numel_list=numels, chunks=_check_chunks(grads, ptrs))  # fmt: skip


def _key(n: int, first: int, last: int) -> tuple:
    # The list's length and end addresses and the tiling settings (a table depends on
    # them): cheap to form, and ``Plan.matches`` checks the rest (see ``plan_for`` for
    # lists that agree here and differ inside).
    return (n, first, last, kernels.BLOCK, kernels.TILE)


def cached_plan(grads: list[Tensor]) -> Plan | None:
    """The cached plan of ``grads`` when every gradient's address and layout are those it
    was built for (the steady state: one chunked walk, no hash of the addresses), else
    ``None`` (a miss, a ``None`` or non-tensor item, a list that cannot fuse)."""
    try:
        key = _key(len(grads), grads[0].data_ptr(), grads[-1].data_ptr())
    except (AttributeError, TypeError, RuntimeError, IndexError):
        return None
    entry = _plans.get(key)
    if type(entry) is Plan and entry.matches(grads):
        plan_stats["hits"] += 1
        return entry
    return None


def _lookup(key: tuple, ptrs: tuple[int, ...], grads: list[Tensor]) -> tuple[bool, Plan | None]:
    """``(True, plan)`` when the entry under ``key`` is the plan of ``grads``, or
    ``(True, None)`` when it says they cannot be fused; ``(False, None)`` otherwise.
    Checked outside the cache's lock: a walk of 10,000 gradients must not serialize
    threads."""
    entry = _plans.get(key)
    if entry is None:
        return False, None
    if type(entry) is tuple:  # the addresses of a list that could not be fused
        return entry == ptrs, None
    return (True, entry) if entry.matches(grads) else (False, None)


def plan_for(ptrs: tuple[int, ...], grads: list[Tensor]) -> Plan | None:
    """The cached plan for ``grads`` (non-empty; ``ptrs`` their addresses) after checking
    every address and layout, else a new one; ``None`` when the gradients cannot be
    fused (remembered too, by their addresses).

    The check is every gradient's address, dtype, size and density (a caching allocator
    reusing a block, or a flat gradient buffer, can put a gradient of another dtype
    behind the same address and size; ``p.grad = buf[:, ::2]`` has the address and size
    of a dense gradient), see ``Plan.matches``.

    Each plan is cached under two keys: its head (length, end addresses: what
    :func:`cached_plan` looks up without hashing every address) and its head plus the
    hash of every address. Lists that share a head (the same count and end gradients,
    others in between) then keep a plan each, as when they alternate; the head points
    at the one used last.

    Called under CUDA-graph capture, a plan it builds is pinned and not cached (its table
    is filled by the graph's copy, at replay only).
    """
    head = _key(len(ptrs), ptrs[0], ptrs[-1])
    hit, plan = _lookup(head, ptrs, grads)
    if hit:
        plan_stats["hits"] += 1
        return plan
    full = (*head, hash(ptrs))  # every address hashed only when the head did not do
    hit, plan = _lookup(full, ptrs, grads)
    if hit:
        plan_stats["hits"] += 1
        if plan is not None:
            _plans.put(head, plan)  # the next steady call finds it by its head
        return plan
    plan = build_plan(grads)
    if plan is not None and tables.capturing(plan.device):
        # Built under capture: its table is filled by the graph's copy, at replay only.
        # The graph owns it (pinned); eager calls must not find it in the cache.
        _pin(plan)
        return plan
    plan_stats["builds"] += 1
    _plans.put(full, plan if plan is not None else ptrs)
    _plans.put(head, plan if plan is not None else ptrs)
    return plan


def _pin(plan: Plan) -> None:
    """Keep ``plan`` (its table, its workspaces) for the life of the process: a CUDA graph
    captured with it replays its raw pointers; the LRU must not free them."""
    with _plans_lock:
        if not plan.pinned:
            _pinned_plans.append(plan)
            plan.pinned = True


def clear_plans() -> None:
    """Forget every cached plan (and reset ``plan_stats``). Plans used under CUDA-graph
    capture stay alive (their graphs may still be replayed), out of the cache."""
    _plans.clear()
    plan_stats["hits"] = 0
    plan_stats["builds"] = 0


@dataclass
class FusedResult:
    """What a fused stats/finalize pass hands back (device tensors, nothing synced)."""

    total: Tensor  # 0-d, result dtype, rounded as torch.nn.utils rounds it
    exact_total: Tensor  # 0-d float32: total of the float32 per-tensor norms
    floats: Tensor  # float32 [2, n]: per-tensor p-norm, max |g|
    counts: Tensor  # int64 [2, n]: NaN, Inf counts
    coef: Tensor | None  # 0-d float32 clip coefficient (clip calls)
    workspace: Workspace
    histogram: Tensor | None = None  # int64 [n, NUM_BINS] (``histogram=True``)
    zero_count: Tensor | None = None  # int64 [n] (``histogram=True``)


def run_fused(
    plan: Plan, norm_type: float, *, stats: bool, max_norm: float | None, histogram: bool = False
) -> FusedResult:
    """Stats launches + one finalize: per-tensor results, total and (with ``max_norm``)
    the clip coefficient, all computed on the device. ``histogram``: the stats launches
    also bin every element into zero-filled int64 ``[n, NUM_BINS]`` counts (same read)."""
    device, n = plan.device, plan.table.n_tensors
    ws = plan.workspace(plan.prepare())
    total = torch.empty((), dtype=plan.result_dtype, device=device)
    scalars = torch.empty(2, device=device)  # exact total, clip coefficient: handed back
    if stats:
        floats = torch.empty((2, n), device=device)
        counts = torch.empty((2, n), dtype=torch.int64, device=device)
    else:
        floats, counts = ws.floats, ws.counts
    exact_total, coef = scalars.unbind(0)
    clip = max_norm is not None
    bins: tuple[Tensor, Tensor] | None = None
    if histogram:
        bins = (
            torch.zeros((n, NUM_BINS), dtype=torch.int64, device=device),
            torch.zeros(n, dtype=torch.int64, device=device),
        )
    with _on_device(device), plan.lock:
        if bins is None:
            stats_kernels.replay_stats(plan.stats_launches(ws, norm_type, stats))
        else:  # new output tensors every call: nothing to keep
            stats_kernels.launch_stats(plan.table, ws.partials, norm_type, stats, bins)
        stats_kernels.launch_finalize(
            plan.table,
            ws.partials,
            floats,
            counts,
            norm_type,
            stats,
            stats_kernels.FINISH_CLIP if clip else stats_kernels.FINISH_TOTAL,
            total,
            exact_total,
            coef,
            ws.ticket,
            max_norm if clip else 0.0,
        )
    hist, zeros = bins if bins is not None else (None, None)
    return FusedResult(total, exact_total, floats, counts, coef if clip else None, ws, hist, zeros)


def scale_fused(plan: Plan, coef: Tensor, grads: list[Tensor]) -> None:
    """Scale every gradient of ``plan`` by the device coefficient (no write when >= 1)."""
    plan.prepare()
    with _on_device(plan.device):
        scale_kernels.replay_scale(plan.scale_launches(), coef)
    _bump_versions(grads)


def zero_fused(plan: Plan, flag: Tensor, grads: list[Tensor]) -> None:
    """Zero every gradient of ``plan`` where the 0-d bool device ``flag`` is set."""
    plan.prepare()
    with _on_device(plan.device):
        scale_kernels.zero_where_(plan.table, flag.to(plan.device, torch.bool).reshape(()))
    _bump_versions(grads)


__all__ = [
    "FusedResult",
    "Plan",
    "build_plan",
    "cached_plan",
    "clamp_",
    "clear_plans",
    "group_norms",
    "group_stats",
    "guard_for",
    "plan_for",
    "run_fused",
    "scale_",
    "scale_fused",
    "supports",
    "zero_fused",
    "zero_where_",
]
