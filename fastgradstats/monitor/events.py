"""Host-side tallies of a monitored run that outlive the device ring buffer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .history import History


@dataclass
class Events:
    """Host-side tallies kept across flushes, so they survive the ring buffer wrapping."""

    recorded: int = 0
    nonfinite_steps: int = 0
    nonfinite_total_steps: int = 0
    overflow_steps: int = 0
    skipped_steps: int = 0
    clipped_steps: int = 0
    spike_count: int = 0
    first_nonfinite: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    first_nonfinite_step: int | None = None
    spikes: list[tuple[int, str, float]] = field(default_factory=list)

    def add(self, chunk: History, spike_cap: int) -> None:
        self.recorded += len(chunk)
        self.nonfinite_steps += int(chunk.nonfinite.sum())
        self.nonfinite_total_steps += int((~np.isfinite(chunk.total_norm)).sum())
        self.skipped_steps += int(chunk.skipped.sum())
        self.clipped_steps += int((chunk.clip_coef < 1.0).sum())
        bad = (chunk.nan_count + chunk.inf_count) > 0
        overflow = (chunk.inf_count > 0).any(axis=1) | (chunk.total_norm == np.inf)
        self.overflow_steps += int(overflow.sum())
        for t in np.flatnonzero(chunk.nonfinite):
            step = int(chunk.steps[t])
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = step
            for j in np.flatnonzero(bad[t]):
                name = chunk.names[j]
                if name not in self.first_nonfinite:
                    self.first_nonfinite[name] = (
                        step,
                        int(chunk.nan_count[t, j]),
                        int(chunk.inf_count[t, j]),
                    )
        for t in np.flatnonzero(chunk.spike_total | chunk.spike_layer.any(axis=1)):
            step = int(chunk.steps[t])
            if chunk.spike_total[t]:
                self._spike(step, "total", float(chunk.total_norm[t]), spike_cap)
            for j in np.flatnonzero(chunk.spike_layer[t]):
                self._spike(step, chunk.names[j], float(chunk.norms[t, j]), spike_cap)

    def _spike(self, step: int, name: str, value: float, cap: int) -> None:
        self.spike_count += 1
        if len(self.spikes) < cap:
            self.spikes.append((step, name, value))


__all__ = ["Events"]
