"""Gradient statistics measured DURING backward, so that after backward only a finalize
remains (issue 18, the parameter-hook source on the torch path).

:func:`backward_stats` registers a post-accumulate-grad hook on every parameter that
requires grad. Parameters are grouped into buckets (about 25 MB, in reverse registration
order: the order backward produces them); when every tensor of a bucket has fired, the
bucket is measured once (:func:`_measure_bucket`, ONE call per bucket) and the results are
written into per-tensor slots on the device (``index_copy_``, no host sync). Buckets left
incomplete when backward ends (parameters that got no gradient in this backward) are
measured by an end-of-backward callback, for the tensors that fired.

A tensor measured again (gradient accumulation) overwrites its slot, so the last firing
wins. :meth:`BackwardStats.finalize` checks, for each gradient, that its slot is fresh:
measured since the last finalize, from the same gradient tensor (identity) at the same
version counter. Anything else (never measured, rescaled in place, replaced) is measured
again there ("catch-up", counted in ``GradStats.catchup_tensors``).

``DistributedDataParallel`` models take another source of "this gradient is final": the
handle registers DDP's comm hook, which all-reduces each bucket (torch's ``allreduce_hook``
or the user's hook) and measures the reduced bucket in the future's callback; the
gradients are recorded for the freshness check by a callback queued after DDP's own
end-of-backward callback (the one that copies the buckets into ``.grad``).

DTensor parameters (FSDP2 ``fully_shard``, tensor parallel) keep the parameter hooks:
FSDP2 calls them on the sharded parameters after its reduce-scatter (and after adding a
micro-step into the shard). Each rank measures its local shards; finalize reduces the
packed per-tensor partials across ranks once (``sharding.localize`` and
``Sharding.reduce_stats``, the after-backward path's reduction) into the statistics of the
full parameters. Measured on the torch path.

The seam to the measurement is :func:`_measure_bucket` alone: it takes a bucket's
gradients and returns their :class:`~fastgradstats.torch_backend.GroupStats`; everything
else here is bookkeeping.

The Triton path (parameter-hook source, when ``fastgradstats.dispatch`` would pick Triton
for these parameters: CUDA, or ``FASTGRADSTATS_BACKEND=triton`` with the interpreter; every
parameter fp32/bf16/fp16 on one device; p in {1, 2, inf}) keeps no per-tensor slots: each
completed bucket is one stats launch per dtype into its columns of one model-wide partials
buffer, and finalize is ONE finalize launch (per-tensor results, total, clip coefficient);
see :mod:`fastgradstats.backward_triton`. Catch-up there launches the stats of the stale
tensors only (one launch per run of them in a bucket, per dtype); a gradient the kernels
cannot read in place (non-dense, another device) sends that finalize to the torch path
for every tensor.
"""

from __future__ import annotations

import itertools
import operator
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from . import core, dispatch, engine, inputs, sharding
from .env import triton_interpreter_on
from .stats import GradStats, empty_stats
from .torch_backend import GroupStats, acc_dtype, host_to_device

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
# warn when more than half of the tensors are caught up on this many consecutive steps
CATCHUP_WARN_STEPS = 3

# C-level per-tensor accessors: the walks below cost a map() per field, not a Python loop
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_LAYOUT = operator.attrgetter("layout")
_DEREF = weakref.ref.__call__
_DTYPE = operator.attrgetter("dtype")
_STRIDED = {torch.strided}


class _Gone:
    pass


_DEAD = weakref.ref(_Gone())  # a reference that is dead already: "never measured"


def _measure_bucket(grads: list[Tensor], norm_type: float) -> GroupStats:
    """Per-tensor norm, max |g|, NaN and Inf counts of one bucket's gradients (the seam).

    Today the torch path: the same ``core.measure`` the after-backward path runs,
    so each tensor's results are bit-identical to it (every statistic is per tensor).
    Results are [len(grads)], accumulation dtype, on ``grads[0]``'s device.
    """
    groups = core.group(grads)
    stats, _ = core.measure(groups, len(grads), norm_type, "torch", None, full=True)
    return stats  # type: ignore[return-value]  # full=True: a GroupStats


def _triton_slots(
    params: list[Tensor],
    ranges: list[tuple[int, int]],
    norm_type: float,
    backend: str | None,
    side_stream: bool = False,
) -> Any:
    """The Triton path's partials for ``params`` (``None``: the torch path); with
    ``side_stream``, a ``ValueError`` when that is the torch path (only Triton has one)."""
    slots = _pick_triton_slots(params, ranges, norm_type, backend, side_stream)
    if side_stream and slots is None:
        raise ValueError(
            "side_stream=True needs the Triton path (parameter hooks, CUDA parameters "
            "of fp32/bf16/fp16 on one device, p in {1, 2, inf}, backend not 'torch'); "
            "these parameters are measured on the torch path"
        )
    return slots


