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

* **One owner, attributes only during ``step()``.** The coefficient and ``found_inf`` are
  held here (per optimizer) until its ``step()``. A step pre-hook (or, for
  ``step(closure)``, the closure once it returns: Lightning clips inside it) puts them on
  the optimizer, composed with whatever is there at that moment (a ``grad_scale`` /
  ``found_inf`` set by ``torch.amp.GradScaler.step``, enabled or not, or by the user):
  scales multiply, ``found_inf`` takes the maximum. The post-hook puts back exactly what
  was there before (deletes the attributes when nothing was), so GradScaler still finds
  and deletes its own. No call stack is inspected, and between the clip and ``step()``
  (where an exception may be raised) nothing of ours is on the optimizer. A step that
  raised inside the optimizer leaves ours there until the next hand-off or ``step()``,
  which removes it first.
* **Consumed by one step.** The pre-hook takes the pending record: a later ``step()`` gets
  nothing from it.
* **Stale gradients.** The gradients are fingerprinted at the hand-off (object identity,
  ``_version`` counter, storage pointer). If they were replaced (``zero_grad()`` and a new
  backward, with ``set_to_none`` either way) or modified in place (another clip) before
  ``step()``, the coefficient no longer matches them and is never applied: dropped with a
  ``RuntimeWarning`` at ``step()``, silently at the next hand-off. ``found_inf`` is kept
  when the gradients were only modified in place (a clip keeps NaN/Inf where they are;
  dropping it could let a NaN update through) and dropped when they were replaced.
* **Clipped twice before one step** (same, unmodified gradients) raises ``RuntimeError``:
  the gradients still hold their unclipped values, so a second norm would not be torch's.
* **Under ``torch.compile``** (while tracing) nothing is handed over: the caller scales
  in place (hooks and attributes set while tracing are not replayed by the graph).
* Until ``step()`` the ``.grad`` tensors hold the *unclipped* gradients.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed

_MISSING = object()  # "the attribute was absent", distinct from an attribute set to None


def _fingerprint(grad: Tensor) -> tuple[int, int]:
    # _version counts in-place writes (zero_(), backward's accumulation, a clip's mul_);
    # the storage pointer catches a .data swap, which keeps the object and its counter.
    return grad._version, grad.data_ptr()


@dataclass
class _Pending:
    """What one optimizer carries from a hand-off until its next ``step()``."""

    params: list[Tensor]
    grad_refs: list[weakref.ref]  # weak: never keep gradients alive
    prints: list[tuple[int, int]]
    scale: Tensor | None = None  # 1 / coef, for optimizer.grad_scale
    found_inf: Tensor | None = None  # float32 0-d, for optimizer.found_inf

    @classmethod
    def of(cls, params: list[Tensor]) -> _Pending:
        grads = [p.grad for p in params]
        return cls(list(params), [weakref.ref(g) for g in grads], [_fingerprint(g) for g in grads])

    def replaced(self) -> bool:
        """True when a parameter holds another gradient object than at hand-off."""
        return any(p.grad is not ref() for p, ref in zip(self.params, self.grad_refs))

    def current(self) -> bool:
        """True while every gradient is the object seen at hand-off, unmodified since."""
        return not self.replaced() and all(
            _fingerprint(p.grad) == fp for p, fp in zip(self.params, self.prints)
        )


@dataclass
class _Installed:
    """The attributes the pre-hook put on the optimizer, and what was there before."""

    grad_scale: Any = _MISSING
    prior_grad_scale: Any = _MISSING
    found_inf: Any = _MISSING
    prior_found_inf: Any = _MISSING


_PENDING: weakref.WeakKeyDictionary[Any, _Pending] = weakref.WeakKeyDictionary()
_INSTALLED: weakref.WeakKeyDictionary[Any, _Installed] = weakref.WeakKeyDictionary()
_HOOKED: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def _compiling() -> bool:
    """True while torch.compile traces: hooks and attributes set then are not replayed."""
    return torch.compiler.is_compiling()


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


def _restore(optimizer: Any, name: str, ours: Any, prior: Any) -> None:
    if ours is _MISSING or getattr(optimizer, name, _MISSING) is not ours:
        return  # not set by us, or replaced since (its new owner cleans it up)
    if prior is _MISSING:
        delattr(optimizer, name)
    else:
        setattr(optimizer, name, prior)


