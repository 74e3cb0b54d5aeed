"""The one line every public call runs: collect -> plan -> measure -> reduce -> finish -> apply.

A caller states what it wants in a :class:`Request` (the norm, per-tensor statistics or
not, NaN/Inf counts, histograms, a fixed clip rule) and gets one :class:`Pass` back from
:func:`run`; it then decides the coefficient (or takes the one the pass computed) and
hands it to :meth:`Pass.apply_`. Nothing below syncs with the device unless a caller asks
for an error check (:meth:`Pass.raise_if_nonfinite`).

Two kinds of plan run a request:

* **fused** (``core.fused``): every gradient a dense fp32/bf16/fp16 tensor on one device
  with Triton in force, no sharding. The stats launch measures every tensor and the
  finalize launch turns the partials into per-tensor results, the total and the clip
  coefficient; histograms are binned by the same read.
* **grouped**: the gradients split by (device, dtype), each group on its backend (torch,
  or Triton's per-group kernels), partial results reduced across ranks for sharded
  gradients (``sharding``), then the total and the coefficient as torch ops.

Both give the total rounded the way ``torch.nn.utils`` rounds it (:attr:`Pass.total`),
and the total of the float32/float64 per-tensor norms (:attr:`Pass.total_acc`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from . import core, handoff, inputs, sharding
from .stats import GradStats, empty_stats, fused_stats

_F = TypeVar("_F", bound=Callable[..., Any])


def no_grad(fn: _F) -> _F:
    """``torch.no_grad()`` as a decorator for the public entry points, at a tenth of its
    host cost (it makes, enters and exits a context manager object per call: about 1 us,
    a few percent of a 148-tensor clip). Traced code takes torch's own context manager."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return fn(*args, **kwargs)
        torch._C._set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(True)

    return wrapper  # type: ignore[return-value]


@dataclass(slots=True)
class Request:
    """What a caller wants measured, and how the gradients are found.

    Attributes:
        norm_type: the p of the norms (validated by the caller).
        stats: per-tensor statistics (:class:`GradStats`) wanted.
        counts: per-tensor NaN/Inf counts wanted even without ``stats`` (error messages
            and ``skip_nonfinite`` take them from the pass that measured the norms).
        histogram: with ``stats``, the per-tensor |g| histograms too.
        max_norm: the fixed clip rule ``min(max_norm / (total + eps), 1)``; ``None``: the
            pass computes no coefficient.
        use_grad: read ``.grad`` of the inputs (``False``: the inputs are the tensors).
        arg_name: the argument named in errors.
        warn_empty_generator: warn, like torch, when the input is an empty generator.
    """

    norm_type: float
    stats: bool = False
    counts: bool = False
    histogram: bool = False
    max_norm: float | None = None
    use_grad: bool = True
    arg_name: str = "parameters"
    warn_empty_generator: bool = False
    backend: str | None = None
    foreach: bool | None = None
    process_group: Any = None


