"""The engine behind the public functions: collect -> plan -> kernels -> finish -> apply.

Two paths give the same results:

* the **fused path** (:func:`fused`): every gradient a dense fp32/bf16/fp16 tensor on one
  device, Triton handling them all, no sharding. One walk over the gradients in Python
  (``.grad``, ``data_ptr()``, ``numel()``) finds the cached plan; the kernels compute the
  per-tensor results, the total norm and the clip coefficient on the device (2 launches
  per (dtype, alignment) segment + 1); :meth:`Fused.scale_` applies the coefficient.
* the **generic path**: input normalisation and validation (:func:`collect`), the
  (device, dtype) grouping, one backend call per group, cross-rank reduction
  (``distributed``), then :func:`finish_total` and :func:`clip_coefficient` as torch ops.

Both return the total norm rounded the way ``torch.nn.utils`` rounds it (per-tensor norms
in the gradient dtype, the total and the coefficient in the promoted gradient dtype), so
clipped 16-bit gradients match torch's bit for bit. Nothing here syncs with the device
unless a caller asks for an error check that needs a host decision
(``error_if_nonfinite``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from . import torch_backend
from .constants import CLIP_EPS
from .dispatch import backend_for, requested_backend, triton_module
from .inputs import NamedTensors
from .torch_backend import GroupStats, acc_dtype


def result_dtype(grads: list[Tensor]) -> torch.dtype:
    """The dtype torch.nn.utils returns the total norm in: the promotion of the grad dtypes."""
    dtype = grads[0].dtype
    for g in grads[1:]:
        if g.dtype != dtype:
            dtype = torch.promote_types(dtype, g.dtype)
    return dtype.to_real() if dtype.is_complex else dtype


@dataclass
class Groups:
    """The (device, dtype) groups of a gradient list and how to put results back in order."""

    keys: list[tuple[torch.device, torch.dtype]]
    tensors: list[list[Tensor]]
    indices: list[list[int]]
    device: torch.device  # the first gradient's device: where combined results live
    acc: torch.dtype  # of the per-tensor results: float64 when a group is fp64, else fp32
    result: torch.dtype  # of the total torch returns: the promoted gradient dtype
    # several groups: int64 device tensors of the input positions, all groups' in group
    # order (``order``) and each group's (``positions``); copied once per call
    order: Tensor | None = None
    positions: list[Tensor] | None = None

    @property
    def in_order(self) -> bool:
        return len(self.keys) == 1


def group(grads: list[Tensor]) -> Groups:
    """Split ``grads`` by (device, dtype), remembering each tensor's input position."""
    grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True)
    keys, tensors, indices = [], [], []
    for key, ([group_tensors], group_indices) in grouped.items():
        keys.append(key)
        tensors.append(group_tensors)
        indices.append(group_indices)
    acc = torch.float64 if any(acc_dtype(k[1]) == torch.float64 for k in keys) else torch.float32
    device = grads[0].device
    groups = Groups(keys, tensors, indices, device, acc, result_dtype(grads))
    if len(keys) > 1:
        flat = torch_backend.host_to_device(
            [i for idx in indices for i in idx], torch.int64, device
        )
        groups.order = flat
        groups.positions = list(flat.split([len(idx) for idx in indices]))
    return groups


def _merge(groups: Groups, parts: list[Tensor], n: int) -> Tensor:
    """Concatenate per-group [n_i] results on the first device, back in input order."""
    parts = [p.to(groups.device) for p in parts]
    if groups.in_order:
        return parts[0]
    flat = torch.cat([p.to(parts[0].dtype) for p in parts])
    out = torch.empty((n, *flat.shape[1:]), dtype=flat.dtype, device=groups.device)
    out[groups.order] = flat
    return out


def measure(
    groups: Groups,
    n: int,
    norm_type: float,
    backend: str | None,
    foreach: bool | None,
    *,
    full: bool = False,
    histogram: bool = False,
) -> tuple[Tensor | GroupStats, tuple[Tensor, Tensor] | None]:
    """Every group measured on its backend, results [n] in input order on the first device.

    Returns ``(per_tensor, bins)``: ``per_tensor`` is the ``norm_type``-norms [n]
    (accumulation dtype), or with ``full`` a :class:`GroupStats` (norm, max |g|, NaN and
    Inf counts); ``bins`` is ``None``, or with ``histogram`` the |g| histograms int64
    [n, NUM_BINS] and zero counts int64 [n] (a read of their own per group).
    """
    fields: list[list[Tensor]] = [[] for _ in range(4 if full else 1)]
    counts: list[Tensor] = []
    zeros: list[Tensor] = []
    for (device, dtype), tensors in zip(groups.keys, groups.tensors):
        impl = backend_for(device, dtype, norm_type, backend)
        if full:
            stats = impl.group_stats(tensors, norm_type, foreach)
            fields[0].append(stats.norms.to(groups.acc))
            fields[1].append(stats.max_abs.to(groups.acc))
            fields[2].append(stats.nan_count)
            fields[3].append(stats.inf_count)
        else:
            fields[0].append(impl.group_norms(tensors, norm_type, foreach).to(groups.acc))
        if histogram:
            _add_histogram(tensors, device, dtype, backend, counts, zeros)
    merged = [_merge(groups, parts, n) for parts in fields]
    bins = (_merge(groups, counts, n), _merge(groups, zeros, n)) if histogram else None
    return (GroupStats(*merged) if full else merged[0]), bins


