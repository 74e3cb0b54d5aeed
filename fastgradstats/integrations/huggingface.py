"""Hugging Face ``Trainer`` callback: per-layer gradient stats (and clipping) in one fused pass.

Recommended use (transformers >= 4.45)::

    from fastgradstats.integrations.huggingface import attach

    trainer = Trainer(model=model, args=TrainingArguments(..., report_to="tensorboard"), ...)
    callback = attach(trainer)   # not Trainer(callbacks=[...]): see below
    trainer.train()
    print(callback.monitor.report())

Why ``attach`` rather than ``Trainer(callbacks=[GradMonitorCallback()])``:

* The Trainer runs callbacks in list order and puts the user's after the ``report_to``
  callbacks (TensorBoard, W&B, ...), so values a user callback adds to ``logs`` in
  ``on_log`` never reach them. ``attach`` inserts the callback first.
* The Trainer clips (``max_grad_norm > 0``) *before* ``on_pre_optimizer_step``, so a plain
  callback records clipped norms (flat at max_norm, spikes invisible). With ``attach`` the
  monitor does the Trainer's clipping itself, in the same pass as its stats, and records
  the norms before clipping; the Trainer's ``grad_norm`` log is the monitor's total norm.
* With ``max_grad_norm=0`` transformers 5.x still reads every gradient once more per step
  (``accelerator.clip_grad_norm_(..., inf)``) for its ``grad_norm`` log; ``attach`` hands
  it the monitor's total norm instead.

Without ``attach`` set ``TrainingArguments(max_grad_norm=0)`` and
``GradMonitorCallback(max_norm=...)`` to let the monitor clip; the callback warns when the
Trainer clips first. fp16 (``torch.amp.GradScaler`` through accelerate): the gradients are
unscaled before the monitor reads them (the scaler then does not unscale them again);
fp16 that the callback cannot unscale (no torch GradScaler on a CUDA run) is refused.
DeepSpeed keeps gradients outside ``param.grad``: not supported.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import TrainerCallback

from ..clip import clip_grad_norm_, get_total_norm
from ..monitor import GradMonitor
from ..monitor.logspec import check_log_options, total_keys
from . import check_max_norm_arg, inner_optimizer, is_clipper

__all__ = ["MIN_TRANSFORMERS", "GradMonitorCallback", "attach"]

MIN_TRANSFORMERS = "4.45"  # first release with the on_pre_optimizer_step hook
_FROM_TRAINER = "trainer"
CONSOLE_MODES = ("totals", "all")


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` below transformers 4.45 (no ``on_pre_optimizer_step`` hook)."""
    version = transformers.__version__ if version is None else version
    if Version(version) < Version(MIN_TRANSFORMERS) or not hasattr(
        TrainerCallback, "on_pre_optimizer_step"
    ):
        raise RuntimeError(
            f"fastgradstats' Hugging Face callback needs transformers >= {MIN_TRANSFORMERS} "
            f"(the on_pre_optimizer_step hook); this is transformers {version}, where the "
            "callback would never run and nothing would be clipped or recorded. Upgrade "
            "transformers, or call GradMonitor.step() yourself in a training_step override."
        )


def _grad_scaler(optimizer: Any) -> Any:
    """The enabled ``torch.amp.GradScaler`` of an accelerate optimizer, or ``None``."""
    seen = 0
    while optimizer is not None and seen < 8:
        seen += 1
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and callable(getattr(scaler, "unscale_", None)):
            enabled = getattr(scaler, "is_enabled", lambda: True)()
            return scaler if enabled else None
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def unscale_grads(optimizer: Any) -> bool:
    """Unscale fp16 loss-scaled gradients in place, once per step; True when a scaler is used.

    ``GradScaler.unscale_`` records that the optimizer's gradients are unscaled, so its
    ``step()`` does not unscale them again; a second ``unscale_`` in the same step (the
    Trainer's own clipping already did it) raises, which here means "already done".
    """
    scaler = _grad_scaler(optimizer)
    if scaler is None:
        return False
    try:
        scaler.unscale_(inner_optimizer(optimizer))
    except RuntimeError as exc:
        if "already been called" not in str(exc):
            raise
    return True