@dataclass(slots=True)
class Pass:
    """One measurement of the gradients, and how to write a coefficient back to them.

    ``total`` is local for sharded gradients; :attr:`returned_total` gives it in the form
    torch returns (a ``Replicate`` DTensor for DTensor gradients).
    """

    request: Request
    total: Tensor  # 0-d, promoted gradient dtype, torch's roundings
    total_acc: Tensor  # 0-d float32 (float64 with fp64 gradients): of the per-tensor norms
    names: list[str]
    stats: GradStats | None = None
    # grouped plan, with ``stats`` or ``counts`` (fused: rows of ``fused.floats/counts``)
    per_tensor: core.GroupStats | None = None
    coef: Tensor | None = None  # the fixed rule's coefficient (``Request.max_norm``)
    sharding: sharding.Sharding | None = None
    fused: core.Fused | None = None
    items: list | None = None  # fused: the input list (the hand-off needs its parameters)
    grads: inputs.GradList | None = None  # grouped: the collected (localized) gradients
    groups: core.Groups | None = None

    @property
    def empty(self) -> bool:
        return self.fused is None and not (self.grads and self.grads.grads)

    @property
    def returned_total(self) -> Tensor:
        return sharding.as_total_norm(self.total, self.sharding)

    def raise_if_nonfinite(self) -> None:
        """Raise, naming the tensors that hold NaN/Inf, when the total is non-finite.

        The one host sync this check costs, as in torch; the names come from the NaN/Inf
        counts of this same pass (``Request.counts``), never from a second computation.
        """
        if self.empty or bool(torch.isfinite(self.total)):
            return
        per_tensor = self.per_tensor
        if per_tensor is None and self.fused is not None and self.request.counts:
            per_tensor = core.GroupStats(*self.fused.floats, *self.fused.counts)
        assert per_tensor is not None, "raise_if_nonfinite needs Request(counts=True)"
        text = _nonfinite_report(self.names, per_tensor)
        raise RuntimeError(
            f"The total norm of order {self.request.norm_type} for gradients from "
            f"`{self.request.arg_name}` is non-finite, so it cannot be clipped: {text}. No "
            "gradient was modified. To scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )

    def apply_(self, coef: Tensor, optimizer: Any = None) -> None:
        """Scale the gradients by the 0-d device ``coef`` (no write where it is >= 1), or
        hand it to a fused ``optimizer`` that takes it as ``grad_scale``."""
        if self.empty:
            return
        call = self.fused
        if call is None:
            assert self.grads is not None and self.groups is not None
            inputs.check_writable(self.grads)  # before the hand-off: it writes too, later
        if optimizer is not None:  # the parameters only then: a walk of every tensor
            params = self._params() if call is not None else self.grads.params
            if handoff.hand_off_(optimizer, params, coef):
                return
        if call is not None:
            call.scale_(coef if coef is call.coef else coef.to(torch.float32))
        else:
            core.scale_groups_(self.groups, coef, self.request.backend, self.request.foreach)

    def _params(self) -> list[Tensor]:
        items = self.items or []
        if not self.request.use_grad:
            return []
        tensors = (item[1] if type(item) is tuple else item for item in items)
        return [t for t in tensors if t.grad is not None]


def _nonfinite_report(names: list[str], stats: core.GroupStats, limit: int = 10) -> str:
    """A human sentence naming the tensors that hold NaN/Inf (syncs once)."""
    nan = stats.nan_count.tolist()
    inf = stats.inf_count.tolist()
    bad = [
        f"{name} ({n_nan} NaN, {n_inf} Inf)"
        for name, n_nan, n_inf in zip(names, nan, inf)
        if n_nan or n_inf
    ]
    if not bad:
        return "no gradient holds a NaN or Inf: the norm itself overflowed the accumulator"
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return "non-finite values in " + ", ".join(bad[:limit]) + more


def run(items: Any, request: Request) -> Pass:
    """Measure the gradients of ``items`` as ``request`` asks; see the module docstring."""
    if request.process_group is None:
        items = inputs.as_list(items, request.arg_name, request.warn_empty_generator)
        call = core.fused(
            items,
            request.norm_type,
            request.backend,
            use_grad=request.use_grad,
            stats=request.stats or request.counts,
            max_norm=request.max_norm,
            histogram=request.histogram,
        )
        if call is not None:
            return _fused_pass(call, items, request)
    grads = inputs.collect(
        items,
        arg_name=request.arg_name,
        use_grad=request.use_grad,
        warn_empty_generator=request.warn_empty_generator,
    )
    if request.histogram:
        inputs.check_histogram_input(grads)  # before anything is computed or written
    return _grouped_pass(grads, sharding.localize(grads, request.process_group), request)


def _fused_pass(call: core.Fused, items: list, request: Request) -> Pass:
    names = call.names if call.names is not None else call.plan.position_names
    # per-tensor results stay the kernels' packed [2, n] buffers: a row view costs as much
    # host time as a launch, so the only views made are those of the stats handed out
    stats = fused_stats(call, names, request.norm_type) if request.stats else None
    return Pass(request, call.total, call.exact_total, names, stats, None, call.coef,
                fused=call, items=items)  # fmt: skip


def _grouped_pass(grads: inputs.GradList, shards: sharding.Sharding | None, req: Request) -> Pass:
    p = req.norm_type
    if not grads.grads:
        stats = empty_stats(p, req.histogram) if req.stats else None
        zero = torch.tensor(0.0)
        return Pass(req, zero, zero, [], stats, grads=grads)  # torch returns tensor(0.)
    groups = core.group(grads.grads)
    full = req.stats or req.counts
    measured, bins = core.measure(groups, len(grads.grads), p, req.backend, req.foreach,
                                  full=full, histogram=req.histogram)  # fmt: skip
    numels = [g.numel() for g in grads.grads] if req.stats else []
    if shards is not None:  # sharded grads: combine the partials across ranks
        if isinstance(measured, core.GroupStats):
            measured, numels = shards.reduce_stats(measured, p)
        else:
            measured = shards.reduce_norms(measured, p)
        bins = shards.reduce_histograms(*bins) if bins is not None else None
    per_tensor = measured if isinstance(measured, core.GroupStats) else None
    norms = per_tensor.norms if per_tensor is not None else measured
    total_acc = core.total_norm(norms, p)
    # torch's roundings; sharded: global per-tensor norms already, so the promoted dtype
    total = core.finish_total(groups, norms, p) if shards is None else total_acc.to(groups.result)
    coef = core.clip_coefficient(req.max_norm, total) if req.max_norm is not None else None
    stats = None
    if req.stats:
        assert per_tensor is not None
        counts, zeros = bins if bins is not None else (None, None)
        stats = GradStats(grads.names, *per_tensor, total_norm=total_acc, norm_type=p,
                          clip_coef=coef, numels=numels, histogram=counts,
                          zero_count=zeros)  # fmt: skip
    return Pass(req, total, total_acc, grads.names, stats, per_tensor, coef, shards,
                grads=grads, groups=groups)  # fmt: skip


def finished(
    grads: inputs.GradList,
    stats: GradStats,
    request: Request,
    shards: sharding.Sharding | None = None,
) -> Pass:
    """The :class:`Pass` of per-tensor statistics measured elsewhere (during backward, see
    :mod:`fastgradstats.backward`): only the finish (torch's total, the fixed rule's
    coefficient) and the grouped plan's apply remain. ``grads`` must be non-empty;
    ``shards``: how sharded gradients were reduced (``stats`` are then of the full
    parameters, ``grads`` the local shards), as in the grouped pass."""
    groups = core.group(grads.grads)
    if shards is None:
        total = core.finish_total(groups, stats.norms, request.norm_type)
    else:  # global per-tensor norms already: the promoted dtype, as _grouped_pass
        total = stats.total_norm.to(groups.result)
    per_tensor = core.GroupStats(stats.norms, stats.max_abs, stats.nan_count, stats.inf_count)
    coef = None
    if request.max_norm is not None:
        coef = stats.clip_coef = core.clip_coefficient(request.max_norm, total)
    return Pass(request, total, stats.total_norm, grads.names, stats, per_tensor, coef, shards,
                grads=grads, groups=groups)  # fmt: skip


def finished_fused(
    grads: inputs.GradList, stats: GradStats, request: Request, total: Tensor, coef: Tensor | None
) -> Pass:
    """:func:`finished` for statistics whose total (torch's roundings) and clip
    coefficient a finalize launch computed already (the Triton path of
    :mod:`fastgradstats.backward`): no torch op, the grouped plan's apply only."""
    per_tensor = core.GroupStats(stats.norms, stats.max_abs, stats.nan_count, stats.inf_count)
    if request.max_norm is not None:
        stats.clip_coef = coef
    return Pass(request, total, stats.total_norm, grads.names, stats, per_tensor, coef,
                grads=grads, groups=core.group(grads.grads))  # fmt: skip


def writable_grads(items: Any) -> inputs.GradList:
    """The local gradients of ``items`` for an element-wise write (scale by a given
    norm, clamp, zero), refused before anything is written when one cannot be written in
    place. DTensor gradients become their local shards (aliases): no reduction needed."""
    grads = inputs.collect(items)
    sharding.to_local_(grads)
    if grads.grads:
        inputs.check_writable(grads)
    return grads


def zero_where_(params: list[Tensor], items: Any, flag: Tensor, backend: str | None) -> None:
    """Zero the gradients in place where the 0-d bool device ``flag`` is set (no sync):
    through the fused plan the stats pass cached when there is one, else per group."""
    if core.zero_where_fused(params, flag, backend):
        return
    grads = writable_grads(items)
    if grads.grads:
        core.zero_groups_where_(core.group(grads.grads), flag, backend)


__all__ = [
    "Pass",
    "Request",
    "finished",
    "finished_fused",
    "no_grad",
    "run",
    "writable_grads",
    "zero_where_",
]
