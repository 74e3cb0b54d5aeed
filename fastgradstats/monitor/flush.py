"""The host side of the record: flushing the device rings, and the history kept on the host.

:class:`HostLog` copies the rows recorded since the last flush to the host (one sync per
ring), runs the spike detector over them in step order, keeps a host mirror of each ring
(what :meth:`HostLog.history` returns) and the tallies that outlive the rings.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .events import Events
from .history import (
    ARRAY_FIELDS,
    HISTOGRAM_FIELDS,
    PARAM_FIELDS,
    Frame,
    HistogramHistory,
    History,
    empty_histogram_arrays,
)
from .rings import Rings
from .spikes import SpikeDetector


class HostLog:
    """Rows flushed so far, their host mirrors, the spike detector and the tallies."""

    def __init__(self, spikes: SpikeDetector) -> None:
        self.spikes = spikes
        # (first row, flags [k, n + 1]) of rows already in the spike EMA but not flushed
        # (a version-1 state): flush() takes their flags from here, not from the detector
        self.spikes_ahead: tuple[int, np.ndarray] | None = None
        self.flushed = 0  # rows of the statistics ring copied to the host
        self.mirror: History | None = None  # host copy of that ring, filled by flush()
        self.events = Events()
        self.lost_rows = 0
        self.reset_histograms()

    def reset_histograms(self) -> None:
        """Forget the histograms (their ring was made anew)."""
        self.hist_flushed = 0
        self.hist_mirror: HistogramHistory | None = None
        self.lost_histograms = 0

    def flush(self, rings: Rings, frame: Frame, writers: list[Any]) -> History:
        """Copy the rows of ``rings`` recorded since the last flush to the host, update the
        tallies, give the rows to ``writers`` and return them (oldest first)."""
        capacity = rings.capacity
        new = rings.recorded - self.flushed
        lost = max(0, new - capacity)
        self.lost_rows += lost
        count = new - lost
        first = rings.recorded - count
        rows = [r % capacity for r in range(first, rings.recorded)]
        chunk = frame.history(rings.stats.gather(rows))
        spikes = self._detect_spikes(first, chunk)
        chunk.spike_layer, chunk.spike_total = spikes[:, :-1], spikes[:, -1]
        self.flushed = rings.recorded
        self._merge_mirror(rows, chunk, frame, capacity)
        chunk.histograms = self._flush_histograms(rings, frame)
        self.events.add(chunk, spike_cap=1000)
        if lost:
            warnings.warn(
                f"GradMonitor: {lost} recorded steps were overwritten before flush(); "
                f"flush at least every history={capacity} recorded steps",
                stacklevel=3,  # the caller of GradMonitor.flush
            )
        for writer in writers:
            writer.write(chunk)
        return chunk

    def _detect_spikes(self, first: int, chunk: History) -> np.ndarray:
        """Spike flags of ``chunk`` (rows ``first`` ... in recording order): from the
        detector, except for rows its EMA already holds (a version-1 state's), which keep
        the flags computed then and are not fed again."""
        ahead, self.spikes_ahead = self.spikes_ahead, None
        if ahead is None:
            return self.spikes.update(chunk.norms, chunk.total_norm, chunk.present)
        start, flags = ahead
        end = start + len(flags)
        known = max(0, end - first)  # rows before `first` were lost (overwritten)
        rest = self.spikes.update(
            chunk.norms[known:], chunk.total_norm[known:], chunk.present[known:]
        )
        return np.concatenate([flags[first - start : end - start], rest])

    def _merge_mirror(self, rows: list[int], chunk: History, frame: Frame, capacity: int) -> None:
        if self.mirror is None:
            self.mirror = frame.history(frame.empty_arrays(capacity))
        for name in ARRAY_FIELDS + PARAM_FIELDS:
            mirror = getattr(self.mirror, name)
            if mirror is not None:
                mirror[rows] = getattr(chunk, name)

    def _flush_histograms(self, rings: Rings, frame: Frame) -> HistogramHistory | None:
        """Copy the histogram rows new since the last flush to the host mirror; return them."""
        ring = rings.hist
        if ring is None:
            return None
        new = rings.hist_recorded - self.hist_flushed
        lost = max(0, new - ring.capacity)
        if lost:
            self.lost_histograms += lost
            warnings.warn(
                f"GradMonitor: {lost} histograms were overwritten before flush(); flush at "
                f"least every histogram_history={ring.capacity} histogram steps",
                stacklevel=4,  # the caller of GradMonitor.flush
            )
        first = rings.hist_recorded - (new - lost)
        rows = [r % ring.capacity for r in range(first, rings.hist_recorded)]
        chunk = frame.histograms(ring.gather(rows))
        self.hist_flushed = rings.hist_recorded
        if self.hist_mirror is None:
            self.hist_mirror = frame.histograms(
                empty_histogram_arrays(ring.capacity, len(frame.names))
            )
        for name in HISTOGRAM_FIELDS:
            getattr(self.hist_mirror, name)[rows] = getattr(chunk, name)
        return chunk

    def history(self, rings: Rings, frame: Frame) -> History:
        """The last ``min(recorded, capacity)`` flushed rows, oldest first, with their
        histograms (call after :meth:`flush`)."""
        capacity = rings.capacity
        count = min(rings.recorded, capacity)
        rows = [r % capacity for r in range(rings.recorded - count, rings.recorded)]
        if self.mirror is None:
            out = frame.history(rings.stats.gather([]))
        else:
            out = self.mirror.select(rows)
        out.histograms = self.kept_histograms(rings, frame)
        return out

    def kept_histograms(self, rings: Rings, frame: Frame) -> HistogramHistory | None:
        """The last ``min(histogram steps, histogram capacity)`` flushed histograms."""
        ring = rings.hist
        if ring is None:
            return None
        count = min(rings.hist_recorded, ring.capacity)
        first = rings.hist_recorded - count
        rows = [r % ring.capacity for r in range(first, rings.hist_recorded)]
        if self.hist_mirror is None:
            return frame.histograms(empty_histogram_arrays(0, len(frame.names)))
        return self.hist_mirror.select(rows)


__all__ = ["HostLog"]
