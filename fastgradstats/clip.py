"""Drop-in replacements for the gradient clipping functions of ``torch.nn.utils``.

Same signatures, return values and return dtypes as torch 2.13, plus keyword-only extras
(``backend=``, ``return_stats=``). Differences, all on purpose:

* per-tensor norms of 16-bit gradients are accumulated in float32 (torch rounds them to
  the gradient dtype first), so results are at least as close to the exact norm;
* when clipping is not needed the gradients are not written at all (torch multiplies
  them by 1.0, which leaves the same bits), except under ``torch.compile`` on the torch
  backend, which multiplies them by 1.0 too (a graph cannot branch on the coefficient);
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

from typing import Any

import torch
from torch import Tensor

from . import core, distributed, handoff
from .stats import GradStats, compute, empty_stats


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
        return
    if stats is None:
        stats = compute(grads, norm_type, backend, foreach, groups, sharding)
    per_tensor = core.GroupStats(stats.norms, stats.max_abs, stats.nan_count, stats.inf_count)
    raise _nonfinite_error(norm_type, grads.names, core.nonfinite_report(grads.names, per_tensor))


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
    grads = core.collect(tensors, arg_name="tensors", use_grad=False)
    sharding = distributed.localize(grads, process_group)
    if not grads.grads:
        return torch.tensor(0.0)
    groups = core.group(grads.grads)
    norms = core.per_tensor_norms(groups, len(grads.grads), p, backend, foreach)
    if sharding is not None:  # sharded grads: global per-tensor norms, one all-reduce
        norms = sharding.reduce_norms(norms, p)
    total = core.total_norm(norms, p)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, grads, groups, p, backend, foreach, None, sharding)
    return distributed.as_total_norm(total.to(core.result_dtype(grads.grads)), sharding)


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
    coef = core.clip_coefficient(max_norm, total_norm)
    core.scale_groups_(core.group(grads.grads), coef, backend, foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Any,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    return_stats: bool = False,
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
    grads = core.collect(parameters, warn_empty_generator=True)
    sharding = distributed.localize(grads, process_group)
    if not grads.grads:
        total = torch.tensor(0.0)
        return (total, empty_stats(p)) if return_stats else total

    groups = core.group(grads.grads)
    stats: GradStats | None = None
    if return_stats:
        stats = compute(grads, p, backend, foreach, groups, sharding)
        total = stats.total_norm
    else:
        norms = core.per_tensor_norms(groups, len(grads.grads), p, backend, foreach)
        if sharding is not None:  # sharded grads: global per-tensor norms, one all-reduce
            norms = sharding.reduce_norms(norms, p)
        total = core.total_norm(norms, p)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, grads, groups, p, backend, foreach, stats, sharding)

    coef = core.clip_coefficient(max_norm, total)
    if not handoff.hand_off_(optimizer, grads.params, coef):
        core.scale_groups_(groups, coef, backend, foreach)
    result = distributed.as_total_norm(total.to(core.result_dtype(grads.grads)), sharding)
    if stats is not None:
        stats.clip_coef = coef
        return result, stats
    return result


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
    core.clamp_groups_(core.group(grads.grads), clip_value, backend, foreach)


__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]
