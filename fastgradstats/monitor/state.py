"""``GradMonitor.state_dict()`` and ``load_state_dict()``: the format, versions 1 and 2.

Version 2: the spike EMA is host state, updated at flush. Version 1 had the same fields,
but its EMA was updated at every recorded step (so it already holds the rows not yet
flushed) and each row's spike flags are in ``ring["spike"]``: those rows keep these flags
and are not fed to the EMA again (``HostLog.spikes_ahead``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .binding import Binding
from .events import Events
from .flush import HostLog
from .history import ARRAY_FIELDS, PARAM_FIELDS, Frame
from .rings import Rings

STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATE_KEYS = (
    "names",
    "norm_type",
    "history",
    "counters",
    "ring",
    "host_steps",
    "ema",
    "mirror",
    "events",
)


def state_dict(
    calls: int, frame: Frame, binding: Binding, rings: Rings, log: HostLog
) -> dict[str, Any]:
    """The state of a monitor that has had ``calls`` calls to ``step()`` (device tensors
    cloned, no sync; every other value a plain Python type)."""
    ring = rings.stats
    mirror = None
    if log.mirror is not None:
        mirror = {
            name: torch.from_numpy(np.array(getattr(log.mirror, name)))
            for name in ARRAY_FIELDS + PARAM_FIELDS
            if getattr(log.mirror, name) is not None
        }
    return {
        "version": STATE_VERSION,
        "names": list(frame.names),
        "norm_type": frame.norm_type,
        "history": ring.capacity,
        "counters": {
            "calls": calls,
            "recorded": rings.recorded,
            "flushed": log.flushed,
            "lost_rows": log.lost_rows,
            "no_grad_steps": binding.no_grad_steps,
        },
        "ring": {name: getattr(ring, name).clone() for name in ring.tensors()},
        "host_steps": torch.from_numpy(ring.host_steps.copy()),
        "ema": log.spikes.state_dict(),  # as of the last flush (rows after it follow)
        "mirror": mirror,
        "events": log.events.state_dict(),
        **_spikes_ahead_state(log),
    }


def _spikes_ahead_state(log: HostLog) -> dict[str, Any]:
    # only after loading a version-1 state, until the next flush: the EMA is ahead of
    # the flushed rows, and these are the flags of the rows it already holds
    if log.spikes_ahead is None:
        return {}
    start, flags = log.spikes_ahead
    return {"ema_ahead": {"start": start, "spikes": torch.from_numpy(flags.copy())}}


def _load_spikes_ahead(
    state: dict[str, Any], n: int, capacity: int
) -> tuple[int, np.ndarray] | None:
    """The rows of ``state`` whose spike flags are known and already in its EMA."""
    counters = state["counters"]
    recorded, flushed = int(counters["recorded"]), int(counters["flushed"])
    if state["version"] == 1:
        # version 1 updated the EMA at every recorded step: every unflushed row still
        # in the ring is in it, with its flags in ring["spike"] (all False if absent)
        start = max(flushed, recorded - capacity)
        if start >= recorded:
            return None
        spike = state["ring"].get("spike")
        if spike is None:
            return start, np.zeros((recorded - start, n + 1), dtype=bool)
        if tuple(spike.shape) != (capacity, n + 1):
            raise ValueError("state_dict ring field 'spike' has the wrong shape")
        rows = [r % capacity for r in range(start, recorded)]
        return start, spike.detach().cpu().numpy().astype(bool)[rows]
    ahead = state.get("ema_ahead")
    if ahead is None:
        return None
    start, flags = int(ahead["start"]), ahead["spikes"].detach().cpu().numpy().astype(bool)
    fits = flags.ndim == 2 and flags.shape[1] == n + 1
    if not fits or not flushed <= start <= start + len(flags) <= recorded:
        raise ValueError("state_dict field 'ema_ahead' does not fit this monitor")
    return start, flags


def check_state(state: Any, frame: Frame, capacity: int) -> None:
    """``ValueError`` unless ``state`` is a readable state of a monitor with these
    parameter names, ``history`` length and ``norm_type``."""
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        raise ValueError("state is not a GradMonitor.state_dict() (or from an unknown version)")
    missing_keys = [k for k in STATE_KEYS if k not in state]
    if missing_keys:
        raise ValueError(f"state_dict lacks {missing_keys}")
    names = frame.names
    if list(state["names"]) != names:
        theirs = list(state["names"])
        missing = [n for n in names if n not in theirs]
        extra = [n for n in theirs if n not in names]
        raise ValueError(
            "state_dict was saved for other parameters: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
            + (" (same names, other order)" if not missing and not extra else "")
        )
    if int(state["history"]) != capacity:
        raise ValueError(
            f"state_dict has history={state['history']}, this monitor history={capacity}"
        )
    if float(state["norm_type"]) != frame.norm_type:
        raise ValueError(
            f"state_dict has norm_type={state['norm_type']}, this monitor "
            f"norm_type={frame.norm_type}"
        )


def load_state_dict(
    state: dict[str, Any], frame: Frame, binding: Binding, rings: Rings, log: HostLog
) -> int:
    """Load ``state`` into ``binding``, ``rings`` and ``log``; return its count of
    ``step()`` calls. Every check runs before anything is written (``ValueError``)."""
    ring = rings.stats
    check_state(state, frame, ring.capacity)
    # a state saved without param_norms leaves this ring's weight norms at 0
    names = [name for name in ring.tensors() if name != "params" or name in state["ring"]]
    for name in names:  # check every shape before writing anything
        if tuple(state["ring"][name].shape) != tuple(getattr(ring, name).shape):
            raise ValueError(f"state_dict ring field {name!r} has the wrong shape")
    events = Events.from_state_dict(state["events"])
    spikes_ahead = _load_spikes_ahead(state, len(frame.names), ring.capacity)
    log.spikes.load_state_dict(state["ema"])  # checks its shapes before writing
    log.spikes_ahead = spikes_ahead
    for name in names:
        getattr(ring, name).copy_(state["ring"][name])
    ring.host_steps[:] = state["host_steps"].cpu().numpy()
    log.mirror = None
    if state["mirror"] is not None:
        arrays = frame.empty_arrays(ring.capacity)
        for name in ARRAY_FIELDS + PARAM_FIELDS:
            if name in state["mirror"] and (name in ARRAY_FIELDS or frame.param_norms):
                arrays[name] = state["mirror"][name].cpu().numpy().copy()
        log.mirror = frame.history(arrays)
    counters = state["counters"]
    rings.recorded = int(counters["recorded"])
    log.flushed = int(counters["flushed"])
    log.lost_rows = int(counters["lost_rows"])
    binding.no_grad_steps = int(counters["no_grad_steps"])
    log.events = events
    # histograms are not part of the state (see GradMonitor.state_dict)
    rings.reset_histograms()
    log.reset_histograms()
    return int(counters["calls"])


__all__ = ["READABLE_VERSIONS", "STATE_KEYS", "STATE_VERSION", "load_state_dict", "state_dict"]