class GradMonitorCallback(TrainerCallback):
    """Runs a :class:`~fastgradstats.GradMonitor` inside ``Trainer.train``.

    Prefer :func:`attach` (see the module docstring) over ``Trainer(callbacks=[...])``.

    Args:
        max_norm: ``"trainer"`` (default): clip at ``TrainingArguments.max_grad_norm`` (when
            > 0; only with :func:`attach`, which does the Trainer's clipping in the
            monitor's pass); ``None``: the monitor does not clip; a number: the monitor
            clips at it (with :func:`attach` and ``max_grad_norm > 0`` too, at the smaller
            of the two, once; without ``attach`` the Trainer clips first and it warns).
            With a ``norm_type`` other than 2 the Trainer's clipping and ``grad_norm`` log
            stay 2-norms, computed after the monitor's pass. An adaptive clipper
            (:class:`fastgradstats.ZClip`, :class:`fastgradstats.AutoClip`): the monitor
            clips by it; with :func:`attach` and ``max_grad_norm > 0`` the Trainer's clip
            follows, in turn. Whenever a second clip follows the monitor's, the monitor
            scales in place (no hand-off to a fused optimizer), so the two apply in turn.
        console: what the Trainer's console line (progress bar or printer) shows of the
            monitor's values: ``"totals"`` (default: the total-norm flags and tallies, no
            per-layer keys) or ``"all"``. The loggers (``report_to``) and
            ``trainer.state.log_history`` always get everything ``log=`` selects. Needs
            :func:`attach` (a plain ``callbacks=[...]`` entry cannot reach the printer).
        **monitor_kwargs: passed to :class:`~fastgradstats.GradMonitor` (``norm_type``,
            ``history``, ``every``, ``skip_nonfinite``, ``prefix``, ``key_style``, and what
            to log: ``log``, ``group_by``, ``include``, ``exclude``, ``top_k``).

    ``on_log`` merges :meth:`GradMonitor.to_dict` into the training logs (and into
    ``trainer.state.log_history``) whenever the Trainer logs: one sync per logging step.
    When the Trainer's own ``grad_norm`` is the same number as the monitor's total (2-norm,
    ``every=1``, norms measured before the Trainer clips), the monitor's total key
    (``grad_norm_total``) is left out: ``grad_norm`` is logged once.
    After training, :attr:`monitor` holds the monitor.

    Raises:
        TypeError / ValueError: a ``max_norm`` of another kind (named in the message).
    """

    def __init__(
        self,
        max_norm: float | str | None = _FROM_TRAINER,
        *,
        console: str = "totals",
        **monitor_kwargs: Any,
    ):
        check_transformers_version()
        check_max_norm_arg("GradMonitorCallback", max_norm, _FROM_TRAINER)
        if console not in CONSOLE_MODES:
            raise ValueError(f"console must be one of {CONSOLE_MODES}, got {console!r}")
        check_log_options(monitor_kwargs)  # a bad log= fails here, not at the first step
        self.console = console
        self._hidden_on_console: set[str] = set()  # this log row's keys the console skips
        self._same_total = False  # the Trainer's grad_norm is the monitor's total
        if "optimizer" in monitor_kwargs or "model" in monitor_kwargs:
            raise TypeError("GradMonitorCallback takes the model and optimizer from the Trainer")
        self.max_norm = max_norm
        self.monitor_kwargs = monitor_kwargs
        self.monitor: GradMonitor | None = None
        self._trainer_ref: Any = None  # weakref, set by attach()
        self._measured_at = -1  # global_step of the last monitor.step()
        self._merged_steps = 0  # monitor.num_steps at the last merge into logs
        self._clip_after = False  # attach(): the Trainer's clip follows the monitor's pass

    @property
    def attached(self) -> bool:
        """Whether :func:`attach` installed this callback (and its clipping / norm hand-off)."""
        return self._trainer_ref is not None and self._trainer_ref() is not None

    # -- setup ---------------------------------------------------------------------------

    def _resolve_max_norm(self, args: Any) -> Any:
        trainer_norm = float(args.max_grad_norm or 0.0)
        trainer_clips = trainer_norm > 0
        self._clip_after = False
        if is_clipper(self.max_norm):
            # An adaptive rule: the monitor clips by it; attach() applies the Trainer's
            # max_grad_norm after it, in turn (min() means nothing between the two).
            self._clip_after = self.attached and trainer_clips
            if trainer_clips:
                warnings.warn(
                    f"GradMonitorCallback(max_norm={type(self.max_norm).__name__}) and "
                    f"TrainingArguments(max_grad_norm={trainer_norm}) both clip"
                    + (": the clipper first, then max_grad_norm" if self.attached else ""),
                    stacklevel=3,
                )
            return self.max_norm
        own = None if self.max_norm in (None, _FROM_TRAINER) else float(self.max_norm)
        if self.attached:
            both = own is not None and trainer_clips and own != trainer_norm
            if not self._l2:
                # The Trainer's clipping is by the 2-norm: the monitor cannot do it in its
                # pass with another norm_type; attach() clips separately after measuring.
                self._clip_after = trainer_clips and own is not None
                if both:
                    warnings.warn(
                        f"GradMonitorCallback(max_norm={own}) and TrainingArguments("
                        f"max_grad_norm={trainer_norm}) both clip",
                        stacklevel=3,
                    )
                return own
            # The monitor does the Trainer's clipping in its own pass (see attach()).
            if both:
                warnings.warn(
                    f"GradMonitorCallback(max_norm={own}) and TrainingArguments("
                    f"max_grad_norm={trainer_norm}) both clip: clipping once at the smaller",
                    stacklevel=3,
                )
            norms = [n for n in (own, trainer_norm if trainer_clips else None) if n is not None]
            return min(norms) if norms else None
        if trainer_clips:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={trainer_norm}): the Trainer clips before "
                "on_pre_optimizer_step, so GradMonitorCallback records clipped norms (flat at "
                "max_norm, spikes hidden). Use fastgradstats.integrations.huggingface.attach("
                "trainer), or set max_grad_norm=0 and GradMonitorCallback(max_norm=...)",
                stacklevel=3,
            )
        return own

    @property
    def _l2(self) -> bool:
        """Whether the monitor's norms are 2-norms, as the Trainer's clipping and grad_norm."""
        norm_type = self.monitor_kwargs.get("norm_type", 2.0)
        try:
            return float(norm_type) == 2.0
        except (TypeError, ValueError):
            return False

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw
    ) -> None:
        if model is None:
            raise RuntimeError("GradMonitorCallback: the Trainer passed no model to on_train_begin")
        device = getattr(args, "device", torch.device("cpu"))
        on_cuda = getattr(device, "type", str(device)) == "cuda"
        # On the CPU accelerate runs fp16 without a loss scale: nothing to unscale there.
        if getattr(args, "fp16", False) and on_cuda and _grad_scaler(optimizer) is None:
            raise RuntimeError(
                "GradMonitorCallback: fp16 training without a torch GradScaler on the "
                "optimizer (DeepSpeed, apex, or a custom optimizer): the gradients at the "
                "hook may still be loss-scaled and cannot be unscaled here, so the norms "
                "and clipping would be wrong. Use bf16, or the default fp16 AMP of "
                "accelerate."
            )
        kwargs = dict(self.monitor_kwargs)
        # The monitor flushes at each log; its ring must hold the steps in between.
        interval = getattr(state, "logging_steps", None)
        if isinstance(interval, (int, float)) and interval >= 1:
            kwargs.setdefault("history", max(1000, int(interval) + 1))
        max_norm = self._resolve_max_norm(args)
        if self._clip_after:
            # The Trainer clips again after the monitor: a coefficient handed to a fused
            # optimizer would meet gradients clipped in place since (dropped, or the two
            # multiplied); scaled in place, the clips apply in turn.
            kwargs["hand_off"] = False
        self.monitor = GradMonitor(
            model, max_norm=max_norm, optimizer=inner_optimizer(optimizer), **kwargs
        )
        self._measured_at = -1
        self._merged_steps = 0
        # The Trainer logs grad_norm, the norm before its clipping; it is the monitor's
        # total when both are 2-norms of every step, measured before any clipping.
        trainer_clips = float(args.max_grad_norm or 0.0) > 0
        self._same_total = (
            self._l2 and self.monitor.every == 1 and (self.attached or not trainer_clips)
        )
        if not self.attached and _has_reporters(args):
            warnings.warn(
                "GradMonitorCallback was added with Trainer(callbacks=[...]), after the "
                f"report_to callbacks ({args.report_to}): its values reach trainer.state."
                "log_history but not those loggers. Use fastgradstats.integrations."
                "huggingface.attach(trainer) instead",
                stacklevel=2,
            )

    # -- per step ------------------------------------------------------------------------

    def measure(self, state: Any, optimizer: Any) -> torch.Tensor | None:
        """Unscale fp16 grads if needed, then ``monitor.step()``; returns its total norm."""
        assert self.monitor is not None
        unscale_grads(optimizer)
        self._measured_at = state.global_step
        return self.monitor.step(inner_optimizer(optimizer))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.monitor is not None and self._measured_at != state.global_step:
            self.measure(state, kw.get("optimizer"))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        # Training rows only (they carry "loss"), and only when a step was recorded since.
        if self.monitor is None or not isinstance(logs, dict) or "loss" not in logs:
            return
        if self.monitor.num_steps == self._merged_steps:
            return
        self._merged_steps = self.monitor.num_steps
        values = self.monitor.to_dict()  # one sync, at the Trainer's logging steps only
        if self._same_total and "grad_norm" in logs:
            values.pop(self.monitor.keys.total, None)  # the same number as grad_norm
        console = total_keys(self.monitor.keys) if self.console == "totals" else set(values)
        self._hidden_on_console = {key for key in values if key not in console}
        logs.update(values)
        # Trainer.log appended a copy of logs to log_history before calling on_log.
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)


