"""Drop-in replacements for the gradient clipping functions of ``torch.nn.utils``.

Same signatures, return values and return dtypes as torch 2.13, plus keyword-only extras
(``backend=``, ``return_stats=``). Differences, all on purpose:

* the total norm returned, and the clip coefficient, are rounded as torch rounds them
  (each per-tensor norm in its gradient dtype, the total and the coefficient in the
  promoted dtype), so clipped 16-bit gradients are bit-identical to torch's (unless a
  per-tensor norm sits within float32 summation-order error of a 16-bit rounding
  boundary: then one ulp of that norm can differ); the
  per-tensor norms and ``total_norm`` of ``return_stats=True`` keep float32 (closer to
  the exact norm than torch's 16-bit roundings);
* when clipping is not needed the gradients are not written at all (torch multiplies
  them by 1.0, which leaves the same bits), except under ``torch.compile`` on the torch
  backend, which multiplies them by 1.0 too (a graph cannot branch on the coefficient);
* under ``torch.compile`` with the ``inductor`` backend and its default config, the total
  of 16-bit gradients can differ from eager mode by the 16-bit rounding of per-tensor
  norms, which inductor fuses away; ``torch._inductor.config.emulate_precision_casts =
  True`` restores torch's roundings exactly (torch's own function materializes them);
* ``error_if_nonfinite=True`` names the parameters holding NaN/Inf;
* bad arguments (negative or NaN ``max_norm``, NaN ``norm_type``, sparse or integer
  gradients) raise before any gradient is touched;
* the inf-norm of an empty gradient is 0 (torch raises);
* DTensor gradients: the total norm is a DTensor on their mesh, ``Replicate`` like torch's,
  also for the inf-norm (torch's is then ``Partial(max)``, reduced on first use: same
  value); it costs one all-reduce per reduction group (see :mod:`fastgradstats.distributed`;
  torch: one per mesh dim) and no other collective.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, overload

import torch
from torch import Tensor

from . import core, distributed, handoff
from .stats import GradStats, check_histogram_input, compute, empty_stats, from_fused


def _raise_if_nonfinite_fused(
    call: core.Fused, items: list, use_grad: bool, norm_type: float, backend: str | None
) -> None:
    if bool(torch.isfinite(call.total)):  # the one host sync this option costs, as in torch
        return
    grads = core.collect(items, arg_name="parameters" if use_grad else "tensors",
                         use_grad=use_grad)  # fmt: skip
    stats = compute(grads, norm_type, backend)
    per_tensor = core.GroupStats(stats.norms, stats.max_abs, stats.nan_count, stats.inf_count)
    raise _nonfinite_error(norm_type, grads.names, core.nonfinite_report(grads.names, per_tensor))


def _nonfinite_error(norm_type: float, names: list[str], stats_text: str) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
        f"so it cannot be clipped: {stats_text}. No gradient was modified. To scale the "
        "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
    )


def _raise_if_nonfinite(
    total: Tensor,
    grads: core.GradList,
    groups: core.Groups,
    norm_type: float,
    backend: str | None,
    foreach: bool | None,
    stats: GradStats | None,
    sharding: distributed.Sharding | None = None,
) -> None:
    if bool(torch.isfinite(total)):  # the one host sync this option costs, as in torch
        return  # ``total`` is the value returned (fp16: > 65504 is inf there, and raises)
    if stats is None:
        stats = compute(grads, norm_type, backend, foreach, groups, sharding)
    per_tensor = core.GroupStats(stats.norms, stats.max_abs, stats.nan_count, stats.inf_count)
    raise _nonfinite_error(norm_type, grads.names, core.nonfinite_report(grads.names, per_tensor))


def apply_coef_(
    grads: core.GradList,
    coef: Tensor,
    optimizer: Any = None,
    backend: str | None = None,
    foreach: bool | None = None,
) -> None:
    """Apply a clip coefficient computed elsewhere (an adaptive clipper) to localized
    ``grads``: handed to a fused ``optimizer`` as ``grad_scale`` when it can take it, else
    the gradients are scaled in place (nothing is written where ``coef >= 1``)."""
    if not grads.grads:
        return
    core.check_writable(grads)
    if not handoff.hand_off_(optimizer, grads.params, coef):
        core.scale_groups_(core.group(grads.grads), coef, backend, foreach)


def _params_with_grad(items: list) -> list[Tensor]:
    """The parameters of a ``parameters`` list (tensors or named pairs) that have a grad."""
    tensors = (item[1] if type(item) is tuple else item for item in items)
    return [t for t in tensors if t.grad is not None]


@torch.no_grad()
def get_total_norm(
    tensors: Tensor | Any,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    process_group: Any = None,
) -> Tensor:
    """Norm of all ``tensors`` seen as one vector (the tensors themselves, not their .grad).

    Returns a 0-d tensor on the first tensor's device, in the promoted dtype of the inputs
    (``tensor(0.)`` for no tensors; a ``Replicate`` DTensor for DTensors). Same contract
    as ``torch.nn.utils.get_total_norm``.
    DTensors and ``process_group=`` shards give the norm of the full tensors, as in
    :func:`clip_grad_norm_`.
    """
    p = core.check_norm_type(norm_type)
    if process_group is None:
        tensors = core.as_list(tensors, arg_name="tensors")
        call = core.fused(tensors, p, backend, use_grad=False)
        if call is not None:
            if error_if_nonfinite:
                _raise_if_nonfinite_fused(call, tensors, False, p, backend)
            return call.total
    grads = core.collect(tensors, arg_name="tensors", use_grad=False)
    sharding = distributed.localize(grads, process_group)
    if not grads.grads:
        return torch.tensor(0.0)
    groups = core.group(grads.grads)
    norms = core.per_tensor_norms(groups, len(grads.grads), p, backend, foreach)
    total = _total(groups, norms, p, sharding, grads)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, grads, groups, p, backend, foreach, None, sharding)
    return distributed.as_total_norm(total, sharding)


def _total(
    groups: core.Groups,
    norms: Tensor,
    norm_type: float,
    sharding: distributed.Sharding | None,
    grads: core.GradList,
) -> Tensor:
    """The total norm to return (promoted grad dtype), from local per-tensor norms."""
    if sharding is None:
        return core.finish_total(groups, norms, norm_type)
    # sharded grads: global per-tensor norms (one all-reduce), then the total
    norms = sharding.reduce_norms(norms, norm_type)
    return core.total_norm(norms, norm_type).to(core.result_dtype(grads.grads))


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: Tensor | Any,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Scale gradients in place by ``min(max_norm / (total_norm + 1e-6), 1)``.

    ``total_norm`` is a 0-d tensor (e.g. from :func:`get_total_norm`); it stays on its
    device, so no host sync happens. Gradients are not written when no clipping is needed
    and the backend can tell without a sync (CPU, or the Triton backend).
    """
    max_norm = core.check_max_norm(max_norm)
    grads = core.collect(parameters)
    distributed.to_local_(grads)  # DTensor grads -> their local shards (aliases)
    if not grads.grads:
        return
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm))
    total_norm = distributed.local_tensor(total_norm)
    core.check_writable(grads)
    coef = core.clip_coefficient(max_norm, total_norm)
    core.scale_groups_(core.group(grads.grads), coef, backend, foreach)


