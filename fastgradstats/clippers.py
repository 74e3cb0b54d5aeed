"""Adaptive gradient clipping with its state on the device: ZClip and AutoClip.

Both published rules decide the clip threshold from the history of total gradient norms.
Their reference implementations read every norm back to the host (``.item()``); here the
history, the statistics and the decision stay device tensors, so a step never waits for
the device. A non-finite norm (NaN/Inf gradients) leaves the state unchanged and the
gradients unscaled.

The protocol (what ``GradMonitor(max_norm=clipper)`` relies on):

* ``clipper(parameters, optimizer=None, *, backend=None) -> Tensor`` computes the total
  2-norm, clips in place (or hands the coefficient to a fused ``optimizer``, see
  :mod:`fastgradstats.handoff`) and returns the pre-clip total norm, 0-d, like
  :func:`fastgradstats.clip_grad_norm_`;
* ``clipper.compute_coef(total_norm) -> (coef, skip)`` from a pre-clip total norm (0-d
  tensor): ``coef`` 0-d float32 in [0, 1] (1: no clip) and ``skip`` 0-d bool; it advances
  the state and never syncs.

A call that raises (a gradient that cannot be written in place, an optimizer that still
holds an unused coefficient, ...) leaves the state and every gradient as they were: the
coefficient is computed without touching the state, and the new state is committed only
once the gradients are clipped (or the coefficient handed over), so the retry the error
asks for sees the norm once.

State: float64 tensors on the device of the first total norm seen (float32 on MPS, which
has no float64), ``state_dict()`` / ``load_state_dict()`` for checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import engine
from .constants import CLIP_EPS


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _number(value: Any, name: str, *, low: float, high: float = math.inf, open_low=True) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    ok = (number > low if open_low else number >= low) and number <= high
    if isinstance(value, bool) or not math.isfinite(number) or not ok:
        bound = f"{'>' if open_low else '>='} {low:g}" + (
            f" and <= {high:g}" if math.isfinite(high) else ""
        )
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _as_total(total_norm: Any) -> Tensor:
    if not isinstance(total_norm, Tensor):
        if isinstance(total_norm, bool) or not isinstance(total_norm, (int, float)):
            raise TypeError(f"total_norm must be a 0-d tensor, got {type(total_norm).__name__}")
        total_norm = torch.tensor(float(total_norm), dtype=torch.float64)
    if total_norm.dim() != 0 or not total_norm.is_floating_point():
        raise ValueError(
            f"total_norm must be a 0-d floating point tensor, got shape "
            f"{tuple(total_norm.shape)} and dtype {total_norm.dtype}"
        )
    return total_norm.detach()


def _state_scalar(state: dict[str, Any], key: str, device: Any, dtype: torch.dtype) -> Tensor:
    """``state[key]`` as a 0-d tensor on ``device``; ``ValueError`` naming it otherwise."""
    try:
        value = torch.as_tensor(state[key])
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"state[{key!r}] must be a number or a 1-element tensor") from None
    if value.numel() != 1:
        raise ValueError(f"state[{key!r}] must hold one number, got shape {tuple(value.shape)}")
    return value.to(device, dtype).reshape(()).clone()


def _torch_coef(max_norm: Tensor | float, norm: Tensor) -> Tensor:
    """``min(max_norm / (norm + 1e-6), 1)``: torch.nn.utils.clip_grad_norm_'s coefficient."""
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