def _pick_triton_slots(
    params: list[Tensor],
    ranges: list[tuple[int, int]],
    norm_type: float,
    backend: str | None,
    side_stream: bool,
) -> Any:
    """The Triton path's partials for ``params`` when dispatch would pick Triton for their
    gradients (as ``core.fused`` decides: CUDA, or ``FASTGRADSTATS_BACKEND=triton`` with
    the interpreter on the CPU) and the kernels handle them all; else ``None`` (torch)."""
    if not params:
        return None
    requested = dispatch.requested_backend(backend)
    device = params[0].device
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return None
    if not (device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on())):
        return None
    if dispatch.triton_module() is None:
        return None
    from . import backward_triton

    if not backward_triton.usable(params, norm_type):
        return None
    return backward_triton.TritonSlots(params, ranges, norm_type, side_stream)


def _loaded_class(module: str, name: str) -> type | None:
    """``module.name`` when that module is imported already, else ``None``: an instance
    of a class whose module nobody imported cannot exist, and importing torch.distributed
    modules here would cost seconds on a handle's first use."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _is_ddp(model: torch.nn.Module) -> bool:
    ddp = _loaded_class("torch.nn.parallel.distributed", "DistributedDataParallel")
    return ddp is not None and isinstance(model, ddp)


def _refuse_distributed(model: torch.nn.Module, source: str) -> None:
    """Refuse the models whose post-accumulate hooks do not see the final gradient."""
    if _is_ddp(model) and source == "params":
        raise ValueError(
            "backward_stats(model, source='params'): model is a DistributedDataParallel; the "
            "parameter hooks would see each rank's unreduced gradient (the all-reduce runs "
            "after them), and gradient_as_bucket_view=True writes through views without "
            "bumping version counters. Use source='comm_hook' (the default for DDP): the "
            "statistics are then measured on each all-reduced bucket"
        )
    if not _is_ddp(model) and source == "comm_hook":
        raise ValueError(
            f"backward_stats(model, source='comm_hook') needs a DistributedDataParallel "
            f"model, got {type(model).__name__}"
        )
    fsdp = _loaded_class(
        "torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel"
    )
    if fsdp is not None and isinstance(model, fsdp):
        raise ValueError(
            "backward_stats(model): model is a FullyShardedDataParallel (FSDP1); its flat "
            "parameters' hooks do not see the reduced, unflattened gradients. Call "
            "fastgradstats.grad_stats / clip_grad_norm_ after backward instead"
        )


def _is_dtensor(t: Tensor) -> bool:
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(t, dtensor)


def _check_source(model: Any, source: str, comm_hook: Any) -> str:
    """The gradient source for ``model`` (``auto`` resolved), refusing what cannot work."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if source not in ("auto", "params", "comm_hook"):
        raise ValueError(f"source must be 'auto', 'params' or 'comm_hook', got {source!r}")
    if source == "auto":
        source = "comm_hook" if _is_ddp(model) else "params"
    _refuse_distributed(model, source)
    if comm_hook is not None and source != "comm_hook":
        raise ValueError("comm_hook= is for a DistributedDataParallel model only")
    if comm_hook is not None and not callable(comm_hook):
        raise TypeError(f"comm_hook must be callable, got {type(comm_hook).__name__}")
    if source == "comm_hook" and model._comm_hooks:
        raise ValueError(
            "backward_stats(ddp): this DDP model has a comm hook registered already, and "
            "DDP takes one; pass yours instead, as backward_stats(ddp, "
            "comm_hook=hook, comm_state=state): it runs first, then the measurement"
        )
    return source


