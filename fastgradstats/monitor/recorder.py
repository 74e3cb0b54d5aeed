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

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import core, engine, handoff, inputs
from ..backward import backward_stats
from ..lru import Lru
from ..stats import GradStats
from . import state as state_format
from .arguments import (
    check_in_backward,
    check_max_norm,
    check_spike_beta,
    check_spike_warmup,
    histogram_targets,
    positive_float,
    positive_int,
)
from .binding import Binding, named_parameters
from .diagnosis import NO_GRADIENT_STEPS, Diagnosis, diagnose
from .flush import HostLog
from .history import Frame, HistogramHistory, History
from .keys import Keys
from .logspec import LogSpec
from .plots import plot_histograms, plot_history
from .report import latest_dict, precision_findings
from .rings import HistogramRing, Rings
from .spikes import SpikeDetector
from .writers import CsvWriter, HistoryWriter, JsonlWriter, TensorBoardWriter, WandbWriter


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
        in_backward: measure the gradients during backward (``model`` must be the
            ``nn.Module``): post-accumulate-grad hooks, bucket by bucket, see
            :func:`fastgradstats.backward_stats`; :meth:`step` then only finishes (no read
            of the gradients on a step that needs no clipping). The handle is
            ``monitor.backward_stats`` (``unscale_``, ``accumulating()``, ``remove()``).
            Not with ``histograms=True``.

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
        in_backward: bool = False,
    ) -> None:
        self.log_spec = LogSpec(log, group_by, include, exclude, top_k)  # checks first
        check_in_backward(in_backward, model, histograms)
        if not isinstance(param_norms, bool):
            raise TypeError(f"param_norms must be a bool, got {param_norms!r}")
        self.param_norms = param_norms
        pairs = named_parameters(model)
        # the parameters, followed by name (see binding.py)
        self._binding = Binding(model, pairs, self.index_cache_size)
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
        self.spike_beta = check_spike_beta(spike_beta)
        self.spike_warmup = check_spike_warmup(spike_warmup)
        self.keys = Keys(prefix, key_style, self.norm_type)
        self.backend = backend
        self.foreach = foreach
        self.histograms = bool(histograms)
        self.histogram_every = positive_int(histogram_every, "histogram_every")
        self.histogram_capacity = positive_int(histogram_history, "histogram_history")
        self.histogram_dtypes = histogram_targets(pairs, self.histograms, histogram_dtypes)

        self.device = self._binding.device
        self.dtype = (
            torch.float64
            if any(p.dtype in (torch.float64, torch.complex128) for p in self.params)
            else torch.float32
        )
        self._writers: list[HistoryWriter] = []
        # statistics measured during backward (fastgradstats.backward): the step only
        # finishes them; the handle is public (unscale_, accumulating(), remove())
        self.backward_stats = (
            backward_stats(model, self.norm_type, backend=backend) if in_backward else None
        )
        self.reset()

    # -- the parameters (binding.py) -------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The monitored parameter names, fixed at construction."""
        return self._binding.names

    @property
    def params(self) -> list[Tensor]:
        """The monitored parameter tensors, in ``names`` order (followed by name)."""
        return self._binding.params

    @property
    def numels(self) -> list[int]:
        """Element counts of ``params``."""
        return self._binding.numels

    @property
    def ndims(self) -> list[int]:
        """Dimensions of ``params``."""
        return self._binding.ndims

    def attach(self, model: nn.Module | Iterable[Any]) -> None:
        """Track the parameters of ``model`` (by name) from now on; the history is kept.

        :meth:`step` does this by itself when the parameters of the model it was created
        with are replaced (``load_state_dict(..., assign=True)``, ``to_empty``); call it
        when the model object itself is new (unpickled or rebuilt). Raises ``ValueError``
        when ``model`` lacks a monitored name.
        """
        self._binding.follow(model)

    # -- the record: device rings (rings.py), host side (flush.py), state (state.py) -------

    def reset(self) -> None:
        """Forget everything recorded (buffers are reallocated and zeroed)."""
        self._binding.forget()
        histogram_capacity = self.histogram_capacity if self.histograms else None
        self._rings = Rings(
            self._binding,
            self.capacity,
            self.dtype,
            self.norm_type,
            self.param_norms,
            histogram_capacity,
        )
        spikes = SpikeDetector(
            len(self.names),
            self.spike_threshold,
            self.spike_min_ratio,
            self.spike_beta,
            self.spike_warmup,
            self.dtype,
        )
        self._log = HostLog(spikes)
        self._calls = 0  # calls to step()
        self._total_acc: Tensor | None = None  # the latest float32/float64 total
        self._counts: Any = None  # that pass's NaN/Inf counts (device tensors)
        self._found: Tensor | None = None  # counts or ~isfinite(_total_acc), when asked for
        self.last_stats: GradStats | None = None

    def _frame(self) -> Frame:
        return Frame(
            self.names,
            self.numels,
            self.ndims,
            self.norm_type,
            self.max_norm,
            self.keys,
            self.param_norms,
        )

    @property
    def lost_rows(self) -> int:
        """Recorded steps overwritten in the device ring before a flush copied them."""
        return self._log.lost_rows

    @property
    def lost_histograms(self) -> int:
        """Histogram steps overwritten in their device ring before a flush copied them."""
        return self._log.lost_histograms

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
        return state_format.state_dict(
            self._calls, self._frame(), self._binding, self._rings, self._log
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a monitor of the same parameters.

        Raises ``ValueError`` (and changes nothing) when the state was saved for other
        parameter names, another ``history`` length or another ``norm_type``.
        """
        self._calls = state_format.load_state_dict(
            state, self._frame(), self._binding, self._rings, self._log
        )

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

    # Read-only views of the collaborators' counters under the names these attributes had
    # before the split (tests and the integrations read them).

    @property
    def _model(self) -> nn.Module | None:
        return self._binding.model

    @property
    def _index_cache(self) -> Lru:
        return self._binding.index_cache

    @property
    def _recorded(self) -> int:
        return self._rings.recorded

    @property
    def _flushed(self) -> int:
        return self._log.flushed

    @property
    def _hist_recorded(self) -> int:
        return self._rings.hist_recorded

    @property
    def _hist_ring(self) -> HistogramRing | None:
        return self._rings.hist

    @property
    def _spikes(self) -> SpikeDetector:
        return self._log.spikes

    # -- the per-step path: no host sync below ------------------------------------------

    @engine.no_grad
    def step(self, optimizer: torch.optim.Optimizer | None = None) -> Tensor | None:
        """Record (and clip) this step's gradients. Call after backward, before optimizer.step.

        Returns the total gradient norm before clipping (0-d tensor on the device), or
        ``None`` on a step that is neither recorded nor needs a norm. Never syncs.
        """
        self._binding.check_unpickled()
        if self._binding.moved():
            # Same model, new parameter objects (load_state_dict(assign=True), ...):
            # follow them by name instead of silently watching the old ones.
            self.attach(self._binding.model)
        self._binding.count_missing_grads(self.no_grad_warn_steps)
        step_no = self._calls
        record = step_no % self.every == 0
        hist_now = record and self.histograms and self._rings.recorded % self.histogram_every == 0
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
            skipped = self.found_inf if self.skip_nonfinite else None
            row = self._rings.write_row(step_no, stats, skipped)
            if self.param_norms:
                self._rings.write_param_norms(row, stats.names)
            if hist_now:
                self._rings.write_histogram(step_no, stats)
        return total

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
        adaptive = self.clipper is not None or (self.max_norm is not None and self._binding.fp16)
        if not (need_stats or adaptive or self.max_norm is not None):
            return None, None, None
        fixed = None if adaptive else self.max_norm
        request = engine.Request(
            self.norm_type, stats=need_stats, histogram=histogram, max_norm=fixed,
            backend=self.backend, foreach=self.foreach,
        )  # fmt: skip
        measured = self._measure(request)
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

    def _measure(self, request: engine.Request) -> engine.Pass:
        """This step's measurement: the engine's whole line, or with ``in_backward`` only
        its finish (the gradients were measured bucket by bucket during backward)."""
        if self.backward_stats is None:
            return engine.run(self._binding.pairs, request)
        measured = self.backward_stats.finish(request)
        return measured if measured is not None else engine.run([], request)

    def _suppress_update(self, found_inf: Tensor, optimizer: Any) -> None:
        # A fused optimizer skips the update and its step counter on the device where
        # found_inf is 1 (as GradScaler arranges); handoff composes with a found_inf
        # already there and removes ours after the step, so nothing stale stays behind.
        if handoff.set_found_inf_(optimizer, found_inf):
            return
        # Other optimizers: the gradients are zeroed where found_inf is set, decided on
        # the device (Triton: nothing touched on a finite step; CPU: read for free). The
        # fused path reuses the stats pass's cached plan: no per-tensor checks per step.
        engine.zero_where_(self._binding.params, self._binding.pairs, found_inf, self.backend)

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

    # -- syncing side: once per logging interval ----------------------------------------

    def flush(self) -> History:
        """Copy the rows recorded since the last flush to the host (one sync) and log them.

        Returns those rows as a :class:`History` (oldest first); updates the tallies
        (NaN/Inf first seen, spikes, skipped and clipped steps) and calls the writers.
        """
        return self._log.flush(self._rings, self._frame(), self._writers)

    def history(self) -> History:
        """The last ``min(recorded, history)`` recorded steps, oldest first (flushes)."""
        self.flush()
        return self._log.history(self._rings, self._frame())

    def histogram_history(self) -> HistogramHistory | None:
        """The last ``min(histogram steps, histogram_history)`` histograms, oldest first
        (flushes); ``None`` without ``histograms=True``."""
        self.flush()
        return self._log.kept_histograms(self._rings, self._frame())

    # -- report and facades (report.py, writers.py, plots.py) ------------------------------

    def report(self, **kwargs: Any) -> Diagnosis:
        """Flush and diagnose (see :func:`diagnose` for ``kwargs``); ``str()`` it to print.

        With ``histograms=True`` the findings end with plain-words precision lines for the
        latest histogram step, one set per format in ``histogram_dtypes`` (e.g. "41% of
        `layers.3.mlp.w2` gradients fall below fp16's smallest normal; a loss scale of 2^9
        would keep them"), at most ``precision_lines_max`` per format, worst first.
        """
        history = self.history()
        diagnosis = diagnose(history, events=self._log.events, **kwargs)
        findings = precision_findings(
            history.histograms, self.names, self.histogram_dtypes, self.precision_lines_max
        )
        diagnosis.findings.extend(findings)
        return diagnosis

    precision_lines_max = 8  # per target format, in report()

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
        return latest_dict(
            self.history(), self.log_spec, self.keys, self.histogram_dtypes, self._log.events
        )

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
