"""PyTorch Lightning callback: per-layer gradient stats (and clipping) in one fused pass.

Usage::

    from fastgradstats.integrations.lightning import GradMonitorCallback

    trainer = Trainer(gradient_clip_val=1.0, callbacks=[GradMonitorCallback()])
    trainer.fit(model)
    print(trainer.callbacks[0].monitor.report())  # or keep a reference to the callback

What it does, and why:

* ``on_before_optimizer_step`` (after backward and AMP unscaling, before Lightning's own
  clipping) records the gradients with :class:`~fastgradstats.GradMonitor`; no host sync.
* Clipping: by default the callback takes Lightning's ``gradient_clip_val`` (with
  ``gradient_clip_algorithm="norm"``, Lightning's default) and clips in the same pass as
  the stats, switching Lightning's own norm clipping off for the run (restored after), so
  every gradient is read once. The recorded norms are the norms before clipping. Value
  clipping stays Lightning's. An explicit ``max_norm=`` (a number, or an adaptive clipper
  such as :class:`fastgradstats.ZClip`) while Lightning clips by norm too warns: both
  clip, the monitor first.
* Whenever Lightning (or the module's ``configure_gradient_clipping``) may still clip
  after the monitor, the monitor scales the gradients in place instead of handing its
  coefficient to a fused optimizer, so the two clips apply in turn.
* ``16-mixed`` with an optimizer that unscales inside ``step()`` (fused Adam/AdamW/SGD):
  Lightning skips ``GradScaler.unscale_`` for it, so the callback unscales before the
  monitor reads the gradients (the norms recorded and clipped are the true ones; the
  scaler then does not unscale again).
* Logging follows Lightning's schedule: the values go through ``LightningModule.log_dict``
  on the batches whose metrics Lightning writes (``(step + 1) % log_every_n_steps == 0``,
  the last step when training stops early, every step under ``fast_dev_run``), so every
  logger gets them with the same step as the loss, and the monitor syncs only then.
"""

from __future__ import annotations

import warnings
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package has the same API
    import pytorch_lightning as pl  # type: ignore[no-redef]

from ..monitor import GradMonitor
from ..monitor.logspec import check_log_options
from . import check_max_norm_arg, inner_optimizer, is_clipper

__all__ = ["GradMonitorCallback"]

_FROM_TRAINER = "trainer"


def _clips_by_norm(trainer: Any) -> bool:
    value = trainer.gradient_clip_val
    if value is None or not value > 0:  # Lightning treats 0 as "off"
        return False
    algorithm = trainer.gradient_clip_algorithm
    return algorithm is None or str(getattr(algorithm, "value", algorithm)).lower() == "norm"


def _is_two(norm_type: Any) -> bool:
    try:
        return float(norm_type) == 2.0
    except (TypeError, ValueError):
        return False


def _overrides_clipping(pl_module: Any) -> bool:
    own = type(pl_module).configure_gradient_clipping
    return own is not pl.LightningModule.configure_gradient_clipping


def _unscale_if_lightning_did_not(trainer: Any, optimizer: Any) -> None:
    """Unscale loss-scaled gradients that Lightning leaves scaled at this hook.

    Lightning's ``MixedPrecision`` skips ``scaler.unscale_`` for optimizers that unscale in
    ``step()`` (``_step_supports_amp_scaling``: the fused ones), so their gradients reach
    ``on_before_optimizer_step`` multiplied by the loss scale. ``unscale_`` here records
    the optimizer as unscaled: ``scaler.step`` then passes no scale to it (only
    ``found_inf``), and skips the step on overflow as before.
    """
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or optimizer is None or not callable(getattr(scaler, "unscale_", None)):
        return
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return  # Lightning unscaled it already
    if not getattr(scaler, "is_enabled", lambda: True)():
        return
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as exc:
        if "already been called" not in str(exc):  # unscaled by the user's own hook
            raise


def lightning_writes_this_step(trainer: Any) -> bool:
    """Whether Lightning writes the training metrics of the current batch to its loggers.

    Lightning's rule (2.x, ``_LoggerConnector.should_update_logs``): the batch that makes
    ``batches_that_stepped + 1`` a multiple of ``log_every_n_steps``, or any batch once
    ``trainer.should_stop`` is set; every batch under ``fast_dev_run``. Valid from
    ``on_before_optimizer_step`` to ``on_train_batch_end`` of the batch.
    """
    if trainer.fast_dev_run:
        return True
    connector = getattr(trainer, "_logger_connector", None)
    flag = getattr(connector, "should_update_logs", None)
    if isinstance(flag, bool):
        return flag
    # Fallback for a Lightning without that property: the same rule from public fields
    # (global_step already counts this batch's optimizer step at on_train_batch_end).
    every = trainer.log_every_n_steps
    if not every:
        return False
    return trainer.global_step % every == 0 or bool(trainer.should_stop)


