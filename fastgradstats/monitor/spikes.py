"""Spike detection over recorded norms: an EMA of log-norms, run on the host at flush.

A norm is a spike when its natural log exceeds the exponential moving average of the
log-norm by more than ``threshold`` EMA standard deviations *and* the norm is at least
``min_ratio`` times the EMA level (the ratio keeps a very steady run, whose EMA standard
deviation is tiny, from flagging harmless wiggles). Log space, because gradient norms vary
multiplicatively. One column per parameter plus a last one for the total norm.

Why at flush and on the host: the detector is a few dozen elementwise operations on
``n + 1`` numbers per step. On the device each of them is a kernel launch (about 30 per
step, more host time than the fused read of GPT-2's gradients on an H100), while
:meth:`GradMonitor.flush` already copies the recorded rows to the host. So the rows are
fed to the detector there, in step order, in the ring's dtype (float32, or float64 for
float64 gradients). Rows overwritten before a flush never reach it (the monitor warns
about them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .history import TINY


class SpikeDetector:
    """Per-column EMA of log-norms with a per-column warm-up (host state, numpy).

    Args:
        n: columns (parameters); one more column is kept for the total norm.
        threshold: z-score above which a log-norm is a spike.
        min_ratio: a spike must also be at least this many times the EMA level.
        beta: EMA decay per recorded step.
        warmup: valid updates a column needs before it can spike (per column, so a layer
            that first gets gradients late is not judged against an EMA that never saw it).
        dtype: the arithmetic dtype (the monitor's ring dtype).
    """

    def __init__(
        self,
        n: int,
        threshold: float,
        min_ratio: float,
        beta: float,
        warmup: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n = n
        self.dtype = np.float64 if dtype == torch.float64 else np.float32
        self.threshold = self.dtype(threshold)
        self.log_min_ratio = self.dtype(math.log(min_ratio))
        self.floor_alpha = self.dtype(1.0 - beta)
        self.warmup = max(int(warmup), 1)
        self.mean = np.zeros(n + 1, dtype=self.dtype)
        self.var = np.zeros(n + 1, dtype=self.dtype)
        self.count = np.zeros(n + 1, dtype=self.dtype)  # valid updates per column

    def update(self, norms: np.ndarray, total: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Feed recorded rows, oldest first; return their spike flags.

        Args:
            norms: [T, n] per-parameter norms of T recorded steps.
            total: [T] total norms.
            present: bool [T, n], whether each parameter had a gradient in that step (the
                total counts as present when any parameter was: a step without gradients
                must not pull the total's EMA toward log(0)).

        Returns:
            bool [T, n + 1]: per-parameter spikes, then the total's.
        """
        t = len(total)
        spikes = np.zeros((t, self.n + 1), dtype=bool)
        if not t:
            return spikes
        values = np.concatenate([norms, np.reshape(total, (t, 1))], axis=1).astype(self.dtype)
        present = np.asarray(present, dtype=bool)
        present = np.concatenate([present, present.any(axis=1, keepdims=True)], axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            valid_rows = present & np.isfinite(values)
            log_rows = np.log(np.maximum(values, self.dtype(TINY)))
        one = self.dtype(1.0)
        for k in range(t):
            valid, logs = valid_rows[k], log_rows[k]
            deviation = logs - self.mean
            spikes[k] = (
                valid
                & (self.count >= self.warmup)
                & (deviation > self.threshold * np.sqrt(self.var))
                & (deviation > self.log_min_ratio)
            )
            # Average over each column's first updates, then a plain EMA (no start-up
            # bias toward 0).
            alpha = np.maximum(one / (self.count + one), self.floor_alpha)
            delta = np.where(valid, deviation, self.dtype(0.0))
            self.mean += alpha * delta
            self.var = np.where(valid, (one - alpha) * (self.var + alpha * delta * delta),
                                self.var)  # fmt: skip
            self.count += valid
        return spikes

    def state_dict(self) -> dict[str, Any]:
        """The EMA state as CPU tensors (``torch.load(weights_only=True)`` reads them)."""
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "var": torch.from_numpy(self.var.copy()),
            "count": torch.from_numpy(self.count.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors on any device, of ``n + 1`` entries each)."""
        arrays = {}
        for key in ("mean", "var", "count"):
            value = state[key]
            array = (value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                     else np.asarray(value))  # fmt: skip
            if array.shape != (self.n + 1,):
                raise ValueError(
                    f"state_dict ema field {key!r} has shape {array.shape}, "
                    f"expected {(self.n + 1,)}"
                )
            arrays[key] = array.astype(self.dtype)
        self.mean, self.var, self.count = arrays["mean"], arrays["var"], arrays["count"]


__all__ = ["SpikeDetector"]