def _uninstall(optimizer: Any) -> None:
    """Put back what the pre-hook found on ``optimizer`` (after the step, or after a step
    that raised before its post-hook ran)."""
    installed = _INSTALLED.pop(optimizer, None)
    if installed is not None:
        _restore(optimizer, "grad_scale", installed.grad_scale, installed.prior_grad_scale)
        _restore(optimizer, "found_inf", installed.found_inf, installed.prior_found_inf)


def _usable(optimizer: Any, pending: _Pending) -> tuple[Tensor | None, Tensor | None]:
    """What of ``pending`` still applies to the gradients ``step()`` is about to read."""
    if pending.current():
        return pending.scale, pending.found_inf
    replaced = pending.replaced()
    dropped = []
    if pending.scale is not None:
        dropped.append("clip coefficient")
    if replaced and pending.found_inf is not None:
        dropped.append("found_inf")
    if dropped:
        how = "replaced" if replaced else "modified in place"
        warnings.warn(
            f"fastgradstats: the {' and '.join(dropped)} handed to this optimizer "
            f"({type(optimizer).__name__}) no longer match its gradients, which were {how} "
            "since (zero_grad() and a new backward, or another clip, before step()): "
            "dropped, never applied. Clip right before step(), once",
            RuntimeWarning,
            stacklevel=4,
        )
    return None, (None if replaced else pending.found_inf)


def _install(optimizer: Any) -> None:
    """Put what is pending on ``optimizer``, composed with what is there now."""
    _uninstall(optimizer)  # leftovers of a step that raised
    pending = _PENDING.pop(optimizer, None)  # consumed by this step, whatever happens
    if pending is None:
        return
    scale, found = _usable(optimizer, pending)
    installed = _Installed()
    if scale is not None:
        prior = getattr(optimizer, "grad_scale", _MISSING)
        if prior is not _MISSING and prior is not None:  # GradScaler's (or the user's)
            scale = prior.to(scale.device, torch.float32) * scale
        installed.grad_scale, installed.prior_grad_scale = scale, prior
        optimizer.grad_scale = scale
    if found is not None:
        prior = getattr(optimizer, "found_inf", _MISSING)
        if prior is not _MISSING and prior is not None:
            found = torch.maximum(prior.to(found.device, torch.float32), found)
        installed.found_inf, installed.prior_found_inf = found, prior
        optimizer.found_inf = found
    if scale is not None or found is not None:
        _INSTALLED[optimizer] = installed


def _pre_step(optimizer: Any, args: Any, kwargs: Any) -> Any:
    # args holds the optimizer itself first, then step()'s own arguments.
    closure = kwargs.get("closure") if "closure" in kwargs else (args[1:2] or [None])[0]
    if closure is None:
        _install(optimizer)
        return None
    _uninstall(optimizer)

    # step(closure): the backward and the clip (Lightning's on_before_optimizer_step, say)
    # run inside step(), after this hook; what they hand over is installed when the closure
    # returns, before the optimizer reads the gradients.
    def closure_then_install() -> Any:
        result = closure()
        _install(optimizer)
        return result

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_install}
    return (args[0], closure_then_install, *args[2:]), kwargs


def _post_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _uninstall(optimizer)


def watch(optimizer: Any) -> None:
    """Register the step hooks the hand-off needs on ``optimizer`` (once; no-op for
    optimizers that take no ``grad_scale``).

    The first hand-off to an optimizer not watched yet scales in place instead (it may run
    inside ``step(closure)``, whose pre-hook has passed), and watches it for the next
    steps. :class:`~fastgradstats.GradMonitor` watches its ``optimizer=`` at construction.
    """
    # Permanent hooks, once per optimizer: a hook cannot remove itself (torch iterates the
    # hook dict while calling them); they cost a dict lookup per step when idle.
    if optimizer is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return
    if optimizer not in _HOOKED:
        pre = optimizer.register_step_pre_hook(_pre_step)
        post = optimizer.register_step_post_hook(_post_step)
        _HOOKED[optimizer] = (pre, post)


def _first_use(optimizer: Any) -> bool:
    """True (and the optimizer is watched from now on) when it had no hooks yet."""
    if optimizer in _HOOKED:
        return False
    watch(optimizer)
    return True


