"""Handing the clip coefficient to a fused optimizer instead of scaling the gradients.

torch's fused optimizers (``Adam``/``AdamW``/``SGD(fused=True)``, CPU and CUDA) read two
optional attributes in ``step()``, the ones ``torch.amp.GradScaler`` sets:

* ``optimizer.grad_scale``: every gradient is divided by it as the kernel reads it, and
  written back divided;
* ``optimizer.found_inf``: where it is 1 the update (and the step counter) is skipped.

So a clip can compute the norm (one read of the gradients) and hand ``1 / coef`` to the
optimizer, which reads every gradient anyway and, with ``grad_scale`` set, writes it back:
a clipped step saves the clip's own read. On the CPU nothing is handed over when the
coefficient is >= 1 (reading it is free there); on a GPU that would need a sync, so a step
that needs no clipping pays the write-back that the Triton scale kernel would skip.

After ``step()`` the parameters, the optimizer state and the gradients are what
``torch.nn.utils.clip_grad_norm_`` + ``step()`` give, up to the rounding of ``g / (1/c)``
against ``g * c`` (one ulp of the gradient dtype).

When the hand-off happens (:func:`can_hand_off`): the optimizer says
``_step_supports_amp_scaling`` and no parameter group has ``fused`` off; the parameters
with a gradient are exactly the optimizer's parameters with a gradient (``grad_scale``
applies to all of them); no gradient is float64 (``grad_scale`` is float32); no DTensor.
Otherwise the caller scales the gradients as usual.

Rules, all on purpose:

* **Composition.** A ``grad_scale`` / ``found_inf`` already on the optimizer (a GradScaler,
  or the user's) is composed with, never overwritten: scales multiply, ``found_inf`` takes
  the maximum. GradScaler itself multiplies its scale into a ``grad_scale`` it finds.
* **Clean-up.** Two permanent step hooks are registered once per optimizer (a hook cannot
  remove itself: torch iterates the hook dict while calling them). After ``step()`` the
  post-hook puts back what was there before the hand-off (deletes the attributes when
  nothing was); inside ``GradScaler.step`` it leaves them, since the scaler deletes both
  right after the step and would fail on a missing attribute.
* **Clipped twice before one step** raises ``RuntimeError``: the gradients still hold their
  unclipped values, so a second norm would not be torch's. A hand-off whose gradients were
  replaced before any ``step()`` (``zero_grad()`` + a new backward) is stale: it is dropped
  (with a warning at ``step()``, silently at the next hand-off).
* Until ``step()`` the ``.grad`` tensors hold the *unclipped* gradients.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import distributed

_MISSING = object()  # "the attribute was absent", distinct from an attribute set to None


@dataclass
class _Pending:
    """What one optimizer carries from a hand-off until its next ``step()``."""

    grad_scale: Any = _MISSING  # our tensor in optimizer.grad_scale, or _MISSING
    prior_grad_scale: Any = _MISSING
    found_inf: Any = _MISSING  # our tensor in optimizer.found_inf, or _MISSING
    prior_found_inf: Any = _MISSING
    params: list[Tensor] = field(default_factory=list)
    grad_refs: list[weakref.ref] = field(default_factory=list)  # weak: never keep grads alive

    def grads_current(self) -> bool:
        """True while every parameter still holds the gradient object seen at hand-off."""
        return all(p.grad is ref() for p, ref in zip(self.params, self.grad_refs))


_PENDING: weakref.WeakKeyDictionary[Any, _Pending] = weakref.WeakKeyDictionary()
_HOOKED: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def can_hand_off(optimizer: Any, params: list[Tensor]) -> bool:
    """True when ``optimizer.step()`` would apply a ``grad_scale`` to exactly ``params``.

    ``params``: the parameters whose gradients are clipped (each has a ``.grad``).
    Host-side checks only (attributes and object identities): never syncs.
    """
    if optimizer is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    groups = getattr(optimizer, "param_groups", None)
    if not groups or any(not g.get("fused", True) for g in groups):
        return False  # a non-fused group would refuse grad_scale (AssertionError in torch)
    clipped = {id(p) for p in params}
    if len(clipped) != len(params):
        return False
    covered = 0
    for group in groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if id(p) not in clipped:
                return False  # the optimizer would divide a gradient we did not clip
            covered += 1
    if covered != len(clipped):
        return False  # a clipped gradient the optimizer would not divide
    # A float32 grad_scale would round float64 gradients; DTensor steps take no plain tensor.
    return not any(p.grad.dtype == torch.float64 or distributed.is_dtensor(p) for p in params)


def _in_grad_scaler_step() -> bool:
    """True when called (via optimizer.step) from inside ``GradScaler.step``, which deletes
    ``grad_scale`` and ``found_inf`` itself once the step returns."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return False
        if frame.f_code.co_name == "step" and isinstance(
            frame.f_locals.get("self"), torch.amp.GradScaler
        ):
            return True
        frame = frame.f_back
    return False


def _restore(optimizer: Any, name: str, ours: Any, prior: Any) -> None:
    if ours is _MISSING or getattr(optimizer, name, _MISSING) is not ours:
        return  # not set by us, or replaced since (its new owner cleans it up)
    if prior is _MISSING:
        delattr(optimizer, name)
    else:
        setattr(optimizer, name, prior)


