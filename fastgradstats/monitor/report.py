"""What the monitor reports from a flushed :class:`History`: the precision findings that
end :meth:`GradMonitor.report` and the plain-float dict of :meth:`GradMonitor.to_dict`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .events import Events
from .history import HistogramHistory, History
from .keys import Keys
from .logspec import LogSpec


def precision_findings(
    hist: HistogramHistory | None, names: list[str], dtypes: list[Any], limit: int
) -> list[str]:
    """Plain-words precision lines for the latest histogram step of ``hist``: per format in
    ``dtypes``, at most ``limit`` lines, worst first."""
    from ..precision import precision_lines

    if hist is None or not len(hist):
        return []
    present = hist.present[-1]
    shown = [name for name, keep in zip(names, present) if keep]
    keep = torch.from_numpy(np.flatnonzero(present))
    step = int(hist.steps[-1])
    out = []
    for dtype in dtypes:
        report = hist.report(-1, dtype)
        for field in ("nonzero", *type(report).FIELDS, "keep_exponent"):
            setattr(report, field, getattr(report, field)[keep])
        lines = precision_lines(report, shown)
        more = len(lines) - limit
        lines = lines[:limit]
        if more > 0:
            lines.append(f"... and {more} more {report.format.name} findings")
        out += [f"step {step}: {line}" for line in lines]
    return out


def latest_dict(
    hist: History, log_spec: LogSpec, keys: Keys, dtypes: list[Any], events: Events
) -> dict[str, float]:
    """The latest row of ``hist`` as logger keys (shaped by ``log_spec``), its histogram
    step's precision shares for ``dtypes``, and the running tallies of ``events``."""
    last = len(hist) - 1
    out = log_spec.row_dict(hist, last) if len(hist) else {}
    if hist.histograms is not None and len(hist):
        shown = set(log_spec.layer_names(hist, last))  # log="layers" only
        precision = hist.histograms.precision_dict(dtypes, keys)
        cut = len(keys.prefix)  # keys are {prefix}grad_<what>/<name>
        out.update({k: v for k, v in precision.items() if k[cut:].split("/", 1)[1] in shown})
    out[keys.tally("nonfinite_steps")] = float(events.nonfinite_steps)
    out[keys.tally("skipped_steps")] = float(events.skipped_steps)
    out[keys.tally("spikes")] = float(events.spike_count)
    return out


__all__ = ["latest_dict", "precision_findings"]
