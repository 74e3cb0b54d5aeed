"""Host-side tallies of a monitored run that outlive the device ring buffer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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
    empty_steps: int = 0  # recorded steps where no monitored parameter had a gradient
    trailing_empty_steps: int = 0  # ... of which the latest ones, in a row

    def add(self, chunk: History, spike_cap: int) -> None:
        self.recorded += len(chunk)
        empty = ~chunk.present.any(axis=1)
        self.empty_steps += int(empty.sum())
        if empty.all():
            self.trailing_empty_steps += len(chunk)
        else:
            self.trailing_empty_steps = len(chunk) - 1 - int(np.flatnonzero(~empty)[-1])
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

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (ints, strs, floats, dicts, lists, tuples): safe for
        ``torch.save`` and ``torch.load(weights_only=True)``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Events:
        """The inverse of :meth:`state_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"unknown event tallies in state_dict: {sorted(unknown)}")
        values = dict(state)
        values["first_nonfinite"] = {
            str(k): tuple(int(x) for x in v) for k, v in state.get("first_nonfinite", {}).items()
        }
        values["spikes"] = [(int(s), str(n), float(v)) for s, n, v in state.get("spikes", [])]
        return cls(**values)


__all__ = ["Events"]