def _pending_for(optimizer: Any, params: list[Tensor]) -> _Pending:
    """The optimizer's pending record for the current gradients: a record made for other
    (replaced or modified) gradients is dropped, as their step never came."""
    _uninstall(optimizer)
    pending = _PENDING.get(optimizer)
    if pending is None or not pending.current():
        pending = _Pending.of(params)
        _PENDING[optimizer] = pending
    return pending


def _nothing_to_clip_on_host(coef: Tensor) -> bool:
    # On the CPU reading the coefficient is free: with nothing to clip, handing 1 over
    # would make torch's CPU kernel divide and write every gradient back for nothing.
    return coef.device.type == "cpu" and bool(coef >= 1.0)


def hand_off_(optimizer: Any, params: list[Tensor], coef: Tensor) -> bool:
    """Give ``1 / coef`` to ``optimizer`` as ``grad_scale`` for its next ``step()``.

    Args:
        optimizer: the optimizer that will step on ``params``' gradients, or ``None``.
        params: the parameters whose gradients are clipped (each has a ``.grad``).
        coef: 0-d clip coefficient on the gradients' device (float32; float64 refuses).

    Returns:
        ``True`` when the coefficient is taken care of (handed over, or, for CPU tensors,
        found to be >= 1): the caller must not scale. ``False``: the caller scales (no
        fused optimizer, under ``torch.compile``, or the optimizer's first hand-off when
        it was not :func:`watch`-ed before).

    Raises:
        RuntimeError: a coefficient was already handed over for these same gradients and
            no ``step()`` consumed it (clipped twice before one step).
    """
    if coef.dtype == torch.float64 or _compiling() or not can_hand_off(optimizer, params):
        return False
    if _first_use(optimizer):
        return False  # maybe inside step(closure), past the pre-hook: scale in place
    pending = _PENDING.get(optimizer)
    if pending is not None and pending.scale is not None and pending.current():
        raise RuntimeError(
            "clip_grad_norm_(..., optimizer=...) was called twice before optimizer.step(): "
            "the first clip coefficient still waits for the optimizer and the gradients "
            "hold their unclipped values. Call optimizer.step() between clips, or clip once"
        )
    if _nothing_to_clip_on_host(coef):
        if pending is not None and not pending.current():
            _PENDING.pop(optimizer, None)  # stale: its step never came
        return True
    pending = _pending_for(optimizer, params)
    pending.scale = torch.reciprocal(coef.to(torch.float32))
    return True


def set_found_inf_(optimizer: Any, found_inf: Tensor) -> bool:
    """Make ``optimizer.step()`` skip its update where ``found_inf`` (0-d, device) is true.

    For fused optimizers (``_step_supports_amp_scaling``): held until the next ``step()``
    like :func:`hand_off_`, composed then with a ``found_inf`` already on the optimizer
    (maximum), and removed after it. Two calls for the same gradients take the maximum.
    Returns ``False`` (nothing done) for other optimizers, under ``torch.compile``, and
    on the first call for an optimizer not :func:`watch`-ed before.
    Never syncs.
    """
    if optimizer is None or _compiling():
        return False
    if not getattr(optimizer, "_step_supports_amp_scaling", False) or _first_use(optimizer):
        return False  # (first use: maybe inside step(closure); the caller zeroes instead)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    pending = _pending_for(optimizer, params)
    flag = found_inf.to(torch.float32)
    if pending.found_inf is not None:
        flag = torch.maximum(pending.found_inf.to(flag.device), flag)
    pending.found_inf = flag
    return True


def pending(optimizer: Any) -> bool:
    """True while a coefficient or ``found_inf`` handed to ``optimizer`` awaits ``step()``."""
    return optimizer in _PENDING or optimizer in _INSTALLED


def pending_scale(optimizer: Any) -> Tensor | None:
    """The ``grad_scale`` (``1 / coef``) waiting for ``optimizer``'s next ``step()``, if any."""
    record = _PENDING.get(optimizer)
    return None if record is None else record.scale


def cancel_(optimizer: Any) -> None:
    """Take back whatever was handed to ``optimizer`` and not yet used by ``step()``."""
    _PENDING.pop(optimizer, None)
    _uninstall(optimizer)


__all__ = [
    "can_hand_off",
    "cancel_",
    "hand_off_",
    "pending",
    "pending_scale",
    "set_found_inf_",
    "watch",
]
