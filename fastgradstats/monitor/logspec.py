"""What the monitor sends to a logger each step: totals, blocks or layers, filtered.

``GradMonitor(log=..., group_by=..., include=..., exclude=..., top_k=...)`` builds a
:class:`LogSpec`; :meth:`GradMonitor.to_dict`, the TensorBoard and W&B writers and the
Lightning / Hugging Face callbacks shape their keys with it. The JSON-lines and CSV
writers and :meth:`GradMonitor.history` always keep every parameter (they are the record).

* ``log="totals"``: the step's totals only (``grad_norm_total``, ``grad_clip_coef``,
  ``grad_nonfinite``, ``grad_skipped``, ``grad_spike_total``; ``to_dict`` adds the
  ``grad_stats/...`` tallies);
* ``log="layers"`` (default): the totals and, per parameter, ``grad_norm/<name>``,
  ``grad_max_abs/<name>`` and ``grad_nonfinite/<name>`` (when non-zero);
* ``log="blocks"``: the totals and the same three keys per block of parameters, reduced
  correctly: the block's norm is the norm of its members' gradients seen as one vector
  (p-norm of the members' p-norms, their max for ``inf``, their sum for p = 0), max |g|
  the max, NaN/Inf counts the sum. ``group_by`` names the blocks: an int keeps that many
  leading dotted parts (``group_by=2``: ``layers.0.attn.weight`` -> ``layers.0``), a
  regular expression names the block by its first group (or the whole match), and
  ``None`` groups by owning module (the name without its last part). Names the depth or
  the pattern does not shorten stay blocks of their own.

``include`` / ``exclude``: regular expressions (one or a list), matched with
``re.search`` against parameter names before grouping; a name is kept when it matches
some ``include`` (all, when ``None``) and no ``exclude``. The totals are always those of
every parameter. ``top_k``: keep only the k layers (or blocks) with the largest norm at
that step, non-finite ones first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from .history import History, combine_norms
from .keys import Keys

LOG_LEVELS = ("totals", "blocks", "layers")


def _patterns(value: Any, arg: str) -> list[re.Pattern[str]]:
    if value is None:
        return []
    items = [value] if isinstance(value, (str, re.Pattern)) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{arg} must be a regular expression or a list of them, got {value!r}"
        ) from None
    out = []
    for item in items:
        if isinstance(item, re.Pattern):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise TypeError(f"{arg} must hold regular expressions (str), got {item!r}")
        try:
            out.append(re.compile(item))
        except re.error as exc:
            raise ValueError(f"{arg}: {item!r} is not a valid regular expression: {exc}") from None
    return out


class LogSpec:
    """Which per-step values go to the loggers (see the module docstring).

    Args:
        log: ``"totals"``, ``"blocks"`` or ``"layers"``; default ``"blocks"`` when
            ``group_by`` is given, else ``"layers"``.
        group_by: blocks by depth (int >= 1), by regular expression (str; the first group
            names the block), or by owning module (``None``). Only with ``log="blocks"``.
        include / exclude: regular expressions matched against parameter names.
        top_k: keep the k largest layers or blocks (by norm, non-finite first) per step.
    """

    def __init__(
        self,
        log: str | None = None,
        group_by: int | str | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        top_k: int | None = None,
    ) -> None:
        if log is None:
            log = "blocks" if group_by is not None else "layers"
        if log not in LOG_LEVELS:
            raise ValueError(f"log must be one of {LOG_LEVELS}, got {log!r}")
        if group_by is not None and log != "blocks":
            raise ValueError(f'group_by={group_by!r} needs log="blocks", got log={log!r}')
        if isinstance(group_by, bool) or not (group_by is None or isinstance(group_by, (int, str))):
            raise TypeError(f"group_by must be an int depth, a regex str or None, got {group_by!r}")
        if isinstance(group_by, int) and group_by < 1:
            raise ValueError(f"group_by must be a depth >= 1, got {group_by}")
        self._regex = _patterns(group_by, "group_by")[0] if isinstance(group_by, str) else None
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be an int or None, got {top_k!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.log = log
        self.group_by = group_by
        self.include = _patterns(include, "include")
        self.exclude = _patterns(exclude, "exclude")
        self.top_k = top_k
        self._plans: dict[tuple[str, ...], tuple[list[str], list[list[int]]]] = {}

    def __repr__(self) -> str:
        return (
            f"LogSpec(log={self.log!r}, group_by={self.group_by!r}, "
            f"include={[p.pattern for p in self.include]!r}, "
            f"exclude={[p.pattern for p in self.exclude]!r}, top_k={self.top_k!r})"
        )

    # -- names ------------------------------------------------------------------------

    def selected(self, name: str) -> bool:
        """Whether parameter ``name`` passes ``include`` / ``exclude``."""
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def block(self, name: str) -> str:
        """The block parameter ``name`` belongs to (``log="blocks"``)."""
        if self._regex is not None:
            match = self._regex.search(name)
            if match is None:
                return name
            picked = match.group(1) if self._regex.groups else match.group(0)
            return picked if picked else name
        parts = name.split(".")
        if not isinstance(self.group_by, int):  # None: the owning module
            return ".".join(parts[:-1]) if len(parts) > 1 else name
        return ".".join(parts[: self.group_by])

    def plan(self, names: list[str]) -> tuple[list[str], list[list[int]]]:
        """Row labels and, per row, the parameter indices it covers (selected names only)."""
        key = tuple(names)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        labels: list[str] = []
        members: list[list[int]] = []
        where: dict[str, int] = {}
        for j, name in enumerate(names):
            if self.log == "totals" or not self.selected(name):
                continue
            label = self.block(name) if self.log == "blocks" else name
            if label not in where:
                where[label] = len(labels)
                labels.append(label)
                members.append([])
            members[where[label]].append(j)
        self._plans[key] = (labels, members)
        return labels, members

    # -- values -----------------------------------------------------------------------

    def rows(self, history: History, t: int) -> list[tuple[str, float, float, int]]:
        """``(label, norm, max_abs, nan + inf count)`` per layer or block of step ``t``,
        present gradients only, after ``top_k`` (in model order)."""
        labels, members = self.plan(history.names)
        present = history.present[t]
        out = []
        for label, cols in zip(labels, members):
            cols = [j for j in cols if present[j]]
            if not cols:
                continue
            if len(cols) == 1:
                j = cols[0]
                norm, max_abs = float(history.norms[t, j]), float(history.max_abs[t, j])
            else:
                norm = combine_norms(history.norms[t, cols], history.norm_type)
                values = history.max_abs[t, cols]
                max_abs = math.nan if np.isnan(values).any() else float(values.max())
            bad = int(history.nan_count[t, cols].sum() + history.inf_count[t, cols].sum())
            out.append((label, norm, max_abs, bad))
        if self.top_k is not None and len(out) > self.top_k:
            keep = sorted(range(len(out)), key=lambda i: _rank(out[i]))[: self.top_k]
            out = [out[i] for i in sorted(keep)]
        return out

    def row_dict(self, history: History, t: int) -> dict[str, float]:
        """The logger dict of recorded step ``t`` (index into ``history``)."""
        keys = history.key_names()
        out = totals_dict(history, t)
        rows = self.rows(history, t)
        for label, norm, max_abs, bad in rows:
            out[keys.norm(label)] = norm
            out[keys.max_abs(label)] = max_abs
            if bad:
                out[keys.nonfinite_count(label)] = float(bad)
        if history.param_norm is not None and history.update_norm is not None and rows:
            # the same layers / blocks as the gradient keys; a block's ratio is
            # ||dw_block|| / ||w_block||, both combined as norms
            labels, members = self.plan(history.names)
            cols_of = dict(zip(labels, members))
            present = history.present[t]
            for label, *_ in rows:
                cols = [j for j in cols_of[label] if present[j]]
                w = combine_norms(history.param_norm[t, cols], history.norm_type)
                dw = combine_norms(history.update_norm[t, cols], history.norm_type)
                out[keys.param_norm(label)] = w
                out[keys.update_ratio(label)] = dw / w if w != 0 else math.nan
        return out

    def layer_names(self, history: History, t: int) -> list[str]:
        """The parameters whose own per-layer extras (precision shares) are logged at step
        ``t``: the selected ones in ``"layers"`` mode (after ``top_k``), none otherwise."""
        if self.log != "layers":
            return []
        return [label for label, *_ in self.rows(history, t)]

    def histogram_counts(self, history: History, t: int, k: int) -> list[tuple[str, np.ndarray]]:
        """``(label, counts)`` of the |g| histograms to log for recorded step ``t`` (row ``k``
        of ``history.histograms``): one per logged layer, or per logged block with its
        members' counts added (a block's histogram is that of all its values); none with
        ``log="totals"``."""
        hist = history.histograms
        if hist is None or self.log == "totals":
            return []
        labels, members = self.plan(history.names)
        shown = {label for label, *_ in self.rows(history, t)}  # after top_k
        out = []
        for label, cols in zip(labels, members):
            cols = [j for j in cols if hist.present[k, j]]
            if label in shown and cols:
                out.append((label, hist.counts[k, cols].sum(axis=0)))
        return out


LOG_OPTIONS = ("log", "group_by", "include", "exclude", "top_k")


def check_log_options(kwargs: dict[str, Any]) -> LogSpec:
    """The :class:`LogSpec` of the ``log`` options among ``kwargs`` (``GradMonitor``
    keyword arguments); raises as ``GradMonitor`` would, before any training starts."""
    return LogSpec(**{k: kwargs[k] for k in LOG_OPTIONS if k in kwargs})


def _rank(row: tuple[str, float, float, int]) -> tuple[int, float]:
    _, norm, _, bad = row
    broken = bad > 0 or not math.isfinite(norm)
    return (0 if broken else 1, -norm if math.isfinite(norm) else 0.0)


def totals_dict(history: History, t: int) -> dict[str, float]:
    """The per-step totals of recorded step ``t``: total norm, clip coefficient, whether it
    was non-finite, skipped, a spike of the total norm."""
    keys = history.key_names()
    out = {
        keys.total: float(history.total_norm[t]),
        keys.clip_coef: float(history.clip_coef[t]),
        keys.nonfinite: float(history.nonfinite[t]),
        keys.skipped: float(history.skipped[t]),
        keys.spike_total: float(history.spike_total[t]),
    }
    if history.param_norm is not None:
        present = history.present[t]
        out[keys.param_total] = combine_norms(history.param_norm[t][present], history.norm_type)
    return out


def total_keys(keys: Keys) -> set[str]:
    """Every key :meth:`GradMonitor.to_dict` logs with ``log="totals"`` (console keys)."""
    return {
        keys.total,
        keys.clip_coef,
        keys.nonfinite,
        keys.skipped,
        keys.spike_total,
        keys.param_total,
        keys.tally("nonfinite_steps"),
        keys.tally("skipped_steps"),
        keys.tally("spikes"),
    }


__all__ = [
    "LOG_LEVELS",
    "LOG_OPTIONS",
    "LogSpec",
    "check_log_options",
    "combine_norms",
    "total_keys",
    "totals_dict",
]
