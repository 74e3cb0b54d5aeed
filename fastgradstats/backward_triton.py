"""The Triton path of :mod:`fastgradstats.backward` (issue 18, item 4).

The partials' layout depends only on the parameters (numels, dtypes, the block size), not
on the gradients' addresses, so it is fixed once, when the handle is made:

* each bucket owns a contiguous range of columns of ONE float32 ``[4, num_blocks]``
  partials buffer (the stats kernel's: p-partial, max |g|, #NaN, #Inf), its start padded
  to 4 columns so that every bucket's slice stays 16-byte aligned;
* inside a bucket the tensors are placed dtype after dtype, so that a bucket of aligned
  gradients is one stats launch per dtype (:func:`tables.build_placed`; a misaligned
  gradient costs launches, never a wrong placement).

During backward a completed bucket is one :func:`stats.launch_stats` per segment of a
table of its own gradients, into its slice of the partials (``row_stride``); the table
is rebuilt only when a gradient's address changes. After backward ONE finalize launch
over a finalize-only table (block ranges and dtype kinds, no pointer is read) turns the
partials into per-tensor results, the total (torch's roundings) and the clip
coefficient. It never reads a gradient.

Per-tensor results are bit-identical to the after-backward fused path's: a tensor's
blocks are reduced in the same order whatever their position in the partials, and the
total is reduced in tensor order as there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .kernels import stats as stats_kernels
from .kernels import tables
from .triton_backend import SUPPORTED_DTYPES, SUPPORTED_NORMS, guard_for

_PAD = 4  # columns: 16 bytes of float32, the alignment of every bucket's slice


@dataclass
class Finished:
    """What one finalize launch hands back (device tensors, nothing synced)."""

    total: Tensor  # 0-d, promoted gradient dtype, rounded as torch.nn.utils rounds it
    exact_total: Tensor  # 0-d float32: total of the float32 per-tensor norms
    floats: Tensor  # float32 [2, n]: per-tensor p-norm, max |g|
    counts: Tensor  # int64 [2, n]: NaN, Inf counts
    coef: Tensor | None  # 0-d float32 clip coefficient (``max_norm`` given)
    rows: tuple[Tensor, ...]  # [n] views: p-norm, max |g|, NaN count, Inf count


def _outputs(n: int, result: torch.dtype, device: torch.device) -> tuple:
    """A finalize launch's outputs for ``n`` tensors and their views: ``(floats, counts,
    total, (exact total, coefficient), (norms, max |g|, NaN, Inf))``."""
    floats = torch.empty((2, n), device=device)
    counts = torch.empty((2, n), dtype=torch.int64, device=device)
    total = torch.empty((), dtype=result, device=device)
    scalars = torch.empty(2, device=device)
    return floats, counts, total, scalars.unbind(), (*floats.unbind(), *counts.unbind())


def usable(params: list[Tensor], norm_type: float) -> bool:
    """True when the fused kernels can measure these parameters' gradients: every one a
    strided fp32/bf16/fp16 tensor on one device where Triton runs, p in {1, 2, inf}."""
    if not params or float(norm_type) not in SUPPORTED_NORMS:
        return False
    device = params[0].device
    return all(
        p.device == device and p.dtype in SUPPORTED_DTYPES and p.layout == torch.strided
        for p in params
    )


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _side_stream_after(side: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """``side`` made current, after waiting for what the current stream of ``device`` has
    queued so far (the bucket's gradients are final there)."""
    side.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(side)


def _wait_for(side: Any, device: torch.device) -> None:
    """The current stream of ``device`` waits for what ``side`` has queued so far."""
    torch.cuda.current_stream(device).wait_stream(side)


class TritonSlots:
    """The model-wide partials of a :class:`~fastgradstats.backward.BackwardStats`.

    ``side_stream`` (CUDA only): the bucket launches go to a stream of their own, which
    first waits for backward's stream (the bucket's gradients are final there), so they
    can overlap the rest of backward; :meth:`join` makes the current stream wait for them
    (at the end of backward, and before any finalize, unscale or catch-up reads the
    partials), so no gradient is freed or overwritten, and no partial read, before the
    side stream's reads and writes are done.
    """

    def __init__(
        self,
        params: list[Tensor],
        ranges: list[tuple[int, int]],
        norm_type: float,
        side_stream: bool = False,
    ) -> None:
        self.device = params[0].device
        if side_stream and self.device.type != "cuda":
            raise ValueError(f"side_stream=True needs CUDA parameters; these are on {self.device}")
        self._side = torch.cuda.Stream(self.device) if side_stream else None
        self.norm_type = float(norm_type)
        self.block = block = kernels.block_size()
        n = len(params)
        self.numels = [p.numel() for p in params]
        self.dtypes = [p.dtype for p in params]
        self.start = [0] * n  # first column of tensor i in the model-wide partials
        self.local = [0] * n  # ... and in its bucket's slice
        self.offsets: list[int] = []  # first column of each bucket
        column = 0
        for lo, hi in ranges:
            column = -(-column // _PAD) * _PAD
            self.offsets.append(column)
            first_seen = {d: k for k, d in reversed(list(enumerate(self.dtypes[lo:hi])))}
            local = 0
            for i in sorted(range(lo, hi), key=lambda i: first_seen[self.dtypes[i]]):
                self.local[i] = local
                self.start[i] = column + local
                local += -(-self.numels[i] // block)
            column += local
        self.ranges = ranges
        self.partials = torch.zeros((stats_kernels.N_PARTIALS, max(column, 1)), device=self.device)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=self.device)
        # each bucket's columns, as the view its launches write (made once, not per launch)
        self._columns = [self.partials[:, off:] for off in self.offsets]
        self._tables: list[tuple[tuple, tables.TensorTable] | None] = [None] * len(ranges)
        # per bucket, once every gradient was readable: (addresses, table, C++ guard of
        # dtype/shape/strides, the table's launches); the steady state checks it in two
        # C calls and replays the launches
        self._steady: list[tuple[tuple, tables.TensorTable, Any, list] | None]
        self._steady = [None] * len(ranges)
        self._cuda = self.device.type == "cuda"
        self._finalize_tables: dict[tuple | None, tuple[tables.TensorTable, torch.dtype]] = {}
        # the next finalize of every tensor, made at the end of backward (see
        # ``prepare_outputs``): (the stream current then, its table, the launch's grid
        # and arguments, {clip: (finish config, the Finished it hands back)})
        self._ready: tuple[Any, tables.TensorTable, tuple[tuple[int], tuple], dict] | None = None

    # --- during backward ---------------------------------------------------------------

    def readable(self, i: int, g: Tensor | None) -> bool:
        """Can the kernels read gradient ``g`` of parameter ``i`` in place?"""
        return (
            g is not None
            and g.layout == torch.strided
            and g.device == self.device
            and g.dtype == self.dtypes[i]
            and g.numel() == self.numels[i]
            and tables.is_dense(g)
        )

    def measure_steady(self, b: int, grads: list[Tensor | None]) -> bool:
        """The steady state of :meth:`measure_bucket` (every gradient of bucket ``b``,
        all readable): when the gradients have the addresses, dtypes, shapes and strides
        of the bucket's last full measurement, replay its launches and return True;
        otherwise do nothing and return False."""
        steady = self._steady[b]
        if steady is None:
            return False
        try:
            ptrs = tuple(map(Tensor.data_ptr, grads))  # TypeError for a None gradient
        except TypeError:
            return False
        # same addresses, and dtype, shape and strides as when the table was built
        if ptrs != steady[0] or not steady[2].check(*grads):
            return False
        if self._cuda:  # the stream ordering / graph pinning of the table
            with _on_device(self.device), self._launch_stream():
                tables.ready_for_launch(steady[1])
                stats_kernels.replay_stats(steady[3])
        else:
            stats_kernels.replay_stats(steady[3])
        return True

    def _launch_stream(self) -> contextlib.AbstractContextManager:
        """Where a bucket's launches go: the current stream, or the side stream after it."""
        if self._side is None:
            return contextlib.nullcontext()
        return _side_stream_after(self._side, self.device)

    def join(self) -> None:
        """The current stream waits for the side stream's launches so far (no-op without
        one): at the end of backward, and before the partials are read or rescaled."""
        if self._side is not None:
            _wait_for(self._side, self.device)

    def measure_bucket(
        self, b: int, grads: list[Tensor | None], wanted: list[bool] | None = None
    ) -> list[bool]:
        """Launch the stats of bucket ``b``'s readable gradients (``grads``: the bucket's
        parameters in order, ``None`` where there is none; ``wanted``: only those) into
        their columns of the partials, one launch per segment (per dtype for a whole
        bucket; per run of wanted tensors otherwise): the other columns are left as they
        are. Returns which of them were measured."""
        lo, hi = self.ranges[b]
        if wanted is None and self.measure_steady(b, grads):
            return [True] * (hi - lo)
        read = [self.readable(i, g) for i, g in zip(range(lo, hi), grads)]
        if wanted is not None:
            read = [r and w for r, w in zip(read, wanted)]
        if not any(read):
            return read
        ptrs = tuple(g.data_ptr() if r else 0 for g, r in zip(grads, read))
        cached = self._tables[b]
        if cached is not None and cached[0] == ptrs:
            table = cached[1]
        else:
            with _on_device(self.device):
                table = tables.build_placed(
                    self.device, self.block, list(ptrs), self.numels[lo:hi], self.dtypes[lo:hi],
                    self.local[lo:hi], read,
                )  # fmt: skip
            if wanted is None or cached is None:  # a catch-up's table does not evict
                self._tables[b] = (ptrs, table)  # the steady state's
        if wanted is None and all(read):
            guard = guard_for(grads)  # type: ignore[arg-type]  # all read: none is None
            self._steady[b] = (
                None if guard is None else (ptrs, table, guard, self._launches(b, table))
            )
        self._launch(b, table)
        return read

    def _launches(self, b: int, table: tables.TensorTable) -> list:
        """The stats launches of ``table`` into bucket ``b``'s columns (made once per
        table: the configs are those of the kernel settings in force then)."""
        return stats_kernels.stats_launches(
            table, self._columns[b], self.norm_type, True, row_stride=self.partials.shape[1]
        )

    def _launch(self, b: int, table: tables.TensorTable) -> None:
        with _on_device(self.device), self._launch_stream():
            table = tables.ready_for_launch(table)
            stats_kernels.replay_stats(self._launches(b, table))

    def unscale(self, indices: list[int], inv_scale: Tensor) -> None:
        """Rescale the partials of tensors ``indices`` as multiplying their gradients by
        the power of two ``inv_scale`` would (exact unless a value under/overflows): the
        p-partial by ``inv_scale ** p`` (sum g^2, sum |g|, max |g|), max |g| by it; the
        counts do not change."""
        self.join()
        factor = inv_scale.to(self.device, torch.float32).reshape(())
        power = factor * factor if self.norm_type == 2.0 else factor
        if len(indices) == len(self.numels):  # every tensor: whole rows (padding too)
            self.partials[0].mul_(power)
            self.partials[1].mul_(factor)
            return
        columns = [c for i in indices for c in range(self.start[i], self.start[i] + self._count(i))]
        if not columns:
            return
        index = torch.tensor(columns, dtype=torch.int64).to(self.device)
        rows = self.partials[:2].index_select(1, index)
        rows[0].mul_(power)
        rows[1].mul_(factor)
        self.partials[:2].index_copy_(1, index, rows)

    def _count(self, i: int) -> int:
        return -(-self.numels[i] // self.block)

    # --- after backward ----------------------------------------------------------------

    def _finalize_table(self, listed: list[int] | None) -> tuple[tables.TensorTable, torch.dtype]:
        """The finalize-only table of ``listed`` (``None``: every tensor) and the promoted
        dtype of its gradients (the total's), made once per subset."""
        key = None if listed is None else tuple(listed)
        entry = self._finalize_tables.get(key)
        if entry is None:
            members = range(len(self.numels)) if listed is None else listed
            dtypes = [self.dtypes[i] for i in members]
            result = dtypes[0]
            for d in set(dtypes):
                result = torch.promote_types(result, d)
            with _on_device(self.device):
                table = tables.build_placed(
                    self.device, self.block, [0] * len(members),
                    [self.numels[i] for i in members], dtypes,
                    [self.start[i] for i in members], [False] * len(members),
                )  # fmt: skip
            if key is not None:  # one subset kept: None gradients change rarely
                kept = self._finalize_tables
                self._finalize_tables = {k: v for k, v in kept.items() if k is None}
            entry = self._finalize_tables[key] = (table, result)
        return tables.ready_for_launch(entry[0]), entry[1]

    def prepare_outputs(self) -> None:
        """Make the next :meth:`finalize` now (called at the end of backward): its outputs,
        its launch arguments and configs, and what it hands back; the step after backward
        then allocates nothing and builds no launch. Used only by a finalize of every
        tensor on the same stream (memory is ordered on its stream)."""
        with _on_device(self.device):
            table, result = self._finalize_table(None)
            stream = tables.current_stream(self.device)
            floats, counts, total, (exact, coef), rows = _outputs(
                len(self.numels), result, self.device
            )
        launch = stats_kernels.finalize_args(
            table, self.partials, floats, counts, total, exact, coef, self.ticket
        )
        finished = {  # clip or not: (the finish's config, what finalize hands back)
            clip: (
                stats_kernels.finalize_config(
                    self.norm_type, True,
                    stats_kernels.FINISH_CLIP if clip else stats_kernels.FINISH_TOTAL, result,
                ),
                Finished(total, exact, floats, counts, coef if clip else None, rows),
            )
            for clip in (False, True)
        }  # fmt: skip
        self._ready = (stream, table, launch, finished)

    def finalize(self, listed: list[int] | None, max_norm: float | None) -> Finished:
        """ONE finalize launch over the partials of every tensor (``listed``: of those
        only, in that order): per-tensor results, the total (in the promoted gradient
        dtype, torch's roundings) and, with ``max_norm``, the clip coefficient. Reads no
        gradient. The outputs are new tensors each call (made by :meth:`prepare_outputs`
        when it could)."""
        self.join()  # the side stream's bucket and catch-up launches wrote the partials
        ready, self._ready = self._ready, None
        clip = max_norm is not None
        if ready is not None and listed is None:
            stream, table, launch, finished = ready
            if not self._cuda:  # the CPU (interpreter): no stream, no capture
                config, done = finished[clip]
                stats_kernels.replay_finalize(launch, max_norm if clip else 0.0, config)
                return done
            if stream == tables.current_stream(self.device):
                config, done = finished[clip]
                with _on_device(self.device):
                    tables.ready_for_launch(table)
                    stats_kernels.replay_finalize(launch, max_norm if clip else 0.0, config)
                return done
        table, result = self._finalize_table(listed)
        floats, counts, total, (exact, coef), rows = _outputs(table.n_tensors, result, self.device)
        with _on_device(self.device):
            stats_kernels.launch_finalize(
                table, self.partials, floats, counts, self.norm_type, True,
                stats_kernels.FINISH_CLIP if clip else stats_kernels.FINISH_TOTAL,
                total, exact, coef, self.ticket, max_norm if clip else 0.0,
            )  # fmt: skip
        return Finished(total, exact, floats, counts, coef if clip else None, rows)


__all__ = ["Finished", "TritonSlots", "usable"]