class _Clipper:
    """Shared ``__call__``: norm, coefficient, then hand-off or in-place scaling."""

    def _propose(self, total: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:  # pragma: no cover
        """``(coef64, skip, new_state)`` without changing ``self``: ``new_state`` maps
        attribute names to their values after this norm (see :meth:`_commit`)."""
        raise NotImplementedError

    def _commit(self, new_state: dict[str, Any]) -> None:
        self.__dict__.update(new_state)

    def _coef64(self, total: Tensor) -> tuple[Tensor, Tensor]:
        coef, skip, new_state = self._propose(total)
        self._commit(new_state)
        return coef, skip

    def propose_coef(self, total_norm: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Like :meth:`compute_coef` but the state does not move until the returned
        ``commit()`` is called: ``(coef, skip, commit)``. A caller whose clip may still be
        refused (``GradMonitor``) commits only once the coefficient was applied."""
        coef, skip, new_state = self._propose(_as_total(total_norm))
        return coef.to(torch.float32), skip, lambda: self._commit(new_state)

    def compute_coef(self, total_norm: Tensor) -> tuple[Tensor, Tensor]:
        """``(coef, skip)`` for a pre-clip total norm; advances the state, never syncs.

        ``coef``: 0-d float32 on the norm's device, in [0, 1] (1 = no clipping).
        ``skip``: 0-d bool, True where ``skip_update_on_spike`` kept a spike out of the
        statistics (always False for AutoClip).
        """
        coef, skip = self._coef64(_as_total(total_norm))
        return coef.to(torch.float32), skip

    @engine.no_grad
    def __call__(
        self, parameters: Any, optimizer: Any = None, *, backend: str | None = None
    ) -> Tensor:
        """Clip the gradients of ``parameters`` in place (or hand the coefficient to a fused
        ``optimizer``); returns the pre-clip total 2-norm like ``clip_grad_norm_``.

        ``parameters``: a Tensor, an iterable of Tensors or ``named_parameters()`` pairs
        (``None`` grads skipped; DTensor grads: the norm of the full tensors). With no
        gradient at all the state is left alone and ``tensor(0.)`` is returned.
        """
        request = engine.Request(2.0, warn_empty_generator=True, backend=backend)
        measured = engine.run(parameters, request)
        if measured.empty:
            return measured.total
        # the state advances only once the coefficient was applied (a refused write, e.g.
        # an expanded gradient or a second clip before step(), raises before it): a
        # refused call changes nothing
        coef64, _skip, new_state = self._propose(measured.total_acc)
        measured.apply_(coef64.to(measured.total_acc.dtype), optimizer)
        self._commit(new_state)
        return measured.returned_total


class ZClip(_Clipper):
    """ZClip (Kumar et al., 2025): clip the total norm when it is a z-score outlier of its
    exponential moving statistics.

    The rule, as in the reference implementation (bluorion-com/ZClip, ``zclip/zclip.py``):

    * **warm-up**: the first ``warmup_steps`` finite norms are collected (clipped only to
      ``max_norm`` when set, as ``torch.nn.utils.clip_grad_norm_``); then ``mean`` and
      ``var`` start as their mean and population variance (``warmup_steps=0`` acts as 1);
    * then, with ``std = sqrt(var)`` and ``z = (g - mean) / (std + 1e-6)``:

      - ``mode="zscore"``: a spike is ``z > z_thresh``; its threshold is
        ``clip_factor * (mean + z_thresh * std / (z / z_thresh))`` for
        ``clip_option="adaptive_scaling"``, ``mean`` for ``"mean"``;
      - ``mode="percentile"``: a spike is ``g > mean + z_thresh * std``, its threshold
        that value (``clip_option`` and ``clip_factor`` unused, as in the reference);

      the threshold (``g`` when no spike) is capped at ``max_norm``; the gradients are
      scaled by ``threshold / (g + 1e-6)`` when ``g`` exceeds it;
    * **EMA**: ``mean = alpha mean + (1 - alpha) x``, then ``var = alpha var + (1 - alpha)
      (x - mean)^2`` with the updated mean, ``x`` the spike's threshold before the
      ``max_norm`` cap (else ``g``). ``skip_update_on_spike=True`` leaves the statistics
      alone on a spike (the clipped step still happens) and reports it as ``skip``.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        max_norm: float | None = None,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = _number(alpha, "alpha", low=0.0, high=1.0)
        if self.alpha == 1.0:
            raise ValueError("alpha must be < 1 (1 would freeze the statistics)")
        self.z_thresh = _number(z_thresh, "z_thresh", low=0.0)
        self.warmup_steps = _count(warmup_steps, "warmup_steps", 0)
        if not isinstance(mode, str) or mode.lower() not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {mode!r}")
        self.mode = mode.lower()
        options = ("adaptive_scaling", "mean")
        if not isinstance(clip_option, str) or clip_option.lower() not in options:
            raise ValueError(f"clip_option must be one of {options}, got {clip_option!r}")
        self.clip_option = clip_option.lower()
        self.clip_factor = _number(clip_factor, "clip_factor", low=0.0)
        self.max_norm = None if max_norm is None else _number(max_norm, "max_norm", low=0.0)
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        self._fresh = True  # nothing recorded or loaded: allocate on the device, no copy
        self._alloc(torch.device("cpu"))

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, "
            f"warmup_steps={self.warmup_steps}, mode={self.mode!r}, "
            f"clip_option={self.clip_option!r}, clip_factor={self.clip_factor}, "
            f"max_norm={self.max_norm}, skip_update_on_spike={self.skip_update_on_spike})"
        )

    @property
    def _window(self) -> int:
        return max(self.warmup_steps, 1)

    def _alloc(self, device: torch.device) -> None:
        dtype = _state_dtype(device)
        self._buffer = torch.zeros(self._window, dtype=dtype, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._mean = torch.zeros((), dtype=dtype, device=device)
        self._var = torch.zeros((), dtype=dtype, device=device)

    def _to(self, device: torch.device) -> None:
        if self._mean.device != device and self._fresh:
            self._alloc(device)  # zeros made there: no host-to-device copy (which would sync)
        elif self._mean.device != device:
            dtype = _state_dtype(device)
            self._buffer = self._buffer.to(device, dtype)
            self._count = self._count.to(device)
            self._mean = self._mean.to(device, dtype)
            self._var = self._var.to(device, dtype)

    def _propose(self, total: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        self._to(total.device)  # the same values on another device: not an advance
        g = total.to(self._mean.dtype)
        finite = torch.isfinite(g)
        g = torch.where(finite, g, torch.zeros_like(g))  # keeps NaN out of unused branches
        window = self._window

        # Warm-up: store the norm, and on the last one start the statistics from the buffer.
        warm = self._count < window
        take = finite & warm
        slot = self._count.clamp(max=window - 1).reshape(1)
        kept = self._buffer.index_select(0, slot)
        # out of place: the state changes only at _commit
        buffer = self._buffer.index_put((slot,), torch.where(take, g.reshape(1), kept))
        count = self._count + take.to(torch.int64)
        filled = take & (count == window)
        start_mean = buffer.mean()
        start_var = (buffer - start_mean).square().mean()

        # After warm-up: the spike test and its threshold on the current statistics.
        mean, var = self._mean, self._var
        std = var.sqrt()
        if self.mode == "zscore":
            z = (g - mean) / (std + CLIP_EPS)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                threshold = (mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            else:
                threshold = mean
        else:
            threshold = mean + self.z_thresh * std
            spike = g > threshold
        spike = spike & finite & ~warm
        limit = torch.where(spike, threshold, g)
        if self.max_norm is not None:
            limit = limit.clamp(max=self.max_norm)
        coef = torch.where(g > limit, limit / (g + CLIP_EPS), torch.ones_like(g))
        if self.max_norm is not None:
            coef = torch.where(warm, _torch_coef(self.max_norm, g), coef)
        else:
            coef = torch.where(warm, torch.ones_like(g), coef)
        coef = torch.where(finite, coef, torch.ones_like(g))

        skip = spike & self.skip_update_on_spike
        update = finite & ~warm & ~skip
        x = torch.where(spike, threshold, g)
        new_mean = self.alpha * mean + (1.0 - self.alpha) * x
        new_var = self.alpha * var + (1.0 - self.alpha) * (x - new_mean).square()
        return (
            coef,
            skip,
            {
                "_fresh": False,
                "_buffer": buffer,
                "_count": count,
                "_mean": torch.where(update, new_mean, torch.where(filled, start_mean, mean)),
                "_var": torch.where(update, new_var, torch.where(filled, start_var, var)),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        """The statistics as device tensors (no sync) plus the hyper-parameters."""
        return {
            "mean": self._mean.clone(),
            "var": self._var.clone(),
            "count": self._count.clone(),
            "buffer": self._buffer.clone(),
            "config": {
                "alpha": self.alpha,
                "z_thresh": self.z_thresh,
                "warmup_steps": self.warmup_steps,
                "mode": self.mode,
                "clip_option": self.clip_option,
                "clip_factor": self.clip_factor,
                "max_norm": self.max_norm,
                "skip_update_on_spike": self.skip_update_on_spike,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (onto the device the state lives on now)."""
        missing = {"mean", "var", "count", "buffer"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        buffer = torch.as_tensor(state["buffer"])
        if buffer.shape != (self._window,):
            raise ValueError(
                f"state['buffer'] has shape {tuple(buffer.shape)}; this ZClip has "
                f"warmup_steps={self.warmup_steps} (a buffer of {self._window})"
            )
        device, dtype = self._mean.device, self._mean.dtype
        # every field converted and checked before any is assigned: a bad state raises
        # and leaves this clipper as it was
        self._commit(
            {
                "_fresh": False,
                "_buffer": buffer.to(device, dtype).clone(),
                "_count": _state_scalar(state, "count", device, torch.int64),
                "_mean": _state_scalar(state, "mean", device, dtype),
                "_var": _state_scalar(state, "var", device, dtype),
            }
        )


class AutoClip(_Clipper):
    """AutoClip (Seetharaman et al., 2020): clip to the ``percentile``-th percentile of
    every finite total norm seen so far, the current one included.

    The percentile is interpolated linearly between order statistics, as
    ``numpy.percentile(history, percentile)`` (method ``"linear"``), and applied as
    ``torch.nn.utils.clip_grad_norm_(params, that_value)`` would. ``history=N`` keeps only
    the last N finite norms.

    The norms live in a device buffer, grown by doubling when the (host-known) number of
    calls outgrows it; each step sorts the part of it in use (O(n log n) on the device):
    for very long runs bound it with ``history``.
    """

    _INITIAL = 64

    def __init__(self, percentile: float = 10.0, history: int | None = None) -> None:
        self.percentile = _number(percentile, "percentile", low=0.0, high=100.0, open_low=False)
        self.history = None if history is None else _count(history, "history", 1)
        self._steps = 0  # calls so far (host): bounds how much of the buffer is in use
        cap = self._INITIAL if self.history is None else min(self._INITIAL, self.history)
        self._fresh = True  # nothing recorded or loaded: allocate on the device, no copy
        self._alloc(torch.device("cpu"), cap)

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history={self.history})"

    def _alloc(self, device: torch.device, capacity: int) -> None:
        dtype = _state_dtype(device)
        self._norms = torch.full((capacity,), math.nan, dtype=dtype, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)

    def _to(self, device: torch.device) -> None:
        if self._norms.device != device and self._fresh:
            self._alloc(device, self._norms.numel())
        elif self._norms.device != device:
            self._norms = self._norms.to(device, _state_dtype(device))
            self._count = self._count.to(device)

    def _in_use(self, steps: int) -> int:
        return steps if self.history is None else min(steps, self.history)

    def _grown(self, needed: int) -> Tensor:
        """The norms buffer, in a larger copy when ``needed`` slots do not fit."""
        capacity = self._norms.numel()
        if needed <= capacity:
            return self._norms
        while capacity < needed:
            capacity *= 2
        if self.history is not None:
            capacity = min(capacity, self.history)
        grown = self._norms.new_full((capacity,), math.nan)
        grown[: self._norms.numel()] = self._norms
        return grown

    def _propose(self, total: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        self._to(total.device)  # the same values on another device: not an advance
        steps = self._steps + 1
        in_use = self._in_use(steps)
        norms = self._grown(in_use)
        g = total.to(norms.dtype)
        finite = torch.isfinite(g)
        g = torch.where(finite, g, torch.zeros_like(g))
        slot = self._count if self.history is None else self._count % self.history
        slot = slot.reshape(1)
        kept = norms.index_select(0, slot)
        # out of place: the state changes only at _commit
        norms = norms.index_put((slot,), torch.where(finite, g.reshape(1), kept))
        count = self._count + finite.to(torch.int64)
        n = count if self.history is None else count.clamp(max=self.history)

        # numpy.percentile 'linear': position q (n - 1) between order statistics; the
        # unused and skipped slots hold NaN, which sorts after every number.
        ordered = torch.sort(norms[:in_use]).values
        last = (n - 1).clamp(min=0)
        position = last.to(ordered.dtype) * (self.percentile / 100.0)
        lo = position.floor().to(torch.int64).clamp(max=last)
        hi = (lo + 1).clamp(max=last)
        t = position - lo.to(ordered.dtype)
        a = ordered.index_select(0, lo.reshape(1)).reshape(())
        b = ordered.index_select(0, hi.reshape(1)).reshape(())
        diff = b - a
        clip_value = torch.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)
        coef = _torch_coef(clip_value, g)
        coef = torch.where(finite & (n > 0), coef, torch.ones_like(g))
        skip = torch.zeros((), dtype=torch.bool, device=g.device)
        return coef, skip, {"_fresh": False, "_steps": steps, "_norms": norms, "_count": count}

    def state_dict(self) -> dict[str, Any]:
        """The finite norms kept (device tensor, oldest first), the count and the steps."""
        in_use = self._in_use(self._steps)
        norms = self._norms[:in_use]
        if self.history is not None and in_use == self.history:
            # a full ring: the oldest entry sits at count % history (slots never written,
            # after skipped steps, hold NaN and come first)
            order = (torch.arange(in_use, device=norms.device) + self._count) % self.history
            norms = norms.index_select(0, order)
        return {
            "norms": norms.clone(),
            "count": self._count.clone(),
            "steps": self._steps,
            "config": {"percentile": self.percentile, "history": self.history},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (onto the device the state lives on now)."""
        missing = {"norms", "count", "steps"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        norms = torch.as_tensor(state["norms"]).reshape(-1)
        steps = _count(state["steps"], "state['steps']", 0)
        in_use = self._in_use(steps)
        if norms.numel() != in_use:
            raise ValueError(
                f"state['norms'] holds {norms.numel()} entries; {in_use} expected for "
                f"steps={steps} and history={self.history}"
            )
        device, dtype = self._norms.device, self._norms.dtype
        count = _state_scalar(state, "count", device, torch.int64)
        capacity = max(in_use, 1)
        buffer = torch.full((capacity,), math.nan, dtype=dtype, device=device)
        buffer[:in_use] = norms.to(device, dtype)
        if self.history is not None and in_use == self.history:
            # back into ring order: entry i (oldest first) goes to slot (count + i) % history
            slots = (torch.arange(in_use, device=device) + count) % self.history
            buffer = buffer.index_put((slots,), norms.to(device, dtype))
        self._fresh = False
        self._norms = buffer
        self._count = count
        self._steps = steps


__all__ = ["AutoClip", "ZClip"]
