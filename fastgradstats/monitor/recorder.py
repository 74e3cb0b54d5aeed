"""GradMonitor: per-layer gradient statistics for every training step, without host syncs.

Usage::

    monitor = GradMonitor(model, max_norm=1.0)
    for step, batch in enumerate(loader):
        loss = model(batch).mean()
        loss.backward()
        monitor.step()            # stats (+ clipping) in one pass, stays on the device
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(monitor.report())   # one host sync per logging interval

Design choices (the issue left them open):

* The parameter *names* are fixed at construction: every parameter of the model, frozen
  ones included, so a layer unfrozen later is measured and clipped with the rest. A
  parameter whose ``.grad`` is ``None`` in a step is recorded with zero statistics and
  ``present=False``; the diagnosis, spike detection and loggers ignore it there.
* The parameter *objects* are followed by name: when the model's parameters are replaced
  (``load_state_dict(..., assign=True)``) :meth:`GradMonitor.step` notices it (one dict
  lookup per parameter, no sync) and tracks the new ones; :meth:`GradMonitor.attach`
  does the same for a new model object. Several steps in a row without any gradient
  raise a warning and make the diagnosis ``no_gradients``.
* Skipping (``skip_nonfinite``) is decided from the NaN/Inf counts of the same pass (any
  norm type: a 0-norm counts a NaN as nonzero and stays finite) or an overflow of the
  float32 (float64 for float64 gradients) total, never from the total cast back to
  fp16: finite fp16 gradients whose norm exceeds 65504 are a finite update.
* Recorded norms are the gradients as they came out of ``backward()``, before clipping;
  the clip coefficient that was applied is recorded next to them (1.0 when not clipping).
* Step numbers count calls to :meth:`GradMonitor.step` from 0 and are kept on the host
  (they are Python ints the monitor already knows), not in device memory.
* Spikes: a norm is a spike when its natural log exceeds an exponential moving average
  of the log-norm by more than ``spike_threshold`` EMA standard deviations *and* the norm
  is at least ``spike_min_ratio`` times the EMA level (the ratio keeps a very steady run,
  whose EMA standard deviation is tiny, from flagging harmless wiggles). Log space,
  because gradient norms vary multiplicatively. The detector runs on the host when
  :meth:`GradMonitor.flush` copies the recorded rows there, in step order
  (:mod:`fastgradstats.monitor.spikes`): on the device it would be ~30 tiny kernel
  launches per step.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import core, engine, handoff, inputs
from ..stats import GradStats
from ..torch_backend import host_to_device
from .diagnosis import NO_GRADIENT_STEPS, Diagnosis, diagnose
from .events import Events
from .history import (
    ARRAY_FIELDS,
    HISTOGRAM_FIELDS,
    PARAM_FIELDS,
    DeviceRing,
    HistogramHistory,
    HistogramRing,
    History,
    empty_arrays,
    empty_histogram_arrays,
)
from .keys import Keys
from .logspec import LogSpec
from .params import (
    check_max_norm,
    find_owners,
    named_parameters,
    positive_float,
    positive_int,
)
from .plots import plot_histograms, plot_history
from .spikes import SpikeDetector
from .writers import CsvWriter, HistoryWriter, JsonlWriter, TensorBoardWriter, WandbWriter


class LruCache:
    """A small least-recently-used dict, safe to share between threads.

    Under MoE routing the set of parameters with gradients can differ every step; an
    unbounded cache keyed by that set would grow by one device tensor per step, forever.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:  # get + move_to_end must not interleave with another put
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __getstate__(self) -> dict[str, Any]:
        return {"maxsize": self.maxsize, "_data": OrderedDict(self._data)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


_STATE_VERSION = 2  # 2: the spike EMA is host state, updated at flush
# 1: same fields, but its EMA was updated at every recorded step (so it already holds the
# rows not yet flushed) and each row's spike flags are in ring["spike"]: those rows keep
# these flags and are not fed to the EMA again (see _spikes_ahead)
_READABLE_VERSIONS = (1, 2)
_STATE_KEYS = (
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


def _nonfinite_counts(stats: GradStats) -> tuple[Tensor, ...]:
    """The NaN/Inf count tensors of ``stats``: the fused pass's one ``[2, n]`` block when
    there is one (a single reduction), else the two ``[n]`` vectors."""
    packed = stats._packed
    if packed is not None and len(stats):
        return (packed[1],)
    return (stats.nan_count, stats.inf_count)


class GradMonitor:
    """Watches every parameter's gradient every step, on the device, and diagnoses trouble.

    Args:
        model: an ``nn.Module`` (all its ``named_parameters()``, frozen ones included), or
            an iterable of Tensors / ``(name, Tensor)`` pairs. The names are fixed at
            construction; replaced parameters of the module are followed by name.
            Uninitialized lazy parameters (``nn.LazyLinear`` before its first forward)
            raise ``ValueError``.
        max_norm: when set, :meth:`step` also clips the total gradient norm to it (same
            single pass as the stats; torch's ``clip_grad_norm_`` semantics, except that
            for fp16 gradients the coefficient comes from the float32 total: torch's, from
            the fp16 total, is 0 once that total exceeds 65504, which would erase a finite
            update). ``0`` is
            taken as "no clipping" (Hugging Face's ``max_grad_norm=0``), with a warning;
            torch's ``max_norm=0`` would zero every gradient. An adaptive clipper
            (:class:`fastgradstats.ZClip`, :class:`fastgradstats.AutoClip`, or any object
            with ``compute_coef(total_norm) -> (coef, skip)``) clips by its own rule: the
            monitor measures, the clipper decides the coefficient on the device, and its
            state advances once per :meth:`step` (record it with ``clipper.state_dict()``).
        norm_type: p of the norms (2, 1, ``inf``, any p torch accepts).
        history: ring-buffer length in recorded steps; the device holds ``history`` rows
            of ``n_params`` floats per field. Call :meth:`flush` (or anything that syncs:
            :meth:`report`, :meth:`to_dict`, :meth:`history`) at least every ``history``
            recorded steps or the oldest rows are lost to the writers and tallies.
        every: record every ``every``-th step (clipping and ``skip_nonfinite`` still act on
            every step).
        skip_nonfinite: on a step whose gradients hold NaN/Inf, suppress the optimizer
            update without a host sync. With an optimizer that supports AMP's
            ``found_inf`` (``torch.optim.Adam/AdamW/SGD(fused=True)``), pass it as
            ``optimizer=`` and it receives ``optimizer.found_inf`` so the fused kernel skips
            the update and its step counter; otherwise every gradient is set to 0 on that
            step (masked on the device), which stops plain SGD but not momentum or Adam
            moments already accumulated. ``optimizer.found_inf`` is set only during that
            optimizer's next step (step hooks; see :mod:`fastgradstats.handoff`).
            Decided from the NaN/Inf counts and the float32 total (see the module notes);
            on steps that are not recorded this computes the same stats as a recorded
            step (on the Triton backend that is the same single pass as the norm alone).
        optimizer: the optimizer that steps on these gradients (also accepted by
            :meth:`step`). A fused one (``Adam``/``AdamW``/``SGD(fused=True)``) whose
            parameters are exactly the monitored ones with a gradient receives the clip
            coefficient as ``grad_scale`` (no scaling pass; see
            :mod:`fastgradstats.handoff`), and ``found_inf`` for ``skip_nonfinite``;
            with any other optimizer the monitor scales the gradients itself.
        hand_off: ``False`` always scales in the monitor, even for a fused optimizer (on a
            GPU a handed-over coefficient makes the optimizer write every gradient back
            even on steps that needed no clipping).
        spike_threshold: z-score (in log-norm, EMA statistics) above which a norm is a spike.
        spike_min_ratio: a spike must also be this many times the EMA level of the norm.
        spike_beta: EMA decay per recorded step (0.98: about 50 steps of memory).
        spike_warmup: recorded steps with a (finite) gradient before a parameter's spikes
            can be flagged, counted per parameter (and for the total norm).
        prefix: put in front of every logger key (``to_dict()``, TensorBoard, W&B).
        key_style: ``"fastgradstats"`` (``grad_norm/<name>``, ``grad_norm_total``; the
            norm type in the key when p != 2) or ``"lightning"`` (the keys of
            ``lightning.pytorch.utilities.grad_norm``: ``grad_2.0_norm/<name>``,
            ``grad_2.0_norm_total``); see :mod:`fastgradstats.monitor.keys`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (default: ``$FASTGRADSTATS_BACKEND``).
        foreach: passed to the torch backend.
        histograms: also record each layer's |g| histogram (power-of-two bins, see
            :mod:`fastgradstats.histogram`) every ``histogram_every`` recorded steps, before
            clipping, into a device ring of ``histogram_history`` rows (int64
            ``[histogram_history, n_params, 152]``: 8 * 152 bytes per parameter and row,
            GPT-2's 148 tensors take 11.6 MB at 64 rows). No host sync; on the Triton
            backend one extra launch per (device, dtype) group on those steps. DTensor
            parameters get the histograms of the full parameters (one more all-reduce).
        histogram_every: record a histogram every this many recorded steps (the first
            recorded step has one).
        histogram_history: rows of the histogram ring; flush at least every
            ``histogram_history * histogram_every`` recorded steps.
        histogram_dtypes: the formats :meth:`report` and :meth:`to_dict` judge the latest
            histogram against. Default: the parameters' own 16-bit dtypes when there are
            any (fp16/bf16 training), else ``float16`` and ``float8_e4m3fn`` (the formats
            an fp32 run would move to, and where gradients underflow first).
        log: what :meth:`to_dict` and the TensorBoard / W&B writers send per step:
            ``"totals"`` (the total norm, clip coefficient, NaN/skip/spike flags and
            tallies), ``"blocks"`` (the totals and per-block norm, max |g| and NaN/Inf
            count, reduced correctly: norms combine as norms, counts add, max as max) or
            ``"layers"`` (the totals and every parameter; the default, or ``"blocks"`` when
            ``group_by`` is given). See :mod:`fastgradstats.monitor.logspec`.
        group_by: the blocks of ``log="blocks"``: an int depth (``2``:
            ``layers.0.attn.weight`` -> ``layers.0``), a regular expression whose first
            group names the block, or ``None`` (by owning module).
        include / exclude: regular expressions (one or a list) a parameter name must
            match / must not match (``re.search``) to be logged on its own or in a block;
            the totals always cover every parameter.
        top_k: log only the ``top_k`` layers (or blocks) with the largest norm each step
            (non-finite ones first).
        param_norms: also record, per parameter with a gradient, the weights' norm
            ``||w||`` (same ``norm_type``) as they are at :meth:`step` and ``||w - w_prev||``,
            w_prev being the weights at the previous recorded step; logged as
            ``param_norm/<name>``, ``update_ratio/<name>`` (``||w - w_prev|| / ||w||``: the
            relative size of the last optimizer update; with ``every=k`` it spans k
            optimizer steps) and ``param_norm_total``. The first recorded step of each
            parameter (also after :meth:`load_state_dict` or :meth:`attach`: the previous
            weights are not part of the state) has a NaN ratio, as does ``||w|| = 0``.
            Cost: one persistent copy of the tracked weights (their own dtype), and per
            recorded step a separate read of the weights by torch foreach launches (norm of
            w, subtract, norm of the difference, copy; per (device, dtype) group, not per
            parameter) plus two ring writes; the Triton stats kernel reads gradients only.
            No host sync.

    Attributes:
        found_inf: 0-d bool device tensor after each :meth:`step` that measured the
            gradients (recorded steps, and every step with ``skip_nonfinite``): True when
            they held NaN/Inf (any norm type) or their float32 total overflowed; ``None``
            otherwise.
        last_stats: the :class:`~fastgradstats.GradStats` of the latest recorded step.
        keys: the :class:`~fastgradstats.monitor.keys.Keys` naming every logged value.
        log_spec: the :class:`~fastgradstats.monitor.logspec.LogSpec` built from ``log``,
            ``group_by``, ``include``, ``exclude`` and ``top_k``.
    """

    index_cache_size = 16  # device index tensors kept for rows with missing gradients
    no_grad_warn_steps = NO_GRADIENT_STEPS  # warn after this many steps without any gradient

    def __init__(
        self,
        model: nn.Module | Iterable[Any],
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
        history: int = 1000,
        every: int = 1,
        *,
        skip_nonfinite: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        hand_off: bool = True,
        spike_threshold: float = 6.0,
        spike_min_ratio: float = 2.0,
        spike_beta: float = 0.98,
        spike_warmup: int = 20,
        prefix: str = "",
        key_style: str = "fastgradstats",
        backend: str | None = None,
        foreach: bool | None = None,
        histograms: bool = False,
        histogram_every: int = 1,
        histogram_history: int = 64,
        histogram_dtypes: Iterable[Any] | None = None,
        log: str | None = None,
        group_by: int | str | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        top_k: int | None = None,
        param_norms: bool = False,
    ) -> None:
        self.log_spec = LogSpec(log, group_by, include, exclude, top_k)  # checks first
        if not isinstance(param_norms, bool):
            raise TypeError(f"param_norms must be a bool, got {param_norms!r}")
        self.param_norms = param_norms
        pairs = named_parameters(model)
        self.names = [name for name, _ in pairs]
        self._index = {name: j for j, name in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError("model has duplicate parameter names")
        self._bind(model, pairs)
        self.clipper: Any = max_norm if callable(getattr(max_norm, "compute_coef", None)) else None
        self.max_norm = None if self.clipper is not None else check_max_norm(max_norm)
        self.hand_off = bool(hand_off)
        self.norm_type = inputs.check_norm_type(norm_type)
        self.capacity = positive_int(history, "history")
        self.every = positive_int(every, "every")
        self.skip_nonfinite = bool(skip_nonfinite)
        self.optimizer = optimizer
        handoff.watch(optimizer)  # hooks before the first step: it may clip in step(closure)
        self.spike_threshold = positive_float(spike_threshold, "spike_threshold")
        self.spike_min_ratio = positive_float(spike_min_ratio, "spike_min_ratio")
        if not 0.0 < float(spike_beta) < 1.0:
            raise ValueError(f"spike_beta must be in (0, 1), got {spike_beta!r}")
        self.spike_beta = float(spike_beta)
        if isinstance(spike_warmup, bool) or not isinstance(spike_warmup, int) or spike_warmup < 0:
            raise ValueError(f"spike_warmup must be a non-negative int, got {spike_warmup!r}")
        self.spike_warmup = spike_warmup
        self.keys = Keys(prefix, key_style, self.norm_type)
        self.backend = backend
        self.foreach = foreach
        self.histograms = bool(histograms)
        self.histogram_every = positive_int(histogram_every, "histogram_every")
        self.histogram_capacity = positive_int(histogram_history, "histogram_history")
        self.histogram_dtypes = self._histogram_targets(pairs, histogram_dtypes)

        self.device = self.params[0].device
        self.dtype = (
            torch.float64
            if any(p.dtype in (torch.float64, torch.complex128) for p in self.params)
            else torch.float32
        )
        self._writers: list[HistoryWriter] = []
        self.reset()

    def _histogram_targets(self, pairs: list[tuple[str, Tensor]], dtypes: Any) -> list[Any]:
        from ..histogram import SUPPORTED_DTYPES
        from ..precision import float_format

        if self.histograms:
            for name, p in pairs:
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(
                        f"histograms=True: parameter {name!r} has dtype {p.dtype}; histograms "
                        "support float32, bfloat16, float16 and float64"
                    )
        if dtypes is not None:
            targets = [dtypes] if isinstance(dtypes, (torch.dtype, str)) else list(dtypes)
            return [float_format(d).dtype for d in targets]  # ValueError names the argument
        own = [d for d in (torch.float16, torch.bfloat16) if any(p.dtype == d for _, p in pairs)]
        return own or [torch.float16, torch.float8_e4m3fn]

    # -- the parameters --------------------------------------------------------------------

    def _bind(self, model: Any, pairs: list[tuple[str, Tensor]]) -> None:
        """Track ``pairs`` (in ``self.names`` order); remember how to find them in ``model``."""
        self._model = model if isinstance(model, nn.Module) else None
        self.params = [p for _, p in pairs]
        # built once: 10k fresh tuples per step cost more (GC passes) than the fused read
        self._pairs = list(zip(self.names, self.params))
        self.numels = [p.numel() for p in self.params]
        self.ndims = [p.dim() for p in self.params]
        # fp16: the clip coefficient comes from the float32 total (see _clip_and_measure)
        self._fp16 = any(p.dtype == torch.float16 for p in self.params)
        self._owners = find_owners(model, pairs) if self._model is not None else None
        # param_norms=True: the weights at the previous recorded step, by name (new
        # parameter objects start over: their first ratio is NaN)
        self._prev: dict[str, Tensor] = {}
        self._param_plan_all: Any = None  # _param_plan of every parameter, once built

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled (or deep-copied): the monitor now watches the copy of the model that
        # was pickled with it. step() refuses while that copy has no gradient at all (the
        # monitor was restored apart from its model: it would record 0 and clip nothing).
        self.__dict__.update(state)
        self._unpickled = True

    def _check_unpickled(self) -> None:
        if not self.__dict__.get("_unpickled"):
            return
        if any(p.grad is not None for p in self.params):  # host attributes: no sync
            self._unpickled = False  # pickled with its model, which is the one training
            return
        raise RuntimeError(
            "GradMonitor.step(): this monitor was unpickled (or deep-copied) and watches "
            "the copy of the model that was pickled with it, whose parameters have no "
            "gradients; nothing was recorded or clipped. Call monitor.attach(model) with "
            "the model you train, then step() again"
        )

    def _params_moved(self) -> bool:
        owners = self._owners
        if owners is None:
            return False
        return any(
            module._parameters.get(leaf) is not p for (module, leaf), p in zip(owners, self.params)
        )

    def attach(self, model: nn.Module | Iterable[Any]) -> None:
        """Track the parameters of ``model`` (by name) from now on; the history is kept.

        :meth:`step` does this by itself when the parameters of the model it was created
        with are replaced (``load_state_dict(..., assign=True)``, ``to_empty``); call it
        when the model object itself is new (unpickled or rebuilt). Raises ``ValueError``
        when ``model`` lacks a monitored name.
        """
        current = dict(named_parameters(model))
        missing = [name for name in self.names if name not in current]
        if missing:
            listed = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"model lacks {len(missing)} monitored parameter(s): {listed}; "
                "create a new GradMonitor for a model with different parameters"
            )
        self._bind(model, [(name, current[name]) for name in self.names])
        self._unpickled = False

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything recorded (buffers are reallocated and zeroed)."""
        h, n, dev, dt = self.capacity, len(self.names), self.device, self.dtype
        self._ring = DeviceRing(h, n, dev, dt, self.param_norms)
        self._prev = {}
        self._param_plan_all = None
        self._spikes = SpikeDetector(
            n, self.spike_threshold, self.spike_min_ratio, self.spike_beta, self.spike_warmup, dt
        )
        # (first row, flags [k, n + 1]) of rows already in the spike EMA but not flushed
        # (a version-1 state): flush() takes their flags from here, not from the detector
        self._spikes_ahead: tuple[int, np.ndarray] | None = None
        self._calls = 0  # calls to step()
        self._recorded = 0  # rows written to the ring
        self._flushed = 0  # rows copied to the host
        self._mirror: History | None = None  # host copy of the ring, filled by flush()
        self._events = Events()
        self.lost_rows = 0
        self._total_acc: Tensor | None = None  # the latest float32/float64 total
        self._counts: Any = None  # that pass's NaN/Inf counts (device tensors)
        self._found: Tensor | None = None  # counts or ~isfinite(_total_acc), when asked for
        self.last_stats: GradStats | None = None
        self._index_cache = LruCache(self.index_cache_size)
        self._no_grad_steps = 0  # consecutive step() calls without any gradient
        self._reset_histograms()

    def _reset_histograms(self) -> None:
        n = len(self.names)
        self._hist_ring = (
            HistogramRing(self.histogram_capacity, n, self.device, self.dtype)
            if self.histograms
            else None
        )
        self._hist_recorded = 0
        self._hist_flushed = 0
        self._hist_mirror: HistogramHistory | None = None
        self.lost_histograms = 0

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as if never interrupted.

        The recorded history (device ring and its host copy, including rows not yet
        flushed, which the loading monitor's writers then receive), the spike detector's
        EMA and per-parameter warm-up counts, the tallies and the step counters. Tensors
        are cloned on their device (no host sync); every other value is a plain Python
        type, so ``torch.load(..., weights_only=True)`` reads it back. The model, the
        optimizer and the writers are not part of it, nor are the histograms
        (``histograms=True``): a resumed monitor starts its histogram ring empty. After
        loading a version-1 state and before the next flush, ``"ema_ahead"`` also holds
        the spike flags of the unflushed rows that EMA already includes.
        """
        ring = self._ring
        mirror = None
        if self._mirror is not None:
            mirror = {
                name: torch.from_numpy(np.array(getattr(self._mirror, name)))
                for name in ARRAY_FIELDS + PARAM_FIELDS
                if getattr(self._mirror, name) is not None
            }
        return {
            "version": _STATE_VERSION,
            "names": list(self.names),
            "norm_type": self.norm_type,
            "history": self.capacity,
            "counters": {
                "calls": self._calls,
                "recorded": self._recorded,
                "flushed": self._flushed,
                "lost_rows": self.lost_rows,
                "no_grad_steps": self._no_grad_steps,
            },
            "ring": {name: getattr(ring, name).clone() for name in ring.tensors()},
            "host_steps": torch.from_numpy(ring.host_steps.copy()),
            "ema": self._spikes.state_dict(),  # as of the last flush (rows after it follow)
            "mirror": mirror,
            "events": self._events.state_dict(),
            **self._spikes_ahead_state(),
        }

    def _spikes_ahead_state(self) -> dict[str, Any]:
        # only after loading a version-1 state, until the next flush: the EMA is ahead of
        # the flushed rows, and these are the flags of the rows it already holds
        if self._spikes_ahead is None:
            return {}
        start, flags = self._spikes_ahead
        return {"ema_ahead": {"start": start, "spikes": torch.from_numpy(flags.copy())}}

    def _load_spikes_ahead(self, state: dict[str, Any]) -> tuple[int, np.ndarray] | None:
        """The rows of ``state`` whose spike flags are known and already in its EMA."""
        n, capacity = len(self.names), self.capacity
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a monitor of the same parameters.

        Raises ``ValueError`` (and changes nothing) when the state was saved for other
        parameter names, another ``history`` length or another ``norm_type``.
        """
        if not isinstance(state, dict) or state.get("version") not in _READABLE_VERSIONS:
            raise ValueError("state is not a GradMonitor.state_dict() (or from an unknown version)")
        missing_keys = [k for k in _STATE_KEYS if k not in state]
        if missing_keys:
            raise ValueError(f"state_dict lacks {missing_keys}")
        if list(state["names"]) != self.names:
            theirs = list(state["names"])
            missing = [n for n in self.names if n not in theirs]
            extra = [n for n in theirs if n not in self.names]
            raise ValueError(
                "state_dict was saved for other parameters: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
                + (" (same names, other order)" if not missing and not extra else "")
            )
        if int(state["history"]) != self.capacity:
            raise ValueError(
                f"state_dict has history={state['history']}, this monitor history={self.capacity}"
            )
        if float(state["norm_type"]) != self.norm_type:
            raise ValueError(
                f"state_dict has norm_type={state['norm_type']}, this monitor "
                f"norm_type={self.norm_type}"
            )
        ring = self._ring
        # a state saved without param_norms leaves this ring's weight norms at 0
        names = [name for name in ring.tensors() if name != "params" or name in state["ring"]]
        for name in names:  # check every shape before writing anything
            if tuple(state["ring"][name].shape) != tuple(getattr(ring, name).shape):
                raise ValueError(f"state_dict ring field {name!r} has the wrong shape")
        events = Events.from_state_dict(state["events"])
        spikes_ahead = self._load_spikes_ahead(state)  # checks shapes before writing
        self._spikes.load_state_dict(state["ema"])  # checks its shapes before writing
        self._spikes_ahead = spikes_ahead
        for name in names:
            getattr(ring, name).copy_(state["ring"][name])
        ring.host_steps[:] = state["host_steps"].cpu().numpy()
        self._mirror = None
        if state["mirror"] is not None:
            arrays = self._empty_arrays(self.capacity)
            for name in ARRAY_FIELDS + PARAM_FIELDS:
                if name in state["mirror"] and (name in ARRAY_FIELDS or self.param_norms):
                    arrays[name] = state["mirror"][name].cpu().numpy().copy()
            self._mirror = self._as_history(arrays)
        counters = state["counters"]
        self._calls = int(counters["calls"])
        self._recorded = int(counters["recorded"])
        self._flushed = int(counters["flushed"])
        self.lost_rows = int(counters["lost_rows"])
        self._no_grad_steps = int(counters["no_grad_steps"])
        self._events = events
        self._reset_histograms()  # histograms are not part of the state (see state_dict)

    @property
    def total_key(self) -> str:
        """The logger key of the total gradient norm (e.g. ``"grad_norm_total"``)."""
        return self.keys.total

    @property
    def num_steps(self) -> int:
        """Calls to :meth:`step` so far."""
        return self._calls

    def add_writer(self, writer: HistoryWriter) -> HistoryWriter:
        """Send every flushed chunk of history to ``writer`` (``write(history)``)."""
        if not callable(getattr(writer, "write", None)):
            raise TypeError("writer must have a write(history) method")
        self._writers.append(writer)
        return writer

    # -- the per-step path: no host sync below ------------------------------------------

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer | None = None) -> Tensor | None:
        """Record (and clip) this step's gradients. Call after backward, before optimizer.step.

        Returns the total gradient norm before clipping (0-d tensor on the device), or
        ``None`` on a step that is neither recorded nor needs a norm. Never syncs.
        """
        self._check_unpickled()
        if self._params_moved():
            # Same model, new parameter objects (load_state_dict(assign=True), ...):
            # follow them by name instead of silently watching the old ones.
            self.attach(self._model)
        self._count_missing_grads()
        step_no = self._calls
        record = step_no % self.every == 0
        hist_now = record and self.histograms and self._recorded % self.histogram_every == 0
        optimizer = optimizer or self.optimizer
        # the histograms come from the same read as the norms, before clipping
        total, total32, stats = self._clip_and_measure(
            record or self.skip_nonfinite, optimizer, hist_now
        )
        self._calls = step_no + 1  # after the clip: a refused step is not counted
        self._total_acc, self._found = total32, None
        self._counts = None if stats is None else _nonfinite_counts(stats)
        if self.skip_nonfinite and total32 is not None:
            self._suppress_update(self.found_inf, optimizer)
        if stats is not None and record:
            self.last_stats = stats
            row = self._write_row(step_no, stats)
            if self.param_norms:
                self._write_param_norms(row, stats.names)
            if hist_now:
                self._write_histogram(step_no, stats)
        return total

    def _write_histogram(self, step_no: int, stats: GradStats) -> None:
        names, counts, zeros = stats.names, stats.histogram, stats.zero_count
        assert counts is not None and zeros is not None  # measured with histogram=True
        ring = self._hist_ring
        row = self._hist_recorded % ring.capacity
        self._hist_recorded += 1
        ring.host_steps[row] = step_no
        if len(names) == len(self.names):
            ring.counts[row].copy_(counts)
            ring.zeros[row].copy_(zeros)
            ring.max_abs[row].copy_(stats.max_abs)
            ring.present[row].fill_(True)
            return
        for buf in (ring.counts, ring.zeros, ring.max_abs, ring.present):
            buf[row].zero_()
        if names:
            index = self._present_index(names)
            ring.counts[row].index_copy_(0, index, counts.to(self.device))
            ring.zeros[row].index_copy_(0, index, zeros.to(self.device))
            ring.max_abs[row].index_copy_(0, index, stats.max_abs.to(self.device, self.dtype))
            ring.present[row].index_fill_(0, index, True)

    def _count_missing_grads(self) -> None:
        if any(p.grad is not None for p in self.params):  # host attributes: no sync
            self._no_grad_steps = 0
            return
        self._no_grad_steps += 1
        if self._no_grad_steps == self.no_grad_warn_steps:
            warnings.warn(
                f"GradMonitor: no monitored parameter has had a gradient for "
                f"{self._no_grad_steps} steps. Call step() after backward() and before "
                "zero_grad(). If the model was reloaded or the monitor unpickled apart "
                "from it, call monitor.attach(model); with DeepSpeed ZeRO the gradients "
                "are not in .grad.",
                RuntimeWarning,
                stacklevel=4,  # the user's step() call (past torch.no_grad's wrapper)
            )

    def _clip_and_measure(
        self, need_stats: bool, optimizer: Any = None, histogram: bool = False
    ) -> tuple[Tensor | None, Tensor | None, GradStats | None]:
        """Clip (when ``max_norm`` is set) and measure this step's gradients: the one place
        the monitor touches them besides ``skip_nonfinite``.

        Returns ``(total, total_acc, stats)``: the total norm as ``clip_grad_norm_`` returns
        it (promoted gradient dtype), the same total in the accumulation dtype (float32 or
        float64; ``None`` when not computed), and the per-parameter stats when
        ``need_stats``. The coefficient goes to ``optimizer`` when it can take it.
        """
        # The fixed rule runs in the measuring pass (the finalize kernel on the fused
        # path). An adaptive clipper's rule, and max_norm for fp16 gradients, are decided
        # from the float32 total instead: torch's fp16 rounding of the total would give a
        # finite update whose total exceeds 65504 a coefficient of 0 (the update erased).
        adaptive = self.clipper is not None or (self.max_norm is not None and self._fp16)
        if not (need_stats or adaptive or self.max_norm is not None):
            return None, None, None
        fixed = None if adaptive else self.max_norm
        request = engine.Request(
            self.norm_type, stats=need_stats, histogram=histogram, max_norm=fixed,
            backend=self.backend, foreach=self.foreach,
        )  # fmt: skip
        measured = engine.run(self._pairs, request)
        if measured.empty and adaptive:
            return None, None, None
        coef, commit = measured.coef, None
        if self.clipper is not None:
            # ZClip/AutoClip: the state moves only once the clip was applied, so a
            # refused step (an expanded gradient, ...) does not count the norm
            propose = getattr(self.clipper, "propose_coef", None)
            if propose is not None:
                coef, _skip, commit = propose(measured.total_acc)
            else:
                coef, _skip = self.clipper.compute_coef(measured.total_acc)
            coef = coef.to(measured.total_acc.device, measured.total_acc.dtype)
        elif adaptive:
            coef = core.clip_coefficient(self.max_norm, measured.total_acc)
        if coef is not None:
            measured.apply_(coef, optimizer if self.hand_off else None)
            if commit is not None:
                commit()
            if measured.stats is not None:
                measured.stats.clip_coef = coef
        total_acc = measured.total_acc if need_stats or adaptive else None
        return measured.returned_total, total_acc, measured.stats

    def _suppress_update(self, found_inf: Tensor, optimizer: Any) -> None:
        # A fused optimizer skips the update and its step counter on the device where
        # found_inf is 1 (as GradScaler arranges); handoff composes with a found_inf
        # already there and removes ours after the step, so nothing stale stays behind.
        if handoff.set_found_inf_(optimizer, found_inf):
            return
        # Other optimizers: the gradients are zeroed where found_inf is set, decided on
        # the device (Triton: nothing touched on a finite step; CPU: read for free). The
        # fused path reuses the stats pass's cached plan: no per-tensor checks per step.
        engine.zero_where_(self.params, self._pairs, found_inf, self.backend)

    @property
    def found_inf(self) -> Tensor | None:
        """0-d bool device tensor for the latest step that measured the gradients: True
        when they held NaN/Inf or their float32 total overflowed; ``None`` otherwise.

        Decided from the NaN/Inf counts of the pass that measured the norms (the total
        alone misses a NaN under ``norm_type=0``, which counts it as a nonzero) and from
        the float32 (or float64) total, never from the total cast to a 16-bit gradient
        dtype: finite fp16 gradients whose norm exceeds 65504 are a finite update (already
        clipped), not an overflow. Computed when first asked for (no sync; a few 0-d ops
        whatever the number of parameters).
        """
        if self._found is None and self._total_acc is not None:
            total = self._total_acc.to(self.device)
            # x - x is 0 exactly for every finite x, NaN for NaN/Inf: ~isfinite in two ops
            # (torch decomposes isfinite into four, plus the not)
            found = (total - total).ne(0)
            for counts in self._counts or ():
                found = found | counts.any().to(self.device)
            self._found = found
        return self._found

    def _present_index(self, names: list[str]) -> Tensor:
        key = tuple(self._index[name] for name in names)
        index = self._index_cache.get(key)
        if index is None:
            # pinned, non-blocking: step() must not wait for the GPU
            index = host_to_device(list(key), torch.int64, self.device)
            self._index_cache.put(key, index)
        return index

    def _param_plan(self, names: list[str]) -> tuple[list[Any], list[str], list[str]]:
        """``(groups, order, fresh)`` for the parameters ``names``: per (device, dtype)
        group ``(acc dtype, weights, previous-weight copies)``, the names in group order,
        and the names whose copy was just made (their first ratio is NaN)."""
        members: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name in names:
            p = self.params[self._index[name]]
            members.setdefault((p.device, p.dtype), []).append(name)
        groups: list[Any] = []
        order: list[str] = []
        fresh: list[str] = []
        for (_, dtype), group in members.items():
            # no detach(): step() runs under no_grad, and a detach per parameter would be
            # one more op per parameter
            ws = [self.params[self._index[name]] for name in group]
            prev = []
            for name, w in zip(group, ws):
                old = self._prev.get(name)
                if old is None or old.shape != w.shape:
                    old = self._prev[name] = w.clone()
                    fresh.append(name)
                prev.append(old)
            # accumulate in float32 at least, float64 for float64 weights; the norm of a
            # complex tensor is real already
            acc = (
                None
                if dtype.is_complex
                else (torch.float64 if dtype == torch.float64 else torch.float32)
            )
            groups.append((acc, ws, prev))
            order += group
        return groups, order, fresh

    def _write_param_norms(self, row: int, names: list[str]) -> None:
        """Ring row ``row`` gets ||w|| and ||w - w_prev|| of the parameters ``names`` (those
        with a gradient), and w_prev becomes w. No host sync; per (device, dtype) group a
        fixed number of foreach launches, whatever the number of parameters."""
        out = self._ring.params
        assert out is not None
        every = len(names) == len(self.names)  # all present: the plan is reused
        plan = self._param_plan_all if every else None
        if plan is None:
            groups, order, fresh = self._param_plan(names)
            if every:
                self._param_plan_all = (groups, order, [])
        else:
            groups, order, fresh = plan
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
            out[row].index_copy_(1, self._present_index(order), both.to(self.device, self.dtype))
        if fresh:
            out[row, 1].index_fill_(0, self._present_index(fresh), float("nan"))

    def _write_row(self, step_no: int, stats: GradStats) -> int:
        ring = self._ring
        row = self._recorded % self.capacity
        self._recorded += 1
        ring.host_steps[row] = step_no
        n = len(self.names)
        fields = [
            (ring.norms, stats.norms),
            (ring.max_abs, stats.max_abs),
            (ring.nan, stats.nan_count),
            (ring.inf, stats.inf_count),
        ]
        packed = stats._packed
        if len(stats) == n and packed is not None and packed[0].dtype == ring.floats.dtype:
            ring.floats[row].copy_(packed[0])  # the fused pass's [2, n] blocks as they are
            ring.counts[row].copy_(packed[1])
            ring.present[row].fill_(True)
        elif len(stats) == n:
            for buf, value in fields:
                buf[row].copy_(value)
            ring.present[row].fill_(True)
        else:
            index = self._present_index(stats.names)
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
        found = self.found_inf if self.skip_nonfinite else None
        if found is not None:
            ring.skipped[row].copy_(found)
        return row

    # -- syncing side: once per logging interval ----------------------------------------

    def flush(self) -> History:
        """Copy the rows recorded since the last flush to the host (one sync) and log them.

        Returns those rows as a :class:`History` (oldest first); updates the tallies
        (NaN/Inf first seen, spikes, skipped and clipped steps) and calls the writers.
        """
        new = self._recorded - self._flushed
        lost = max(0, new - self.capacity)
        self.lost_rows += lost
        count = new - lost
        first = self._recorded - count
        rows = [r % self.capacity for r in range(first, self._recorded)]
        chunk = self._gather(rows)
        spikes = self._detect_spikes(first, chunk)
        chunk.spike_layer, chunk.spike_total = spikes[:, :-1], spikes[:, -1]
        self._flushed = self._recorded
        self._merge_mirror(rows, chunk)
        chunk.histograms = self._flush_histograms()
        self._events.add(chunk, spike_cap=1000)
        if lost:
            warnings.warn(
                f"GradMonitor: {lost} recorded steps were overwritten before flush(); "
                f"flush at least every history={self.capacity} recorded steps",
                stacklevel=2,
            )
        for writer in self._writers:
            writer.write(chunk)
        return chunk

    def _detect_spikes(self, first: int, chunk: History) -> np.ndarray:
        """Spike flags of ``chunk`` (rows ``first`` ... in recording order): from the
        detector, except for rows its EMA already holds (a version-1 state's), which keep
        the flags computed then and are not fed again."""
        ahead, self._spikes_ahead = self._spikes_ahead, None
        if ahead is None:
            return self._spikes.update(chunk.norms, chunk.total_norm, chunk.present)
        start, flags = ahead
        end = start + len(flags)
        known = max(0, end - first)  # rows before `first` were lost (overwritten)
        rest = self._spikes.update(
            chunk.norms[known:], chunk.total_norm[known:], chunk.present[known:]
        )
        return np.concatenate([flags[first - start : end - start], rest])

    def _flush_histograms(self) -> HistogramHistory | None:
        """Copy the histogram rows new since the last flush to the host mirror; return them."""
        ring = self._hist_ring
        if ring is None:
            return None
        new = self._hist_recorded - self._hist_flushed
        lost = max(0, new - ring.capacity)
        if lost:
            self.lost_histograms += lost
            warnings.warn(
                f"GradMonitor: {lost} histograms were overwritten before flush(); flush at "
                f"least every histogram_history={ring.capacity} histogram steps",
                stacklevel=3,
            )
        first = self._hist_recorded - (new - lost)
        rows = [r % ring.capacity for r in range(first, self._hist_recorded)]
        chunk = self._histogram_history(ring.gather(rows))
        self._hist_flushed = self._hist_recorded
        if self._hist_mirror is None:
            self._hist_mirror = self._histogram_history(
                empty_histogram_arrays(ring.capacity, len(self.names))
            )
        for name in HISTOGRAM_FIELDS:
            getattr(self._hist_mirror, name)[rows] = getattr(chunk, name)
        return chunk

    def _histogram_history(self, arrays: dict[str, np.ndarray]) -> HistogramHistory:
        return HistogramHistory(names=list(self.names), numels=list(self.numels), **arrays)

    def histogram_history(self) -> HistogramHistory | None:
        """The last ``min(histogram steps, histogram_history)`` histograms, oldest first
        (flushes); ``None`` without ``histograms=True``."""
        self.flush()
        return self._kept_histograms()

    def _kept_histograms(self) -> HistogramHistory | None:
        ring = self._hist_ring
        if ring is None:
            return None
        count = min(self._hist_recorded, ring.capacity)
        rows = [r % ring.capacity for r in range(self._hist_recorded - count, self._hist_recorded)]
        if self._hist_mirror is None:
            return self._histogram_history(empty_histogram_arrays(0, len(self.names)))
        return self._hist_mirror.select(rows)

    def _gather(self, rows: list[int]) -> History:
        return self._as_history(self._ring.gather(rows))

    def _as_history(self, arrays: dict[str, np.ndarray]) -> History:
        return History(
            names=list(self.names),
            numels=list(self.numels),
            ndims=list(self.ndims),
            norm_type=self.norm_type,
            max_norm=self.max_norm,
            keys=self.keys,
            **arrays,
        )

    def _empty_arrays(self, t: int) -> dict[str, Any]:
        arrays: dict[str, Any] = empty_arrays(t, len(self.names))
        if self.param_norms:
            arrays.update(
                param_norm=np.zeros((t, len(self.names))),
                update_norm=np.zeros((t, len(self.names))),
            )
        return arrays

    def _merge_mirror(self, rows: list[int], chunk: History) -> None:
        if self._mirror is None:
            self._mirror = self._as_history(self._empty_arrays(self.capacity))
        for name in ARRAY_FIELDS + PARAM_FIELDS:
            mirror = getattr(self._mirror, name)
            if mirror is not None:
                mirror[rows] = getattr(chunk, name)

    def history(self) -> History:
        """The last ``min(recorded, history)`` recorded steps, oldest first (flushes)."""
        self.flush()
        count = min(self._recorded, self.capacity)
        rows = [r % self.capacity for r in range(self._recorded - count, self._recorded)]
        out = self._gather([]) if self._mirror is None else self._mirror.select(rows)
        out.histograms = self._kept_histograms()
        return out

    def report(self, **kwargs: Any) -> Diagnosis:
        """Flush and diagnose (see :func:`diagnose` for ``kwargs``); ``str()`` it to print.

        With ``histograms=True`` the findings end with plain-words precision lines for the
        latest histogram step, one set per format in ``histogram_dtypes`` (e.g. "41% of
        `layers.3.mlp.w2` gradients fall below fp16's smallest normal; a loss scale of 2^9
        would keep them"), at most ``precision_lines_max`` per format, worst first.
        """
        history = self.history()
        diagnosis = diagnose(history, events=self._events, **kwargs)
        diagnosis.findings.extend(self._precision_findings(history.histograms))
        return diagnosis

    precision_lines_max = 8  # per target format, in report()

    def _precision_findings(self, hist: HistogramHistory | None) -> list[str]:
        from ..precision import precision_lines

        if hist is None or not len(hist):
            return []
        present = hist.present[-1]
        names = [name for name, keep in zip(self.names, present) if keep]
        keep = torch.from_numpy(np.flatnonzero(present))
        step = int(hist.steps[-1])
        out = []
        for dtype in self.histogram_dtypes:
            report = hist.report(-1, dtype)
            for field in ("nonzero", *type(report).FIELDS, "keep_exponent"):
                setattr(report, field, getattr(report, field)[keep])
            lines = precision_lines(report, names)
            more = len(lines) - self.precision_lines_max
            lines = lines[: self.precision_lines_max]
            if more > 0:
                lines.append(f"... and {more} more {report.format.name} findings")
            out += [f"step {step}: {line}" for line in lines]
        return out

    def to_dict(self) -> dict[str, float]:
        """The latest recorded step as plain floats for any logger; one sync (a flush).

        Keys (``key_style="fastgradstats"``, p = 2, ``prefix`` in front of each):
        ``grad_norm/<name>``, ``grad_norm_total`` (:attr:`total_key`),
        ``grad_max_abs/<name>``, ``grad_nonfinite/<name>`` (only when non-zero),
        ``grad_clip_coef``, ``grad_nonfinite``, ``grad_skipped``, ``grad_spike_total``, and
        running tallies ``grad_stats/nonfinite_steps``, ``grad_stats/skipped_steps``,
        ``grad_stats/spikes``. See :mod:`fastgradstats.monitor.keys` for the other styles.
        With ``histograms=True``, the latest histogram step's ``grad_zero_frac/<name>`` and
        ``grad_<fmt>_{flush_to_zero,subnormal,overflow}/<name>`` for each format in
        ``histogram_dtypes`` (shares of the nonzero finite values). With
        ``param_norms=True``, ``param_norm_total`` and per logged layer or block
        ``param_norm/<name>`` and ``update_ratio/<name>``.

        The per-parameter keys follow ``log`` / ``group_by`` / ``include`` / ``exclude`` /
        ``top_k`` (:attr:`log_spec`): ``"totals"`` keeps none, ``"blocks"`` has per-block
        norm / max |g| / NaN+Inf keys instead (no precision shares), ``"layers"`` the
        selected parameters.
        """
        hist = self.history()
        last = len(hist) - 1
        out = self.log_spec.row_dict(hist, last) if len(hist) else {}
        if hist.histograms is not None and len(hist):
            shown = set(self.log_spec.layer_names(hist, last))  # log="layers" only
            precision = hist.histograms.precision_dict(self.histogram_dtypes, self.keys)
            cut = len(self.keys.prefix)  # keys are {prefix}grad_<what>/<name>
            out.update({k: v for k, v in precision.items() if k[cut:].split("/", 1)[1] in shown})
        out[self.keys.tally("nonfinite_steps")] = float(self._events.nonfinite_steps)
        out[self.keys.tally("skipped_steps")] = float(self._events.skipped_steps)
        out[self.keys.tally("spikes")] = float(self._events.spike_count)
        return out

    def log_jsonl(self, path: str | Path) -> JsonlWriter:
        """Append every flushed step to a JSON-lines file (see :class:`JsonlWriter`)."""
        return self.add_writer(JsonlWriter(path))  # type: ignore[return-value]

    def log_csv(self, path: str | Path) -> CsvWriter:
        """Append every flushed step to a long-format CSV file (see :class:`CsvWriter`)."""
        return self.add_writer(CsvWriter(path))  # type: ignore[return-value]

    def log_tensorboard(self, writer: Any = None, log_dir: str | None = None) -> TensorBoardWriter:
        """Log every flushed step to TensorBoard (needs ``tensorboard``), shaped by ``log`` /
        ``group_by`` / ``include`` / ``exclude`` / ``top_k``."""
        return self.add_writer(  # type: ignore[return-value]
            TensorBoardWriter(writer, log_dir, spec=self.log_spec)
        )

    def log_wandb(self, run: Any = None, *, rows: str = "latest") -> WandbWriter:
        """Log flushed steps to Weights & Biases (needs ``wandb``) without moving its step.

        ``rows="latest"``: each flush merges its newest row into the run's current step;
        ``rows="all"``: one W&B step per recorded row (see :class:`WandbWriter`).
        """
        return self.add_writer(  # type: ignore[return-value]
            WandbWriter(run, keys=self.keys, rows=rows, spec=self.log_spec)
        )

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save the heatmap + total-norm figure of :meth:`history` as a PNG (matplotlib)."""
        return plot_history(self.history(), path, title=title)

    def plot_histograms(
        self,
        path: str | Path,
        layer: str | None = None,
        dtype: Any = None,
        title: str | None = None,
    ) -> Path:
        """Save one layer's |g| histogram over steps (log2 |g| by step) and the per-layer
        underflow shares for ``dtype`` (default: the first of ``histogram_dtypes``) as a
        PNG; ``layer`` defaults to the one with the largest share below the normal range."""
        hist = self.histogram_history()
        if hist is None:
            raise ValueError("plot_histograms needs GradMonitor(histograms=True)")
        target = self.histogram_dtypes[0] if dtype is None else dtype
        return plot_histograms(hist, path, layer=layer, dtype=target, title=title)


__all__ = ["GradMonitor"]
