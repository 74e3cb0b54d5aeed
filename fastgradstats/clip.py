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

from . import core, engine, inputs, sharding
from .stats import GradStats


@engine.no_grad
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
    request = engine.Request(
        inputs.check_norm_type(norm_type), counts=error_if_nonfinite, use_grad=False,
        arg_name="tensors", backend=backend, foreach=foreach, process_group=process_group,
    )  # fmt: skip
    measured = engine.run(tensors, request)
    if error_if_nonfinite:
        measured.raise_if_nonfinite()
    return measured.returned_total


@engine.no_grad
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
    max_norm = inputs.check_max_norm(max_norm)
    grads = engine.writable_grads(parameters)
    if not grads.grads:
        return
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm))
    coef = core.clip_coefficient(max_norm, sharding.local_tensor(total_norm))
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


@engine.no_grad
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
    inputs.check_histogram_flag(histogram)
    if histogram and not return_stats:
        raise ValueError("histogram=True needs return_stats=True (the histograms are stats)")
    request = engine.Request(
        inputs.check_norm_type(norm_type), stats=return_stats, counts=error_if_nonfinite,
        histogram=histogram, max_norm=inputs.check_max_norm(max_norm), warn_empty_generator=True,
        backend=backend, foreach=foreach, process_group=process_group,
    )  # fmt: skip
    measured = engine.run(parameters, request)
    if error_if_nonfinite:
        measured.raise_if_nonfinite()
    if measured.coef is not None:  # the one place the fixed rule's coefficient is applied
        measured.apply_(measured.coef, optimizer)
    if not return_stats:
        return measured.returned_total
    assert measured.stats is not None
    return measured.returned_total, measured.stats


@engine.no_grad
def clip_grad_value_(
    parameters: Tensor | Any,
    clip_value: float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Clamp every gradient of ``parameters`` in place to ``[-clip_value, clip_value]``."""
    clip_value = inputs.check_max_norm(clip_value, "clip_value")
    grads = engine.writable_grads(parameters)
    if grads.grads:
        core.clamp_groups_(core.group(grads.grads), clip_value, backend, foreach)


@engine.no_grad
def grad_stats(
    parameters: Any,
    norm_type: float | str = 2.0,
    *,
    backend: str | None = None,
    process_group: Any = None,
    histogram: bool = False,
) -> GradStats:
    """Per-tensor gradient norm, max |g|, NaN/Inf counts and the total norm, in one pass.

    Args:
        parameters: a Tensor, an iterable of Tensors (their ``.grad`` is read), or
            ``model.named_parameters()`` pairs (names are kept). ``None`` grads are skipped.
        norm_type: the p of the norms (any p torch accepts; 1, 2 and inf run fused).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; default ``$FASTGRADSTATS_BACKEND``
            or ``"auto"``.
        process_group: for plain tensors that are shards of parameters sharded over this
            torch.distributed group; DTensor gradients need nothing (see
            :mod:`fastgradstats.distributed`). Stats are then those of the full parameters.
        histogram: also bin every finite |g| per tensor on power-of-two edges
            (``GradStats.histogram`` [n, 152], ``histogram_edges``, ``zero_count``; see
            :mod:`fastgradstats.histogram`), on the device, no host sync. On the Triton
            backend the stats launches bin as they read (no extra launch). With ``process_group=``
            shards or DTensor gradients the counts are those of the full parameters (one
            more SUM all-reduce, replicas counted once).

    Returns:
        :class:`GradStats` holding device tensors; nothing is synced until you ask for
        numbers (``to_dict()``, ``nonfinite_names()``, ``table()``).
    """
    inputs.check_histogram_flag(histogram)
    request = engine.Request(
        inputs.check_norm_type(norm_type), stats=True, histogram=histogram, backend=backend,
        process_group=process_group,
    )  # fmt: skip
    stats = engine.run(parameters, request).stats
    assert stats is not None
    return stats


__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_stats",
]