def _release(optimizer: Any) -> None:
    """Undo a pending hand-off on ``optimizer``: put back what was there before."""
    pending = _PENDING.pop(optimizer, None)
    if pending is None:
        return
    _restore(optimizer, "grad_scale", pending.grad_scale, pending.prior_grad_scale)
    _restore(optimizer, "found_inf", pending.found_inf, pending.prior_found_inf)


def _pre_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    pending = _PENDING.get(optimizer)
    if pending is None or pending.grads_current():
        return
    if pending.grad_scale is not _MISSING and optimizer.grad_scale is not pending.grad_scale:
        raise RuntimeError(
            "fastgradstats: the gradients were replaced after their clip coefficient was "
            "handed to the optimizer, and something has since composed its own grad_scale "
            "with it; cannot take the stale coefficient back. Call optimizer.step() after "
            "each clip_grad_norm_(..., optimizer=...)"
        )
    _release(optimizer)
    warnings.warn(
        "fastgradstats: a clip coefficient handed to this optimizer was never used and its "
        "gradients have been replaced since (zero_grad() without step()?); it was dropped",
        RuntimeWarning,
        stacklevel=3,
    )


def _post_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    if optimizer not in _PENDING:
        return
    if _in_grad_scaler_step():
        _PENDING.pop(optimizer, None)  # the scaler deletes both attributes after the step
        return
    _release(optimizer)


def _ensure_hooks(optimizer: Any) -> None:
    if optimizer not in _HOOKED:
        pre = optimizer.register_step_pre_hook(_pre_step)
        post = optimizer.register_step_post_hook(_post_step)
        _HOOKED[optimizer] = (pre, post)


def _pending_for(optimizer: Any, params: list[Tensor]) -> _Pending:
    """The optimizer's pending record, created (with the gradients to watch) when absent."""
    pending = _PENDING.get(optimizer)
    if pending is not None and not pending.grads_current():
        _release(optimizer)  # stale: its gradients are gone, torch would have lost the clip
        pending = None
    if pending is None:
        pending = _Pending(params=list(params), grad_refs=[weakref.ref(p.grad) for p in params])
        _PENDING[optimizer] = pending
        _ensure_hooks(optimizer)
    return pending


def _nothing_to_clip_on_host(coef: Tensor) -> bool:
    # On the CPU reading the coefficient is free: with nothing to clip, handing 1 over
    # would make torch's CPU kernel divide and write every gradient back for nothing.
    return coef.device.type == "cpu" and bool(coef >= 1.0)


def hand_off_(optimizer: Any, params: list[Tensor], coef: Tensor) -> bool:
    """Give ``1 / coef`` to ``optimizer`` as ``grad_scale`` when it can apply it.

    Args:
        optimizer: the optimizer that will step on ``params``' gradients, or ``None``.
        params: the parameters whose gradients are clipped (each has a ``.grad``).
        coef: 0-d clip coefficient on the gradients' device (float32; float64 refuses).

    Returns:
        ``True`` when the coefficient is taken care of (handed over, or, for CPU tensors,
        found to be >= 1): the caller must not scale. ``False``: the caller scales.

    Raises:
        RuntimeError: a coefficient was already handed over for these same gradients and
            no ``step()`` consumed it (clipped twice before one step).
    """
    if coef.dtype == torch.float64 or not can_hand_off(optimizer, params):
        return False
    pending = _PENDING.get(optimizer)
    if pending is not None and pending.grad_scale is not _MISSING and pending.grads_current():
        raise RuntimeError(
            "clip_grad_norm_(..., optimizer=...) was called twice before optimizer.step(): "
            "the first clip coefficient still waits in optimizer.grad_scale and the "
            "gradients hold their unclipped values. Call optimizer.step() between clips, "
            "or clip once"
        )
    if _nothing_to_clip_on_host(coef):
        return True
    pending = _pending_for(optimizer, params)
    scale = torch.reciprocal(coef.to(torch.float32))
    prior = getattr(optimizer, "grad_scale", _MISSING)
    if prior is not _MISSING and prior is not None:
        scale = prior.to(scale.device, torch.float32) * scale
    pending.prior_grad_scale = prior
    pending.grad_scale = scale
    optimizer.grad_scale = scale
    return True


def set_found_inf_(optimizer: Any, found_inf: Tensor) -> bool:
    """Make ``optimizer.step()`` skip its update where ``found_inf`` (0-d, device) is true.

    For fused optimizers (``_step_supports_amp_scaling``): composes with a ``found_inf``
    already there (maximum), and is cleaned up after ``step()`` like :func:`hand_off_`.
    Returns ``False`` (nothing done) for other optimizers. Never syncs.
    """
    if optimizer is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    pending = _pending_for(optimizer, params)
    flag = found_inf.to(torch.float32)
    prior = getattr(optimizer, "found_inf", _MISSING)
    if prior is not _MISSING and prior is not None:
        flag = torch.maximum(prior.to(flag.device, torch.float32), flag)
    if pending.found_inf is _MISSING:
        pending.prior_found_inf = prior
    pending.found_inf = flag
    optimizer.found_inf = flag
    return True


def pending(optimizer: Any) -> bool:
    """True while a coefficient or ``found_inf`` handed to ``optimizer`` awaits ``step()``."""
    return optimizer in _PENDING


def cancel_(optimizer: Any) -> None:
    """Take back whatever was handed to ``optimizer`` and not yet used by ``step()``."""
    _release(optimizer)


__all__ = ["can_hand_off", "cancel_", "hand_off_", "pending", "set_found_inf_"]