def _has_reporters(args: Any) -> bool:
    report_to = getattr(args, "report_to", None)
    if report_to is None:
        return False
    if isinstance(report_to, str):
        report_to = [report_to]
    return any(name not in ("none", None) for name in report_to)


def attach(trainer: Any, callback: GradMonitorCallback | None = None, **kw: Any) -> Any:
    """Install a :class:`GradMonitorCallback` on ``trainer`` ahead of its reporters.

    ``kw`` builds the callback (``GradMonitorCallback(**kw)``) unless ``callback`` is given.
    Besides putting the callback first (so the ``report_to`` loggers receive its values),
    it routes the Trainer's gradient-norm steps through the monitor: with
    ``max_grad_norm > 0`` the monitor clips in its pass (norms recorded before clipping),
    with ``max_grad_norm = 0`` the Trainer's ``grad_norm`` log reuses the monitor's total
    norm instead of reading every gradient again. Returns the callback.
    """
    if callback is None:
        callback = GradMonitorCallback(**kw)
    elif kw:
        raise TypeError("attach(): pass either callback= or the callback's keyword arguments")
    if not isinstance(callback, GradMonitorCallback):
        raise TypeError(f"callback must be a GradMonitorCallback, got {type(callback).__name__}")
    handler = trainer.callback_handler
    handler.callbacks = [c for c in handler.callbacks if c is not callback]
    handler.callbacks.insert(0, callback)
    callback._trainer_ref = weakref.ref(trainer)
    _route_norms(trainer, callback)
    for printer in handler.callbacks:
        if _prints_logs(printer):
            _filter_console(printer, callback)
    return callback


