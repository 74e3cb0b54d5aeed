"""The device side of the record: ring buffers written every recorded step, no host sync.

:class:`DeviceRing` holds per-step statistics, :class:`HistogramRing` the per-layer |g|
histograms of ``histograms=True``; :class:`Rings` owns both for one monitor, counts the
rows written and writes a step's row from its :class:`~fastgradstats.GradStats`. Rows are
copied to the host by :mod:`.flush`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..constants import NUM_BINS
from ..stats import GradStats
from .binding import Binding
from .history import empty_arrays, empty_histogram_arrays


class HistogramRing:
    """``capacity`` rows of per-layer histograms on the device, written without host syncs.

    Memory: ``capacity * n * (152 + 1) * 8`` bytes of int64 counts (GPT-2's 148 tensors:
    181 KB per row, 11.6 MB at the default 64 rows), plus ``max_abs`` and ``present``.
    int64 keeps every count exact (a tensor can hold more than 2**31 elements).
    """

    def __init__(self, capacity: int, n: int, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity, self.n = capacity, n
        self.counts = torch.zeros(capacity, n, NUM_BINS, dtype=torch.int64, device=device)
        self.zeros = torch.zeros(capacity, n, dtype=torch.int64, device=device)
        self.max_abs = torch.zeros(capacity, n, dtype=dtype, device=device)
        self.present = torch.zeros(capacity, n, dtype=torch.bool, device=device)
        self.host_steps = np.full(capacity, -1, dtype=np.int64)

    def gather(self, rows: list[int]) -> dict[str, np.ndarray]:
        """The arrays of ``rows`` (ring row indices, in order) on the host: one copy."""
        n, t = self.n, len(rows)
        if not t:
            return empty_histogram_arrays(0, n)
        index = torch.tensor(rows, dtype=torch.int64).to(self.counts.device)
        # int64 block (max_abs travels as its float64 bits): one device->host copy.
        pieces = [
            self.counts[index].reshape(t, -1),
            self.zeros[index],
            self.max_abs[index].to(torch.float64).view(torch.int64),
            self.present[index].to(torch.int64),
        ]
        packed = torch.cat(pieces, dim=1).cpu().numpy()
        bins = self.counts.shape[2]
        cols = np.cumsum([0, n * bins, n, n, n])
        return {
            "steps": self.host_steps[rows].copy(),
            "counts": packed[:, cols[0] : cols[1]].reshape(t, n, bins).copy(),
            "zero_count": packed[:, cols[1] : cols[2]].copy(),
            "max_abs": packed[:, cols[2] : cols[3]].copy().view(np.float64),
            "present": packed[:, cols[3] : cols[4]].astype(bool),
        }


class DeviceRing:
    """``capacity`` rows of per-step statistics on the device, written without host syncs.

    Row ``r`` holds one recorded step; ``host_steps[r]`` is its step number (a Python
    int the monitor knows, so it is kept on the host). Spikes are not on the device: the
    monitor computes them from the gathered rows (:mod:`fastgradstats.monitor.spikes`).
    """

    TENSORS = (
        "norms",
        "max_abs",
        "nan",
        "inf",
        "present",
        "total",
        "coef",
        "skipped",
    )

    def __init__(
        self,
        capacity: int,
        n: int,
        device: torch.device,
        dtype: torch.dtype,
        param_norms: bool = False,
    ) -> None:
        h = capacity
        self.capacity, self.n = capacity, n
        # [h, 2, n] blocks, laid out as the fused pass hands its results back (p-norm and
        # max |g|; NaN and Inf counts), so a step's row is two copies
        self.floats = torch.zeros(h, 2, n, dtype=dtype, device=device)
        self.counts = torch.zeros(h, 2, n, dtype=torch.int64, device=device)
        self.norms, self.max_abs = self.floats[:, 0], self.floats[:, 1]
        self.nan, self.inf = self.counts[:, 0], self.counts[:, 1]
        self.present = torch.zeros(h, n, dtype=torch.bool, device=device)
        self.total = torch.zeros(h, dtype=dtype, device=device)
        self.coef = torch.ones(h, dtype=dtype, device=device)
        self.skipped = torch.zeros(h, dtype=torch.bool, device=device)
        self.host_steps = np.full(h, -1, dtype=np.int64)
        # param_norms=True: [h, 2, n] of ||w|| and ||w - w_prev|| (the ratio is taken at
        # flush, so blocks can combine the two norms before dividing)
        self.params = torch.zeros(h, 2, n, dtype=dtype, device=device) if param_norms else None

    def tensors(self) -> tuple[str, ...]:
        """The names of this ring's device tensors (its state)."""
        return self.TENSORS + (("params",) if self.params is not None else ())

    def gather(self, rows: list[int]) -> dict[str, np.ndarray]:
        """The arrays of ``rows`` (ring row indices, in order) on the host: one sync."""
        n, t = self.n, len(rows)
        if not t:
            out = empty_arrays(0, n)
            if self.params is not None:
                out.update(param_norm=np.zeros((0, n)), update_norm=np.zeros((0, n)))
            return out
        index = torch.tensor(rows, dtype=torch.int64).to(self.norms.device)
        pieces = [
            self.norms[index],
            self.max_abs[index],
            self.nan[index],
            self.inf[index],
            self.present[index],
            self.total[index, None],
            self.coef[index, None],
            self.skipped[index, None],
        ]
        widths = [0, n, n, n, n, n, 1, 1, 1]
        if self.params is not None:
            pieces += [self.params[index, 0], self.params[index, 1]]
            widths += [n, n]
        # One float64 block, one device->host copy: the only sync of a flush.
        packed = torch.cat([p.to(torch.float64) for p in pieces], dim=1).cpu().numpy()
        cols = np.cumsum(widths)
        part = [packed[:, cols[i] : cols[i + 1]] for i in range(len(cols) - 1)]
        extra = {}
        if self.params is not None:
            extra = {"param_norm": part[8], "update_norm": part[9]}
        return {
            **extra,
            "steps": self.host_steps[rows].copy(),
            "norms": part[0],
            "max_abs": part[1],
            "nan_count": part[2].astype(np.int64),
            "inf_count": part[3].astype(np.int64),
            "present": part[4].astype(bool),
            "total_norm": part[5][:, 0],
            "clip_coef": part[6][:, 0],
            # what step() acted on: a NaN/Inf count (any norm type; a 0-norm counts a NaN
            # as a nonzero and stays finite) or a NaN/Inf float32 (float64) total
            "nonfinite": ~np.isfinite(part[5][:, 0]) | (part[2] + part[3] > 0).any(axis=1),
            "skipped": part[7][:, 0].astype(bool),
            "spike_total": np.zeros(t, dtype=bool),  # filled by the monitor's detector
            "spike_layer": np.zeros((t, n), dtype=bool),
        }