@overload
def clip_grad_norm_(
    parameters: Tensor | Iterable[Any],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    return_stats: Literal[False] = False,
    histogram: bool = False,
    backend: str | None = None,
    process_group: Any = None,
    optimizer: Any = None,
) -> Tensor: ...


@overload
def clip_grad_norm_(
    parameters: Tensor | Iterable[Any],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    return_stats: Literal[True],
    histogram: bool = False,
    backend: str | None = None,
    process_group: Any = None,
    optimizer: Any = None,
) -> tuple[Tensor, GradStats]: ...


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Any,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    return_stats: bool = False,
    histogram: bool = False,
    backend: str | None = None,
    process_group: Any = None,
    optimizer: Any = None,
) -> Tensor | tuple[Tensor, GradStats]:
    """Clip the gradient norm of ``parameters`` in place; drop-in for torch's.

    Args:
        parameters: a Tensor, an iterable of Tensors, or ``named_parameters()`` pairs.
        max_norm: the largest total norm allowed (>= 0).
        norm_type: p of the norm; ``inf`` for max |g|. Any p torch accepts.
        error_if_nonfinite: raise ``RuntimeError`` naming the parameters holding NaN/Inf
            when the total norm is non-finite; no gradient is modified then.
        foreach: accepted for compatibility; only the torch backend looks at it.
        return_stats: also return :class:`GradStats`, computed in the same pass.
        histogram: with ``return_stats``, the stats also hold the per-tensor |g| histograms
            of the gradients before clipping (``GradStats.histogram``; see
            :func:`fastgradstats.grad_stats`). On the Triton path the stats launch bins as
            it reads: still 3 launches.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        process_group: the torch.distributed group plain-tensor gradients are shards over;
            the norm is then that of the full parameters (DTensor gradients need nothing;
            see :mod:`fastgradstats.distributed`).
        optimizer: the optimizer about to step on these gradients. A fused one (``Adam``,
            ``AdamW``, ``SGD`` with ``fused=True``) whose parameters are exactly these gets
            the coefficient as ``grad_scale`` instead (no scaling pass here; ``.grad`` holds
            the unclipped values until its ``step()``); see :mod:`fastgradstats.handoff`.

    Returns:
        The total norm (0-d tensor, first gradient's device, promoted grad dtype; for
        DTensor gradients a ``Replicate`` DTensor on their mesh, as torch returns it), or
        ``(total_norm, stats)`` when ``return_stats=True``.
    """
    max_norm = core.check_max_norm(max_norm)
    p = core.check_norm_type(norm_type)
    if not isinstance(histogram, bool):
        raise TypeError(f"histogram must be a bool, got {type(histogram).__name__}")
    if histogram and not return_stats:
        raise ValueError("histogram=True needs return_stats=True (the histograms are stats)")
    if process_group is None:  # the fused path: 3 launches, no torch op between them
        parameters = core.as_list(parameters, warn_empty_generator=True)
        call = core.fused(
            parameters, p, backend, stats=return_stats, max_norm=max_norm, histogram=histogram
        )
        if call is not None:
            if error_if_nonfinite:
                _raise_if_nonfinite_fused(call, parameters, True, p, backend)
            # the one place the coefficient is applied on this path
            if optimizer is None or not handoff.hand_off_(
                optimizer, _params_with_grad(parameters), call.coef
            ):
                call.scale_()
            if not return_stats:
                return call.total
            names = call.names if call.names is not None else call.plan.position_names
            return call.total, from_fused(call, names, p)

    grads = core.collect(parameters, warn_empty_generator=True)
    if histogram:
        check_histogram_input(grads)  # before anything is computed or written
    sharding = distributed.localize(grads, process_group)
    if not grads.grads:
        total = torch.tensor(0.0)
        return (total, empty_stats(p, histogram)) if return_stats else total

    groups = core.group(grads.grads)
    stats: GradStats | None = None
    if return_stats:
        stats = compute(grads, p, backend, foreach, groups, sharding, histogram)
        if sharding is None:
            total = core.finish_total(groups, stats.norms, p)
        else:  # the stats are global already
            total = stats.total_norm.to(core.result_dtype(grads.grads))
    else:
        norms = core.per_tensor_norms(groups, len(grads.grads), p, backend, foreach)
        total = _total(groups, norms, p, sharding, grads)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, grads, groups, p, backend, foreach, stats, sharding)

    core.check_writable(grads)
    coef = core.clip_coefficient(max_norm, total)
    if not handoff.hand_off_(optimizer, grads.params, coef):
        core.scale_groups_(groups, coef, backend, foreach)  # the generic path's one application
    total = distributed.as_total_norm(total, sharding)
    if stats is not None:
        stats.clip_coef = coef
        return total, stats
    return total


@torch.no_grad()
def clip_grad_value_(
    parameters: Tensor | Any,
    clip_value: float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Clamp every gradient of ``parameters`` in place to ``[-clip_value, clip_value]``."""
    clip_value = core.check_max_norm(clip_value, "clip_value")
    grads = core.collect(parameters)
    distributed.to_local_(grads)  # DTensor grads -> their local shards (aliases)
    if not grads.grads:
        return
    core.check_writable(grads)
    core.clamp_groups_(core.group(grads.grads), clip_value, backend, foreach)


__all__ = [
    "apply_coef_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]