def _trainable_parameters(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of every parameter that requires grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _local_grad(param: Tensor) -> Tensor | None:
    """``param.grad``, or its local shard when it is a DTensor. FSDP2 accumulates a
    micro-step into ``grad._local_tensor`` in place, which bumps the shard's version
    counter and not the DTensor's: the freshness check must follow the shard."""
    g = param.grad
    return g._local_tensor if g is not None and _is_dtensor(g) else g


def _check_options(bucket_bytes: Any, scaler: Any, side_stream: Any) -> None:
    if not isinstance(side_stream, bool):
        raise TypeError(f"side_stream must be a bool, got {type(side_stream).__name__}")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int):
        raise TypeError(f"bucket_bytes must be an int, got {bucket_bytes!r}")
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    if scaler is not None and not hasattr(scaler, "_per_optimizer_states"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def _bucket_ranges(params: list[Tensor], bucket_bytes: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` index ranges of about ``bucket_bytes`` each, last first."""
    n = len(params)
    ranges: list[tuple[int, int]] = []
    size, hi = 0, n
    for i in reversed(range(n)):
        nbytes = params[i].numel() * params[i].element_size()
        if i < n - 1 and size + nbytes > bucket_bytes:
            ranges.append((i + 1, hi))
            size, hi = 0, i + 1
        size += nbytes
    if n:
        ranges.append((0, hi))
    return ranges


class BackwardStats:
    """Statistics of a model's gradients measured during backward; see :func:`backward_stats`.

    Use as a context manager (or call :meth:`remove`) to unregister the hooks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        norm_type: float | str = 2.0,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        scaler: Any = None,
        source: str = "auto",
        comm_hook: Any = None,
        comm_state: Any = None,
        backend: str | None = None,
        side_stream: bool = False,
    ) -> None:
        source = _check_source(model, source, comm_hook)
        dispatch.requested_backend(backend)  # a bad name: ValueError before any hook
        self.source = source
        self.norm_type = inputs.check_norm_type(norm_type)
        _check_options(bucket_bytes, scaler, side_stream)
        named = _trainable_parameters(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # DTensor parameters (FSDP2, tensor parallel): each rank measures its local shards
        # (FSDP2 calls the post-accumulate hooks after its reduce-scatter); finalize
        # all-reduces the packed per-tensor partials once, as the after-backward path does
        self._sharded = any(map(_is_dtensor, self.params))
        if self._sharded:
            sharding.require_initialized("backward_stats on DTensor parameters")
        self._read = _local_grad if self._sharded else _GRAD
        self.bucket_bytes = bucket_bytes
        self.scaler = scaler
        self._unscaled_here: set[int] = set()  # id(optimizer) unscaled through unscale_
        n = len(self.params)
        self._numels = [p.numel() for p in self.params]  # torch keeps .grad the param's shape
        # buckets in reverse registration order: backward produces the last layers first.
        # Each bucket is a contiguous range [lo, hi) of parameter indices, so its slots'
        # bookkeeping is a few slice assignments.
        self._ranges = _bucket_ranges(self.params, bucket_bytes)
        self._buckets = [list(range(lo, hi)) for lo, hi in self._ranges]
        self._bucket_of = [0] * n
        for b, members in enumerate(self._buckets):
            for i in members:
                self._bucket_of[i] = b
        # the slots: per-tensor results on the first parameter's device, in the accumulation
        # dtype of the whole model (as the after-backward path accumulates)
        self._device = self.params[0].device if n else torch.device("cpu")
        self._acc = (
            torch.float64
            if any(acc_dtype(p.dtype) == torch.float64 for p in self.params)
            else torch.float32
        )
        self._bucket_index = [
            host_to_device(members, torch.int64, self._device) for members in self._buckets
        ]
        self._new_slots()
        # the Triton path's model-wide partials (None: the torch path's slots above)
        eligible = source == "params" and not self._sharded
        params = self.params if eligible else []  # [] -> None: the torch path
        self._triton = _triton_slots(params, self._ranges, self.norm_type, backend, side_stream)
        # freshness: slot i was measured from the gradient _ref[i]() at version _version[i]
        # (version -1: not measured since the last finalize; _DEAD: never, or unreadable)
        self._ref: list[Any] = [_DEAD] * n
        self._version = [-1] * n
        # firing: which tensors fired since their bucket was last measured
        self._fired = [False] * n
        self._left = [len(members) for members in self._buckets]
        self._callback_queued = False
        self._skipping = False
        self._bad_steps = 0
        self._warned = False
        self._removed = False
        if source == "comm_hook":
            self._handles = []
            self._install_comm_hook(model, comm_hook, comm_state)
        else:
            self._handles = [
                p.register_post_accumulate_grad_hook(self._hook(i))
                for i, p in enumerate(self.params)
            ]

    # --- the DDP source: measure each all-reduced bucket -------------------------------

    def _install_comm_hook(self, ddp: torch.nn.Module, hook: Any, state: Any) -> None:
        """Register a comm hook on ``ddp`` that all-reduces each bucket (the user's hook, or
        torch's ``allreduce_hook``) and measures the reduced bucket in the future's
        callback, before DDP copies it into the gradients."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        inner = hook if hook is not None else allreduce_hook
        inner_state = state if hook is not None else ddp.process_group
        index_of = {id(p): i for i, p in enumerate(self.params)}
        self._comm_measured: list[int] = []
        stats = self

        # no annotations: DDP inspects them (and, postponed, they are strings it refuses)
        def fastgradstats_comm_hook(_state, bucket):
            fut = inner(inner_state, bucket)
            if stats._skipping or stats._removed:
                return fut
            buffer = bucket.buffer()
            views = bucket.gradients()
            indices = [index_of[id(p)] for p in bucket.parameters()]
            layout = [
                (v.size(), v.stride(), v.storage_offset() - buffer.storage_offset()) for v in views
            ]
            stats._queue_comm_callback()

            def measure(done: Any) -> Tensor:
                reduced = done.value()
                if isinstance(reduced, (list, tuple)):
                    reduced = reduced[0]
                base = reduced.storage_offset()
                grads = [
                    reduced.as_strided(size, stride, base + off) for size, stride, off in layout
                ]
                with torch.no_grad():
                    result = _measure_bucket(grads, stats.norm_type)
                    index = host_to_device(indices, torch.int64, stats._device)
                    stats._write(index, result)
                stats._comm_measured.extend(indices)
                return reduced

            return fut.then(measure)

        ddp.register_comm_hook(state=None, hook=fastgradstats_comm_hook)

    def _queue_comm_callback(self) -> None:
        if self._callback_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._after_comm)
        except RuntimeError:  # not inside backward: nothing recorded, finalize catches up
            return
        self._callback_queued = True

    def _after_comm(self) -> None:
        # DDP queues the callback that copies the reduced buckets into .grad after the
        # first bucket is ready; record the gradients in a callback queued after it
        torch.autograd.Variable._execution_engine.queue_callback(self._record_comm)

    def _record_comm(self) -> None:
        self._callback_queued = False
        measured, self._comm_measured = self._comm_measured, []
        params, ref, version = self.params, self._ref, self._version
        for i in measured:
            g = params[i].grad
            if g is not None:
                ref[i] = weakref.ref(g)
                version[i] = g._version

    # --- during backward -------------------------------------------------------------

    def _new_slots(self) -> None:
        # empty: finalize reads only slots written since (measured, or caught up there).
        # Persistent (finalize hands copies over), so each bucket's four slot views are
        # made once: a bucket is then written with ONE _foreach_copy_.
        n, device = len(self.params), self._device
        self._floats = torch.empty((2, n), dtype=self._acc, device=device)  # norm, max |g|
        self._counts = torch.empty((2, n), dtype=torch.int64, device=device)  # NaN, Inf
        f, c = self._floats, self._counts
        self._bucket_views = [
            [f[0, lo:hi], f[1, lo:hi], c[0, lo:hi], c[1, lo:hi]] for lo, hi in self._ranges
        ]

    def _hook(self, index: int) -> Callable[[Tensor], None]:
        """The post-accumulate-grad hook of parameter ``index``: the per-tensor cost of the
        handle during backward, so a closure over what it reads (``_fired`` and ``_left``
        are updated in place, never rebound)."""
        fired, left, bucket = self._fired, self._left, self._bucket_of[index]
        measure = self._measure_range

        def on_grad(param: Tensor) -> None:
            if self._skipping:
                return
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if fired[index]:
                return  # already waiting in its bucket, which will read the newest gradient
            fired[index] = True
            remaining = left[bucket] - 1
            left[bucket] = remaining
            if remaining == 0:
                measure(bucket)

        return on_grad

    def _end_of_backward(self) -> None:
        """Measure what fired in buckets that did not complete (parameters without a
        gradient in this backward)."""
        self._callback_queued = False
        for b, members in enumerate(self._buckets):
            if self._left[b] == len(members):
                continue
            fired = [i for i in members if self._fired[i]]
            self._measure(fired, host_to_device(fired, torch.int64, self._device))
            self._left[b] = len(members)
        if self._triton is not None:  # later frees and writes of gradients wait for the
            self._triton.join()  # side stream's reads (no-op without one)
            self._triton.prepare_outputs()  # the step after backward allocates nothing

    def _measure_range(self, b: int) -> None:
        """Measure the complete bucket ``b`` into its slots (the steady state)."""
        if torch.is_grad_enabled():  # backward(create_graph=True): measure outside the graph
            with torch.no_grad():  # (not a decorator: a context object per bucket costs)
                return self._measure_range(b)
        lo, hi = self._ranges[b]
        grads = list(map(self._read, self.params[lo:hi]))
        self._left[b] = hi - lo
        if self._triton is not None:
            if self._triton.measure_steady(b, grads):  # the steady state, inline: per bucket
                self._fired[lo:hi] = itertools.repeat(False, hi - lo)
                self._ref[lo:hi] = map(weakref.ref, grads)
                self._version[lo:hi] = map(_VERSION, grads)
            else:
                self._measure_triton(b, grads)
            return
        if set(map(_LAYOUT, grads)) != _STRIDED:
            self._measure(self._buckets[b], self._bucket_index[b])
            return
        result = _measure_bucket(grads, self.norm_type)
        if result.norms.device != self._device:  # a model on several devices
            result = GroupStats(*(t.to(self._device) for t in result))
        # a bucket is a contiguous range of slots: one copy into its four slot views
        # (converting to the slots' dtype), not one op per field
        torch._foreach_copy_(self._bucket_views[b], list(result))
        # weak references: a zero_grad(set_to_none) must free the gradients
        self._ref[lo:hi] = map(weakref.ref, grads)
        self._version[lo:hi] = map(_VERSION, grads)
        self._fired[lo:hi] = itertools.repeat(False, hi - lo)

    def _measure_triton(
        self, b: int, grads: list[Tensor | None], wanted: list[bool] | None = None
    ) -> None:
        """Triton path: bucket ``b``'s gradients (every member, ``None`` where there is
        none; ``wanted``: only those) into their columns of the partials, one stats
        launch per dtype for a whole bucket."""
        assert self._triton is not None
        lo, hi = self._ranges[b]
        read = self._triton.measure_bucket(b, grads, wanted)
        if wanted is None and all(read):  # every gradient of the bucket read
            self._fired[lo:hi] = itertools.repeat(False, hi - lo)
            self._ref[lo:hi] = map(weakref.ref, grads)
            self._version[lo:hi] = map(_VERSION, grads)
            return
        for k, (i, g, r) in enumerate(zip(range(lo, hi), grads, read)):
            if wanted is None or wanted[k]:
                self._fired[i] = False
                self._ref[i] = weakref.ref(g) if r else _DEAD
                self._version[i] = g._version if r else -1

    @torch.no_grad()
    def _measure(self, indices: list[int], index: Tensor | None) -> None:
        """Measure the gradients of ``indices`` (all not None) into their slots (Triton
        path: one launch per run of them, per dtype, in each bucket's columns)."""
        if self._triton is not None:
            chosen = set(indices)
            for b in sorted({self._bucket_of[i] for i in indices}):
                lo, hi = self._ranges[b]
                wanted = [i in chosen for i in range(lo, hi)]
                self._measure_triton(b, list(map(_GRAD, self.params[lo:hi])), wanted)
            return
        assert index is not None
        self._measure_torch(indices, index)

    def _measure_torch(self, indices: list[int], index: Tensor) -> None:
        params, fired, read = self.params, self._fired, self._read
        for i in indices:
            fired[i] = False
        grads = [read(params[i]) for i in indices]
        if not all(g.layout == torch.strided for g in grads):
            # sparse gradients: left unmeasured, finalize refuses them with a clear error
            # (raising here would abort the user's backward)
            keep = [k for k, g in enumerate(grads) if g.layout == torch.strided]
            indices, grads = [indices[k] for k in keep], [grads[k] for k in keep]
            if not grads:
                return
            index = host_to_device(indices, torch.int64, self._device)
        result = _measure_bucket(grads, self.norm_type)
        self._write(index, result)
        ref, version = self._ref, self._version
        for i, g in zip(indices, grads):
            ref[i] = weakref.ref(g)  # weak: a zero_grad(set_to_none) must free the gradient
            version[i] = g._version

    def _write(self, index: Tensor, result: GroupStats) -> None:
        floats, counts = self._floats, self._counts
        floats.index_copy_(1, index, torch.stack((result.norms, result.max_abs)).to(floats))
        counts.index_copy_(1, index, torch.stack((result.nan_count, result.inf_count)).to(counts))

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside this block accumulate: measure nothing (an optimisation;
        the next backward outside it measures, and finalize catches up the tensors whose
        gradient changed without being measured again)."""
        previous = self._skipping
        self._skipping = True
        try:
            yield
        finally:
            self._skipping = previous

    # --- after backward ----------------------------------------------------------------

    def _is_fresh(self, i: int, g: Tensor) -> bool:
        return self._ref[i]() is g and g._version == self._version[i]

    @torch.no_grad()
    def unscale_(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        """``scaler.unscale_(optimizer)``, keeping the measured slots valid.

        torch's unscale (``_amp_foreach_non_finite_check_and_unscale_``) does not bump the
        gradients' version counters, so a plain ``scaler.unscale_(optimizer)`` between
        backward and finalize is invisible to the freshness check: call this instead. The
        slots of the optimizer's gradients are multiplied by the same ``1 / scale`` (exact
        for the power-of-two scales GradScaler uses, unless a value underflows to a
        subnormal); NaN/Inf counts are unchanged. No catch-up.
        """
        fresh = set()
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        ids = {id(p) for group in groups for p in group["params"]}
        read = self._read
        for i, p in enumerate(self.params):
            g = read(p)
            if id(p) in ids and g is not None and self._is_fresh(i, g):
                fresh.add(i)
        scaler.unscale_(optimizer)  # raises (nothing changed here) when already unscaled
        self._unscaled_here.add(id(optimizer))
        if not scaler.is_enabled() or not fresh:
            return
        inv_scale = scaler._scale.double().reciprocal().float()  # GradScaler's own rounding
        indices = sorted(fresh)
        if self._triton is not None:
            self._triton.unscale(indices, inv_scale)
            for i in indices:
                self._version[i] = read(self.params[i])._version
            return
        index = host_to_device(indices, torch.int64, self._device)
        factor = inv_scale.to(self._device, self._acc)
        floats = self._floats
        floats.index_copy_(1, index, floats.index_select(1, index) * factor)
        for i in indices:  # a device kernel that does bump the counter stays fresh too
            self._version[i] = read(self.params[i])._version

    def finalize(self) -> GradStats:
        """The :class:`GradStats` of the current gradients, from the slots.

        Tensors whose slot is not fresh are measured here (``catchup_tensors`` counts
        them); ``None`` gradients are left out, as ``grad_stats`` leaves them out. Every
        slot is stale afterwards: the next finalize needs a new backward (or catches up).
        """
        return self._finalize()[0]

    def _finalize(
        self, max_norm: float | None = None
    ) -> tuple[GradStats, inputs.GradList, Any, sharding.Sharding | None]:
        """:meth:`finalize`, also returning the gradients listed (for the clip; local
        shards of DTensors), on the Triton path the finalize launch's outputs
        (``backward_triton.Finished``: with ``max_norm``, the clip coefficient too; ``None``
        on the torch path), and for DTensor gradients how they were reduced across ranks.
        No ``torch.no_grad()`` (a few us): only the slots are read; catch-ups run in one."""
        self._callback_queued = False
        grads = list(map(self._read, self.params))
        try:
            versions = list(map(_VERSION, grads))  # AttributeError: a None gradient
        except AttributeError:
            versions = None
        if versions is not None:
            names, listed = self.names, None  # every parameter listed: the common case
            if versions == self._version and all(map(operator.is_, map(_DEREF, self._ref), grads)):
                stale = []
            else:
                stale = [i for i, g in enumerate(grads) if not self._is_fresh(i, g)]
        else:
            listed = [i for i, g in enumerate(grads) if g is not None]
            names = [self.names[i] for i in listed]
            stale = [i for i in listed if not self._is_fresh(i, grads[i])]
            grads = [grads[i] for i in listed]
        if self._unscaled_elsewhere():  # the unscale bumped no counter: trust no slot
            stale = list(range(len(self.params))) if listed is None else list(listed)
        for i in stale:  # fresh slots were measured, so their gradients are valid
            inputs.check_grad(self.params[i].grad, self.names[i])
        p = self.norm_type
        if not grads:
            stats = empty_stats(p)
            stats.catchup_tensors = 0
            self._reset_slots()
            return stats, inputs.GradList([], [], []), None, None
        if self._triton is not None:
            if stale:
                self._measure(stale, None)  # their own columns of the partials
            if not stale or not any(self._ref[i]() is not self.params[i].grad for i in stale):
                return self._finish_triton(stale, listed, names, grads, max_norm)
            # a gradient the kernels cannot read in place: the torch path, every tensor
            stale = list(range(len(self.params))) if listed is None else list(listed)
            self._measure_torch(stale, host_to_device(stale, torch.int64, self._device))
        elif stale:
            self._measure(stale, host_to_device(stale, torch.int64, self._device))
        self._count_catchup(len(stale), len(grads))
        params, floats, counts = self._slot_results(listed, grads)
        numels = list(self._numels) if listed is None else [self._numels[i] for i in listed]
        shards = None
        if self._sharded:
            reduced = self._reduce_across_ranks(listed, names, floats, counts, numels)
            floats, counts, numels, shards = reduced
        stats = GradStats(
            names=list(names),
            norms=floats[0],
            max_abs=floats[1],
            nan_count=counts[0],
            inf_count=counts[1],
            total_norm=core.total_norm(floats[0], p),
            _packed=(floats, counts),  # [2, n] blocks, as the fused path hands them over
            norm_type=p,
            numels=numels,
            catchup_tensors=len(stale),
        )
        self._reset_slots()
        # not kept on self: a zero_grad(set_to_none=True) must free the gradients
        return stats, inputs.GradList(stats.names, params, grads), None, shards

    def _slot_results(
        self, listed: list[int] | None, grads: list[Tensor]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """The listed parameters and copies of their slots: float [2, n] (norm, max |g|)
        and int64 [2, n] (NaN, Inf), in the dtype and on the device the after-backward
        path would give (accumulation dtype of these gradients, first gradient's device)."""
        floats, counts = self._floats, self._counts
        if listed is None:  # the slots stay the handle's
            return self.params, floats.clone(), counts.clone()
        index = host_to_device(listed, torch.int64, self._device)
        floats, counts = floats.index_select(1, index), counts.index_select(1, index)
        wide = torch.float64 in map(acc_dtype, map(_DTYPE, grads))
        device = grads[0].device
        floats = floats.to(device, torch.float64 if wide else torch.float32)
        return [self.params[i] for i in listed], floats, counts.to(device)

    def _reduce_across_ranks(
        self,
        listed: list[int] | None,
        names: list[str],
        floats: Tensor,
        counts: Tensor,
        numels: list[int],
    ) -> tuple[Tensor, Tensor, list[int], sharding.Sharding | None]:
        """DTensor gradients: the local shards' per-tensor results [2, n] -> those of the
        full parameters, their element counts, and the ``Sharding`` used: the after-backward
        path's reduction (one packed SUM and one MAX all-reduce per reduction group)."""
        params = self.params if listed is None else [self.params[i] for i in listed]
        shards = sharding.localize(inputs.GradList(list(names), params, list(map(_GRAD, params))))
        if shards is None:  # no DTensor among the listed gradients
            return floats, counts, numels, None
        local = GroupStats(floats[0], floats[1], counts[0], counts[1])
        full, numels = shards.reduce_stats(local, self.norm_type)
        floats = torch.stack((full.norms, full.max_abs))
        return floats, torch.stack((full.nan_count, full.inf_count)), numels, shards

    def _finish_triton(
        self,
        stale: list[int],
        listed: list[int] | None,
        names: list[str],
        grads: list[Tensor],
        max_norm: float | None,
    ) -> tuple[GradStats, inputs.GradList, Any, None]:
        """The Triton path's finish: ONE finalize launch over the partials (every slot is
        fresh); no gradient is read."""
        assert self._triton is not None
        self._count_catchup(len(stale), len(grads))
        done = self._triton.finalize(listed, max_norm)
        norms, max_abs, nan_count, inf_count = done.rows
        stats = GradStats(
            names=list(names),
            norms=norms,
            max_abs=max_abs,
            nan_count=nan_count,
            inf_count=inf_count,
            total_norm=done.exact_total,  # as the fused path's stats
            _packed=(done.floats, done.counts),
            norm_type=self.norm_type,
            clip_coef=done.coef,
            numels=list(self._numels) if listed is None else [self._numels[i] for i in listed],
            catchup_tensors=len(stale),
        )
        self._reset_slots()
        params = self.params if listed is None else [self.params[i] for i in listed]
        return stats, inputs.GradList(stats.names, params, grads), done, None

    def _unscaled_elsewhere(self) -> bool:
        """Did ``self.scaler`` unscale an optimizer's gradients not through :meth:`unscale_`
        since the last finalize (which leaves the slots holding the scaled values)?"""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return False
        from torch.amp.grad_scaler import OptState

        return any(
            state.get("stage") is OptState.UNSCALED and key not in self._unscaled_here
            for key, state in scaler._per_optimizer_states.items()
        )

    def _reset_slots(self) -> None:
        # Version -1 makes every slot stale. The weak references stay: freeing 10,000 of
        # them here and making them again in the next backward's hooks would cost both
        # sides (``weakref.ref(g)`` hands back g's live reference instead of a new one),
        # and a weak reference keeps no gradient alive.
        self._version = [-1] * len(self.params)
        self._unscaled_here = set()

    def _count_catchup(self, caught: int, total: int) -> None:
        self._bad_steps = self._bad_steps + 1 if 2 * caught > total else 0
        if self._bad_steps >= CATCHUP_WARN_STEPS and not self._warned:
            self._warned = True
            warnings.warn(
                f"backward_stats: more than half of the gradients ({caught} of {total}) were "
                f"measured again after backward on {self._bad_steps} consecutive steps "
                "(catch-up), so measuring during backward saves nothing. Causes: gradients "
                "changed in place after backward (scaling, clipping, a GradScaler unscale_ "
                "not done through BackwardStats.unscale_), replaced (p.grad = ...), or "
                "backward passes inside accumulating()",
                RuntimeWarning,
                stacklevel=3,
            )

    def finish(self, request: engine.Request) -> engine.Pass | None:
        """Finalize, then join the engine's line at the finish: torch's total, the fixed
        rule's coefficient (``request.max_norm``) and the apply (``Pass.apply_``).
        ``None`` when no parameter has a gradient. Used by ``GradMonitor(in_backward=True)``."""
        stats, grads, done, shards = self._finalize(request.max_norm)
        if not stats.names:
            return None
        if done is not None:  # Triton: the finalize launch computed the total and coefficient
            return engine.finished_fused(grads, stats, request, done.total, done.coef)
        return engine.finished(grads, stats, request, shards)

    @torch.no_grad()
    def clip_grad_norm_(
        self,
        max_norm: float,
        optimizer: Any = None,
        *,
        error_if_nonfinite: bool = False,
    ) -> tuple[Tensor, GradStats]:
        """Finalize, then clip the gradients to ``max_norm`` like
        ``fastgradstats.clip_grad_norm_`` (the same total, coefficient and scaling).

        ``optimizer``: a fused optimizer over exactly these parameters takes the coefficient
        as ``grad_scale`` (see :mod:`fastgradstats.handoff`); otherwise the gradients are
        scaled in place (not written when no clipping is needed, on the CPU).

        Returns ``(total_norm, stats)``: the total as ``torch.nn.utils.clip_grad_norm_``
        returns it (promoted gradient dtype) and the statistics before clipping, with
        ``clip_coef`` set.
        """
        request = engine.Request(
            self.norm_type, stats=True, counts=True, max_norm=inputs.check_max_norm(max_norm),
            backend="torch",
        )  # fmt: skip
        stats, grads, done, shards = self._finalize(request.max_norm)
        if not stats.names:
            return torch.tensor(0.0), stats
        if done is not None:  # Triton: the finalize launch computed the total and coefficient
            request.backend = "triton"
            measured = engine.finished_fused(grads, stats, request, done.total, done.coef)
        else:
            measured = engine.finished(grads, stats, request, shards)
        if error_if_nonfinite:
            measured.raise_if_nonfinite()
        assert measured.coef is not None
        measured.apply_(measured.coef, optimizer)
        return measured.returned_total, stats

    # --- lifetime ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every measurement and pending firing (e.g. after an interrupted backward)."""
        # in place: the hooks hold these lists
        self._fired[:] = itertools.repeat(False, len(self.params))
        self._left[:] = map(len, self._buckets)
        self._callback_queued = False
        self._reset_slots()

    def remove(self) -> None:
        """Unregister every hook (idempotent). DDP cannot unregister a comm hook: the DDP
        source's hook then only all-reduces (finalize catches everything up)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._removed = True

    def __enter__(self) -> BackwardStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def num_buckets(self) -> int:
        """How many buckets the parameters were grouped into (parameter-hook source; DDP
        uses its own buckets)."""
        return len(self._buckets)

    def __repr__(self) -> str:
        return (
            f"BackwardStats(tensors={len(self.params)}, buckets={len(self._buckets)}, "
            f"norm_type={self.norm_type}, source={self.source!r}, "
            f"hooks={'removed' if self._removed else 'on'})"
        )


def backward_stats(
    model: torch.nn.Module,
    norm_type: float | str = 2.0,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    scaler: Any = None,
    source: str = "auto",
    comm_hook: Any = None,
    comm_state: Any = None,
    backend: str | None = None,
    side_stream: bool = False,
) -> BackwardStats:
    """Measure per-tensor gradient statistics during backward; finalize after it.

    Registers a post-accumulate-grad hook on every parameter of ``model`` that requires
    grad; each bucket of about ``bucket_bytes`` is measured once when all its gradients
    are final. Then ``handle.finalize()`` returns the same :class:`GradStats` as
    ``grad_stats(model.named_parameters(), backend="torch")`` (bit for bit), and
    ``handle.clip_grad_norm_(max_norm, optimizer=opt)`` clips like ``clip_grad_norm_``.

    GradScaler: call ``handle.unscale_(scaler, optimizer)`` instead of
    ``scaler.unscale_(optimizer)`` (torch's unscale bumps no version counter, so the slots
    cannot see it). With ``scaler=`` given, a direct ``scaler.unscale_`` is detected at
    finalize and every tensor is measured again there (correct, counted as catch-up).

    ``DistributedDataParallel`` (``source="auto"`` picks ``"comm_hook"``): the parameter
    hooks would see the unreduced gradients (``source="params"`` is refused), so the
    handle registers DDP's comm hook instead: each bucket is all-reduced (by
    ``comm_hook(comm_state, bucket)`` when given, the user's hook, else torch's
    ``allreduce_hook``) and the reduced bucket is measured in the future's callback.
    Micro-steps under ``ddp.no_sync()`` measure nothing (DDP calls no comm hook).

    ``backend`` (``"auto"``, ``"torch"``, ``"triton"``; default: ``$FASTGRADSTATS_BACKEND``,
    else auto) picks the measurement as ``grad_stats`` picks it, once, here: the Triton
    path (one stats launch per bucket and dtype, ONE finalize launch after backward) when
    Triton would run these gradients (CUDA, or the interpreter when asked for) and every
    parameter is fp32/bf16/fp16 on one device with p in {1, 2, inf}; the torch path
    otherwise. The DDP source always measures on the torch path.

    DTensor parameters (FSDP2 ``fully_shard``, tensor parallel): the hooks measure each
    rank's local shards (FSDP2 calls them after its reduce-scatter) on the torch path,
    and finalize all-reduces the per-tensor partials once: the statistics of the full
    parameters, as ``grad_stats`` gives them; ``clip_grad_norm_`` returns the total as a
    ``Replicate`` DTensor, as torch does.

    ``side_stream=True`` (Triton path on CUDA only, else ``ValueError``): the bucket
    launches go to a CUDA stream of their own that waits for backward's stream before
    each bucket, so they can overlap the rest of backward; the current stream waits for
    it at the end of backward and before finalize. Not yet run on a GPU.

    Refused (``ValueError``): FSDP1 models, whose flat parameters' hooks do not see the
    reduced, unflattened gradients, and a DDP model with a comm hook registered already.
    """
    return BackwardStats(
        model,
        norm_type,
        bucket_bytes=bucket_bytes,
        scaler=scaler,
        source=source,
        comm_hook=comm_hook,
        comm_state=comm_state,
        backend=backend,
        side_stream=side_stream,
    )


__all__ = ["DEFAULT_BUCKET_BYTES", "BackwardStats", "backward_stats"]