def _prints_logs(callback: Any) -> bool:
    """Whether ``callback`` writes the log rows to the console (progress bar, printer)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    name = type(callback).__name__
    return isinstance(callback, (PrinterCallback, ProgressCallback)) or name in (
        "NotebookProgressCallback",
    )


def _filter_console(printer: Any, callback: GradMonitorCallback) -> None:
    """Make ``printer`` skip the monitor keys its console should not show (per-layer keys
    with ``console="totals"``); the loggers and the log history keep them."""
    if getattr(printer, "_fastgradstats_callback", None) is not None:
        printer._fastgradstats_callback = callback  # already wrapped: point at this one
        return
    printer._fastgradstats_callback = callback
    original = printer.on_log

    def on_log(args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> Any:
        hidden = printer._fastgradstats_callback._hidden_on_console
        if not isinstance(logs, dict) or not hidden:
            return original(args, state, control, logs=logs, **kw)
        # Out of the dict only while the printer reads it: callbacks after it see all.
        removed = {key: logs.pop(key) for key in list(logs) if key in hidden}
        try:
            return original(args, state, control, logs=logs, **kw)
        finally:
            logs.update(removed)

    printer.on_log = on_log


def _route_norms(trainer: Any, callback: GradMonitorCallback) -> None:
    # transformers 5.x: the step calls _clip_grad_norm(model) when max_grad_norm > 0 (returns
    # the norm before clipping), then _get_grad_norm(model, grad_norm) which computes the norm
    # with accelerator.clip_grad_norm_(..., inf) when grad_norm is None. Older versions clip
    # inline: the callback measures in on_pre_optimizer_step, after their clipping.
    if not (hasattr(trainer, "_clip_grad_norm") and hasattr(trainer, "_get_grad_norm")):
        return
    if getattr(trainer, "is_deepspeed_enabled", False):
        return  # DeepSpeed clips and holds the gradients itself
    if getattr(trainer, "_fastgradstats_callback", None) is not None:
        trainer._fastgradstats_callback = callback  # already routed: point at this one
        return
    trainer._fastgradstats_callback = callback
    original_clip = trainer._clip_grad_norm
    original_get = trainer._get_grad_norm

    def usable(model: Any) -> Any:
        callback = trainer._fastgradstats_callback
        mixed = getattr(trainer, "_has_mixed_mesh_grads", None)
        if callback.monitor is None or (callable(mixed) and mixed(model)):
            return None
        return callback

    def clip_grad_norm(model: Any) -> Any:
        callback = usable(model)
        if callback is not None:
            total = callback.measure(trainer.state, trainer.optimizer)
            if total is not None and callback._l2 and callback.monitor.clipper is not None:
                # The Trainer's clip after the clipper's, in turn; its log is the norm
                # before any clipping, as on the plain path below.
                clip_grad_norm_(callback.monitor.params, trainer.args.max_grad_norm)
                return total
            if total is not None and callback._l2:
                # monitor.max_norm includes max_grad_norm (see _resolve_max_norm): one pass
                return total
            # Another norm_type (or an unrecorded step): the Trainer's 2-norm clipping, on
            # gradients the measurement already unscaled.
            return clip_grad_norm_(callback.monitor.params, trainer.args.max_grad_norm)
        return original_clip(model)

    def get_grad_norm(model: Any, grad_norm: Any = None) -> Any:
        callback = usable(model) if grad_norm is None else None
        if callback is not None:
            grad_norm = callback.measure(trainer.state, trainer.optimizer)
            if grad_norm is None or not callback._l2:
                # An unrecorded step (every > 1) or another norm_type: the Trainer logs the
                # 2-norm, so compute it (the gradients are already unscaled).
                grads = [p.grad for p in callback.monitor.params if p.grad is not None]
                grad_norm = get_total_norm(grads)
        return original_get(model, grad_norm=grad_norm)

    trainer._clip_grad_norm = clip_grad_norm
    trainer._get_grad_norm = get_grad_norm