class Rings:
    """One monitor's device rings and how many rows each has had written.

    ``stats`` (a :class:`DeviceRing` of ``capacity`` rows) gets a row every recorded step,
    ``hist`` (a :class:`HistogramRing`, or ``None`` without histograms) one every
    histogram step. Rows missing a parameter's gradient are placed by name through
    ``binding``.
    """

    def __init__(
        self,
        binding: Binding,
        capacity: int,
        dtype: torch.dtype,
        norm_type: float,
        param_norms: bool,
        histogram_capacity: int | None,
    ) -> None:
        self.binding = binding
        self.device, self.dtype, self.norm_type = binding.device, dtype, norm_type
        self.n = len(binding.names)
        self.stats = DeviceRing(capacity, self.n, self.device, dtype, param_norms)
        self.recorded = 0  # rows written to ``stats``
        self.histogram_capacity = histogram_capacity
        self.reset_histograms()

    @property
    def capacity(self) -> int:
        """Rows of the statistics ring (``history=``)."""
        return self.stats.capacity

    def reset_histograms(self) -> None:
        """A new, empty histogram ring (``None`` without histograms)."""
        h = self.histogram_capacity
        self.hist = HistogramRing(h, self.n, self.device, self.dtype) if h else None
        self.hist_recorded = 0  # rows written to ``hist``

    def write_row(self, step_no: int, stats: GradStats, skipped: Tensor | None) -> int:
        """Write step ``step_no``'s statistics (and ``skipped``, when skipping) to the next
        row; return that row."""
        ring = self.stats
        row = self.recorded % ring.capacity
        self.recorded += 1
        ring.host_steps[row] = step_no
        fields = [
            (ring.norms, stats.norms),
            (ring.max_abs, stats.max_abs),
            (ring.nan, stats.nan_count),
            (ring.inf, stats.inf_count),
        ]
        packed = stats._packed
        if len(stats) == self.n and packed is not None and packed[0].dtype == ring.floats.dtype:
            ring.floats[row].copy_(packed[0])  # the fused pass's [2, n] blocks as they are
            ring.counts[row].copy_(packed[1])
            ring.present[row].fill_(True)
        elif len(stats) == self.n:
            for buf, value in fields:
                buf[row].copy_(value)
            ring.present[row].fill_(True)
        else:
            index = self.binding.present_index(stats.names)
            for buf, value in fields:
                buf[row].zero_()
                if len(stats):
                    buf[row].index_copy_(0, index, value.to(self.device, buf.dtype))
            ring.present[row].zero_()
            if len(stats):
                ring.present[row].index_fill_(0, index, True)
        total = stats.total_norm.to(self.device, self.dtype)
        ring.total[row].copy_(total)
        if stats.clip_coef is not None:
            ring.coef[row].copy_(stats.clip_coef)
        else:
            ring.coef[row].fill_(1.0)
        # Whether the step was non-finite is read from ``total`` at flush (it is the total
        # found_inf is decided from); only a skip is worth a device write here.
        if skipped is not None:
            ring.skipped[row].copy_(skipped)
        return row

    def write_histogram(self, step_no: int, stats: GradStats) -> None:
        """Write step ``step_no``'s histograms (measured with ``histogram=True``)."""
        names, counts, zeros = stats.names, stats.histogram, stats.zero_count
        assert counts is not None and zeros is not None  # measured with histogram=True
        ring = self.hist
        assert ring is not None  # histograms=True
        row = self.hist_recorded % ring.capacity
        self.hist_recorded += 1
        ring.host_steps[row] = step_no
        if len(names) == self.n:
            ring.counts[row].copy_(counts)
            ring.zeros[row].copy_(zeros)
            ring.max_abs[row].copy_(stats.max_abs)
            ring.present[row].fill_(True)
            return
        for buf in (ring.counts, ring.zeros, ring.max_abs, ring.present):
            buf[row].zero_()
        if names:
            index = self.binding.present_index(names)
            ring.counts[row].index_copy_(0, index, counts.to(self.device))
            ring.zeros[row].index_copy_(0, index, zeros.to(self.device))
            ring.max_abs[row].index_copy_(0, index, stats.max_abs.to(self.device, self.dtype))
            ring.present[row].index_fill_(0, index, True)

    def write_param_norms(self, row: int, names: list[str]) -> None:
        """Ring row ``row`` gets ||w|| and ||w - w_prev|| of the parameters ``names`` (those
        with a gradient), and w_prev becomes w. No host sync; per (device, dtype) group a
        fixed number of foreach launches, whatever the number of parameters."""
        out = self.stats.params
        assert out is not None
        every = len(names) == self.n  # all present: the plan is reused
        groups, order, fresh = self.binding.weight_groups(names)
        if not order:
            out[row].zero_()
            return
        values = []
        for acc, ws, prev in groups:
            w_norm = torch._foreach_norm(ws, self.norm_type, dtype=acc)
            torch._foreach_sub_(prev, ws)  # prev := w_prev - w
            d_norm = torch._foreach_norm(prev, self.norm_type, dtype=acc)
            torch._foreach_copy_(prev, ws)
            values.append(torch.stack([torch.stack(w_norm), torch.stack(d_norm)]))
        both = (
            values[0]
            if len(values) == 1
            else torch.cat([v.to(self.device, self.dtype) for v in values], dim=1)
        )
        if every and len(groups) == 1:
            out[row].copy_(both)  # one group: model order
        else:
            out[row].zero_()
            index = self.binding.present_index(order)
            out[row].index_copy_(1, index, both.to(self.device, self.dtype))
        if fresh:
            out[row, 1].index_fill_(0, self.binding.present_index(fresh), float("nan"))


__all__ = ["DeviceRing", "HistogramRing", "Rings"]