class GradMonitorCallback(pl.Callback):
    """Runs a :class:`~fastgradstats.GradMonitor` inside ``Trainer.fit``.

    Args:
        max_norm: ``"trainer"`` (default): clip at Lightning's ``gradient_clip_val`` when it
            clips by norm, in the monitor's pass (Lightning's norm clipping is switched off
            for the run; with a ``norm_type`` other than 2 Lightning keeps its 2-norm
            clipping); ``None``: the monitor never clips; a number, or an adaptive clipper
            (:class:`fastgradstats.ZClip`, :class:`fastgradstats.AutoClip`): the monitor
            clips by it (warns if Lightning clips by norm too; Lightning then clips after).
        log: send :meth:`GradMonitor.to_dict` to the loggers on Lightning's schedule
            (``True``), or nothing (``False``). What it holds is the monitor's ``log=``
            (``"layers"`` by default; ``"blocks"``, ``"totals"``), ``group_by``,
            ``include``, ``exclude`` and ``top_k``, passed through ``monitor_kwargs``.
        prog_bar: also show the total norm on the progress bar (the console); the
            per-layer keys go to the loggers only.
        **monitor_kwargs: passed to :class:`~fastgradstats.GradMonitor` (``norm_type``,
            ``history``, ``every``, ``skip_nonfinite``, ``prefix``, ``key_style``, ``log``,
            ``group_by``, ``include``, ``exclude``, ``top_k``, ...).

    Raises:
        TypeError / ValueError: a ``max_norm`` of another kind (named in the message).

    After ``fit``, :attr:`monitor` holds the monitor (``report()``, ``history()``, ``plot()``).
    """

    def __init__(
        self,
        max_norm: float | str | None = _FROM_TRAINER,
        log: bool | str = True,
        *,
        prog_bar: bool = True,
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(log, str):  # log="totals" / "blocks" / "layers": the monitor's choice
            monitor_kwargs["log"] = log
            log = True
        check_max_norm_arg("GradMonitorCallback", max_norm, _FROM_TRAINER)
        if "optimizer" in monitor_kwargs or "model" in monitor_kwargs:
            raise TypeError("GradMonitorCallback takes the model and optimizer from the Trainer")
        self.max_norm = max_norm
        check_log_options(monitor_kwargs)  # a bad log= fails here, not at the first step
        self.log = bool(log)
        self.prog_bar = bool(prog_bar)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: GradMonitor | None = None
        self._saved_clip: tuple[Any, Any] | None = None
        self._stepped = False

    # -- setup ---------------------------------------------------------------------------

    def _resolve_max_norm(self, trainer: Any, pl_module: Any) -> Any:
        trainer_clips = _clips_by_norm(trainer)
        if self.max_norm == _FROM_TRAINER:
            if not trainer_clips:
                return None
            if not _is_two(self.monitor_kwargs.get("norm_type", 2.0)):
                # Lightning clips by the 2-norm: the monitor's pass cannot do that with
                # another norm_type, so Lightning keeps clipping (after the monitor records).
                return None
            if _overrides_clipping(pl_module):
                # The module's own configure_gradient_clipping decides: leave it alone.
                warnings.warn(
                    "GradMonitorCallback: the LightningModule overrides "
                    "configure_gradient_clipping, so Lightning's clipping is left in place; "
                    "the monitor records the norms before it and does not clip",
                    stacklevel=2,
                )
                return None
            max_norm = float(trainer.gradient_clip_val)
            # Clip once, in the monitor's pass: Lightning reads these at every step.
            self._saved_clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
            trainer.gradient_clip_val = None
            trainer.gradient_clip_algorithm = None
            return max_norm
        if self.max_norm is not None and trainer_clips:
            warnings.warn(
                f"GradMonitorCallback(max_norm={self.max_norm}) and "
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) both clip the gradient "
                "norm (the monitor first); leave max_norm at its default to clip once at the "
                "Trainer's value, or set gradient_clip_val=None",
                stacklevel=2,
            )
        if self.max_norm is None or is_clipper(self.max_norm):
            return self.max_norm
        return float(self.max_norm)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        max_norm = self._resolve_max_norm(trainer, pl_module)
        optimizers = [inner_optimizer(opt) for opt in trainer.optimizers]
        kwargs = dict(self.monitor_kwargs)
        # The monitor flushes at each write; its ring must hold the steps in between.
        kwargs.setdefault("history", max(1000, (trainer.log_every_n_steps or 0) + 1))
        if max_norm is not None and (trainer.gradient_clip_val or _overrides_clipping(pl_module)):
            # Lightning may clip after the monitor: a coefficient handed to a fused optimizer
            # would meet gradients clipped again in place (dropped, or the two multiplied);
            # scaled in place, the two clips apply in turn.
            kwargs["hand_off"] = False
        self.monitor = GradMonitor(
            pl_module,
            max_norm=max_norm,
            optimizer=optimizers[0] if len(optimizers) == 1 else None,
            **kwargs,
        )
        self._stepped = False

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._saved_clip is not None:
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._saved_clip
            self._saved_clip = None

    # -- per step ------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor is None:
            return
        inner = inner_optimizer(optimizer)
        _unscale_if_lightning_did_not(trainer, inner)
        self.monitor.step(inner)  # no host sync
        self._stepped = True

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Log here, not in on_before_optimizer_step: this is the last hook before Lightning
        # writes the batch's metrics, so should_stop set during the step counts too.
        stepped, self._stepped = self._stepped, False
        if not (self.log and stepped and self.monitor is not None and trainer.loggers):
            return
        if not lightning_writes_this_step(trainer):
            return  # Lightning would not write it: no sync
        values = self.monitor.to_dict()  # one sync, at Lightning's logging interval only
        total = self.monitor.keys.total
        if self.prog_bar and total in values:
            # the console shows the total only; each key is logged once (Lightning refuses
            # a key logged twice in a step)
            pl_module.log(total, values.pop(total), on_step=True, on_epoch=False,
                          prog_bar=True, logger=True)  # fmt: skip
        if values:
            pl_module.log_dict(
                values,
                on_step=True,
                on_epoch=False,
                prog_bar=False,
                logger=True,
            )