def _add_histogram(
    tensors: list[Tensor],
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None,
    counts: list[Tensor],
    zeros: list[Tensor],
) -> None:
    # any p picks the same histogram backend: 2.0, a norm every backend runs
    group_counts, group_zeros = backend_for(device, dtype, 2.0, backend).group_histogram(tensors)
    counts.append(group_counts)
    zeros.append(group_zeros)


def per_tensor_histograms(groups: Groups, n: int, backend: str | None) -> tuple[Tensor, Tensor]:
    """Per-tensor |g| histograms int64 [n, NUM_BINS] and zero counts int64 [n], input
    order, first device: each group on its backend (a read of its own)."""
    counts: list[Tensor] = []
    zeros: list[Tensor] = []
    for (device, dtype), tensors in zip(groups.keys, groups.tensors):
        _add_histogram(tensors, device, dtype, backend, counts, zeros)
    return _merge(groups, counts, n), _merge(groups, zeros, n)


def total_norm(norms: Tensor, norm_type: float) -> Tensor:
    """The norm of the per-tensor norms: the norm of all gradients seen as one vector.

    Reduced the way torch.nn.utils reduces it (``vector_norm`` of the per-tensor norms), so
    float32 results match torch's bit for bit when the per-tensor norms do.
    """
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    return torch.linalg.vector_norm(norms, norm_type)


def finish_total(groups: Groups, norms: Tensor, norm_type: float) -> Tensor:
    """The total norm as ``torch.nn.utils`` computes it, in the promoted gradient dtype.

    torch takes each group's per-tensor norms in the gradient dtype (``_foreach_norm``
    rounds them), stacks them group after group (promoting) and takes ``vector_norm``;
    the same roundings are reproduced from our accumulation-dtype norms ``norms`` [n]
    (input order), so the clip coefficient, and the clipped 16-bit gradients, match
    torch's bit for bit.
    """
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    dtypes = [dtype.to_real() if dtype.is_complex else dtype for _, dtype in groups.keys]
    if groups.in_order:
        stacked = norms.to(dtypes[0])
    else:
        assert groups.positions is not None
        parts = []
        for dtype, index in zip(dtypes, groups.positions):
            parts.append(norms.index_select(0, index.to(norms.device)).to(dtype))
        stacked = torch.cat(parts)  # promotes, as torch.stack does
    return torch.linalg.vector_norm(stacked, norm_type)


def clip_coefficient(max_norm: float, total: Tensor) -> Tensor:
    """``min(max_norm / (total + 1e-6), 1)`` on the device, as torch computes it (in
    ``total``'s dtype: same roundings as torch)."""
    return torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)


def scale_groups_(groups: Groups, coef: Tensor, backend: str | None, foreach: bool | None) -> None:
    """Multiply every gradient by ``coef`` in place, one backend call per group."""
    for (device, dtype), tensors in zip(groups.keys, groups.tensors):
        impl = backend_for(device, dtype, 2.0, backend)
        impl.scale_(tensors, coef.to(device), foreach)


def zero_groups_where_(groups: Groups, flag: Tensor, backend: str | None) -> None:
    """Zero every gradient in place where the 0-d bool ``flag`` is set (no host sync)."""
    for (device, dtype), tensors in zip(groups.keys, groups.tensors):
        impl = backend_for(device, dtype, 2.0, backend)
        impl.zero_where_(tensors, flag.to(device))


def clamp_groups_(
    groups: Groups, clip_value: float, backend: str | None, foreach: bool | None
) -> None:
    """Clamp every gradient in place to ``[-clip_value, clip_value]``."""
    for (device, dtype), tensors in zip(groups.keys, groups.tensors):
        impl = backend_for(device, dtype, 2.0, backend)
        impl.clamp_(tensors, clip_value, foreach)


# --- the fused path -----------------------------------------------------------------------

_GRAD = operator.attrgetter("grad")
_TUPLE, _TWO, _STR = {tuple}, {2}, {str}
_FUSED_NORMS = (1.0, 2.0, math.inf)


@dataclass
class Fused:
    """A fused call in flight: the kernels' results and how to apply the coefficient."""

    grads: list[Tensor]
    plan: Any  # triton_backend.Plan
    impl: Any  # the triton_backend module
    total: Tensor  # 0-d, promoted gradient dtype, torch's roundings
    exact_total: Tensor  # 0-d float32, from the float32 per-tensor norms
    floats: Tensor  # float32 [2, n]: per-tensor norm, max |g|
    counts: Tensor  # int64 [2, n]: NaN and Inf counts
    coef: Tensor | None  # 0-d float32 clip coefficient
    names: list[str] | None  # None: unnamed input, names are the input positions
    histogram: Tensor | None = None  # int64 [n, NUM_BINS] (``histogram=True``)
    zero_count: Tensor | None = None  # int64 [n] (``histogram=True``)

    @property
    def numels(self) -> list[int]:
        return self.plan.numel_list

    def scale_(self, coef: Tensor) -> None:
        """Scale every gradient by the 0-d float32 device ``coef`` through the plan (the
        kernel leaves memory alone when it is >= 1)."""
        self.impl.scale_fused(self.plan, coef, self.grads)


def fused(
    items: list,
    norm_type: float,
    backend: str | None,
    *,
    use_grad: bool = True,
    stats: bool = False,
    max_norm: float | None = None,
    histogram: bool = False,
) -> Fused | None:
    """Run the fused stats + finalize for ``items``, or ``None`` for the generic path.

    ``histogram=True`` (with ``stats``): the stats launches also bin every element (the
    same single read), filling ``Fused.histogram`` and ``Fused.zero_count``.

    The steady state reads ``.grad``, then checks the cached plan in one walk: every
    gradient's address and, by one C++ check per run of ``CHECK_CHUNK`` (1,024)
    gradients, its dtype, shape and strides (``Plan.matches``). A miss (or a ``None``
    gradient) walks the addresses once more to find or build the plan.
    """
    if not items or norm_type not in _FUSED_NORMS:
        return None
    requested = requested_backend(backend)
    if requested == "torch" or torch.compiler.is_compiling():  # traced code: custom ops (generic)
        return None
    names = None
    plan = None
    try:
        tensors = items
        if type(items) is NamedTensors:  # pairs split and checked once, by the caller
            names, tensors = items.names, items.tensors
        elif type(items[0]) is tuple:  # named_parameters() pairs
            # C-level checks (no Python call per item): 10k pairs must cost far less
            # than the launches they feed
            if set(map(type, items)) != _TUPLE or set(map(len, items)) != _TWO:
                return None
            names = [item[0] for item in items]
            tensors = [item[1] for item in items]
            if set(map(type, names)) != _STR:
                return None
            if not all(issubclass(kind, Tensor) for kind in set(map(type, tensors))):
                return None
        grads = list(map(_GRAD, tensors)) if use_grad else tensors
        first = grads[0]
        # auto: Triton on CUDA only (and Triton is not imported for CPU gradients)
        if first is not None and (requested != "auto" or first.device.type == "cuda"):
            impl = triton_module()
            plan = impl.cached_plan(grads) if impl is not None else None
        if plan is None:
            try:
                ptrs = tuple(map(Tensor.data_ptr, grads))  # raises for None, DTensor, non-tensors
            except TypeError:
                if not use_grad:
                    return None
                grads = [g for g in grads if g is not None]  # parameters without a gradient
                if names is not None:
                    names = [n for n, t in zip(names, tensors) if t.grad is not None]
                ptrs = tuple(map(Tensor.data_ptr, grads))
            if not grads:
                return None
            if requested == "auto" and grads[0].device.type != "cuda":
                return None
    except (AttributeError, TypeError, RuntimeError):
        return None
    if plan is None:
        impl = triton_module()
        if impl is None:
            return None  # the generic path says why (or falls back to torch for auto)
        plan = impl.plan_for(ptrs, grads)
        if plan is None:
            return None
    if stats and names is None and use_grad and len(grads) < len(tensors):
        names = [str(i) for i, t in enumerate(tensors) if t.grad is not None]
    out = impl.run_fused(plan, norm_type, stats=stats, max_norm=max_norm, histogram=histogram)
    return Fused(
        grads, plan, impl, out.total, out.exact_total, out.floats, out.counts, out.coef, names,
        out.histogram, out.zero_count,
    )  # fmt: skip


def zero_where_fused(params: list[Tensor], flag: Tensor, backend: str | None) -> bool:
    """Zero the ``.grad`` of ``params`` in place where the 0-d bool device ``flag`` is set,
    through the plan the fused stats pass cached for these gradients (one launch per
    segment, nothing per tensor but the walk). ``False``, with nothing done, when the
    generic path must do it (torch backend, DTensor or non-dense gradients, ...)."""
    requested = requested_backend(backend)
    if not params or requested == "torch" or torch.compiler.is_compiling():
        return False
    try:
        grads = [g for g in map(_GRAD, params) if g is not None]
        if not grads or (requested == "auto" and grads[0].device.type != "cuda"):
            return False
        ptrs = tuple(map(Tensor.data_ptr, grads))  # raises for DTensor
    except (AttributeError, TypeError, RuntimeError):
        return False
    impl = triton_module()
    if impl is None:
        return False
    plan = impl.plan_for(ptrs, grads)
    if plan is None:
        return False
    impl.zero_fused(plan, flag, grads)
    return True


__all__ = [
    "Fused",
    "Groups",
    "clamp_groups_",
    "clip_coefficient",
    "finish_total",
    "fused",
    "group",
    "measure",
    "per_tensor_histograms",
    "result_dtype",
    "scale_groups_",
    "total_norm",
    "zero_groups_where_",
    "zero_where_fused",
]
