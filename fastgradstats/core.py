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
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from . import torch_backend
from .constants import CLIP_EPS
from .dispatch import backend_for, requested_backend, triton_module
from .torch_backend import GroupStats, acc_dtype


@dataclass
class GradList:
    """Gradients gathered from the user's input, in input order (``None`` grads dropped)."""

    names: list[str]
    params: list[Tensor]  # the tensors whose .grad is in ``grads`` (the grads themselves
    grads: list[Tensor]  # when the caller passed gradients directly)


_TUPLE, _TWO, _STR = {tuple}, {2}, {str}


def _is_named_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], Tensor)
    )


def _materialize(items: Any, arg_name: str, warn_empty_generator: bool) -> list[Any]:
    if isinstance(items, Tensor):
        return [items]
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(
            f"{arg_name} must be a Tensor, an iterable of Tensors or of (name, Tensor) pairs; "
            f"got {type(items).__name__}"
        )
    is_generator = isinstance(items, types.GeneratorType)
    items = list(items)
    if warn_empty_generator and is_generator and not items:
        warnings.warn(
            f"`{arg_name}` is an empty generator, no gradient clipping will occur.",
            stacklevel=4,
        )
    return items


def _name_and_tensor(item: Any, index: int, arg_name: str) -> tuple[str, Tensor]:
    if _is_named_pair(item):
        return item
    if isinstance(item, Tensor):
        return str(index), item
    raise TypeError(
        f"{arg_name}[{index}] must be a Tensor or a (name, Tensor) pair, got {type(item).__name__}"
    )


def check_grad(grad: Tensor, name: str) -> None:
    """Raise ``TypeError`` for a gradient no backend can handle, naming its parameter."""
    if grad.layout != torch.strided:
        raise TypeError(
            f"gradient of parameter {name!r} has layout {grad.layout}; fastgradstats supports "
            "dense (strided) gradients only"
        )
    if not (grad.is_floating_point() or grad.is_complex()):
        raise TypeError(
            f"gradient of parameter {name!r} has dtype {grad.dtype}; a floating point "
            "gradient is required"
        )
    if grad.dtype.itemsize < 2:  # float8 / float4: torch has no norm, mul or clamp for them
        raise TypeError(
            f"gradient of parameter {name!r} has dtype {grad.dtype}; fastgradstats supports "
            "16, 32 and 64-bit float (and complex) gradients: upcast it first, e.g. grad.float()"
        )


def collect(
    items: Any,
    *,
    arg_name: str = "parameters",
    use_grad: bool = True,
    warn_empty_generator: bool = False,
) -> GradList:
    """Normalise ``items`` into names, parameters and gradients, validating each gradient.

    ``use_grad=True`` takes ``p.grad`` of each tensor (parameters); ``False`` takes the
    tensors themselves (``get_total_norm`` receives gradients directly).
    """
    names: list[str] = []
    params: list[Tensor] = []
    grads: list[Tensor] = []
    for index, item in enumerate(_materialize(items, arg_name, warn_empty_generator)):
        name, tensor = _name_and_tensor(item, index, arg_name)
        grad = tensor.grad if use_grad else tensor
        if grad is None:
            continue
        check_grad(grad, name)
        names.append(name)
        params.append(tensor)
        grads.append(grad)
    return GradList(names, params, grads)


def check_norm_type(norm_type: Any) -> float:
    """``float(norm_type)`` or a ``ValueError`` naming the argument (NaN is refused)."""
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(value):
        raise ValueError("norm_type must not be NaN")
    return value


def check_max_norm(max_norm: Any, arg_name: str = "max_norm") -> float:
    """``float(max_norm)``, refusing negative and NaN values with a ``ValueError``."""
    try:
        value = float(max_norm)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{arg_name} must be a real number, got {max_norm!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"{arg_name} must be a non-negative number, got {value}")
    return value


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
    acc: torch.dtype

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
    return Groups(keys, tensors, indices, grads[0].device, acc)


def _merge(groups: Groups, parts: list[Tensor], n: int) -> Tensor:
    """Concatenate per-group [n_i] results on the first device, back in input order."""
    parts = [p.to(groups.device) for p in parts]
    if groups.in_order:
        return parts[0]
    flat = torch.cat([p.to(parts[0].dtype) for p in parts])
    order = [i for idx in groups.indices for i in idx]
    order = torch_backend.host_to_device(order, torch.int64, groups.device)
    out = torch.empty(n, dtype=flat.dtype, device=groups.device)
    out[order] = flat
    return out


def per_tensor_norms(
    groups: Groups, n: int, norm_type: float, backend: str | None, foreach: bool | None
) -> Tensor:
    """Per-tensor ``norm_type``-norms, shape [n], accumulation dtype, input order."""
    parts = []
    for (device, dtype), tensors in zip(groups.keys, groups.tensors):
        impl = backend_for(device, dtype, norm_type, backend)
        parts.append(impl.group_norms(tensors, norm_type, foreach).to(groups.acc))
    return _merge(groups, parts, n)


def per_tensor_stats(
    groups: Groups, n: int, norm_type: float, backend: str | None, foreach: bool | None
) -> GroupStats:
    """Per-tensor norm, max |g|, NaN and Inf counts, each [n], input order, first device."""
    fields: list[list[Tensor]] = [[], [], [], []]
    for (device, dtype), tensors in zip(groups.keys, groups.tensors):
        impl = backend_for(device, dtype, norm_type, backend)
        stats = impl.group_stats(tensors, norm_type, foreach)
        fields[0].append(stats.norms.to(groups.acc))
        fields[1].append(stats.max_abs.to(groups.acc))
        fields[2].append(stats.nan_count)
        fields[3].append(stats.inf_count)
    return GroupStats(*(_merge(groups, parts, n) for parts in fields))


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
        parts = []
        for dtype, indices in zip(dtypes, groups.indices):
            index = torch_backend.host_to_device(indices, torch.int64, norms.device)
            parts.append(norms.index_select(0, index).to(dtype))
        stacked = torch.cat(parts)  # promotes, as torch.stack does
    return torch.linalg.vector_norm(stacked, norm_type)


def clip_coefficient(max_norm: float, total: Tensor) -> Tensor:
    """``min(max_norm / (total + 1e-6), 1)`` on the device, as torch computes it (in
    ``total``'s dtype: same roundings as torch)."""
    return torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)


def check_writable(grads: GradList) -> None:
    """Refuse, before anything is written, a gradient that cannot be written in place.

    An expanded (stride 0) gradient has elements sharing memory; torch's in-place ops
    refuse it, and they would do so after other gradients were already scaled.
    """
    for name, g in zip(grads.names, grads.grads):
        if not g.is_contiguous() and torch._debug_has_internal_overlap(g) == 1:
            raise RuntimeError(
                f"gradient of parameter {name!r} (shape {tuple(g.shape)}, stride "
                f"{g.stride()}) has elements that share memory (an expanded view), so it "
                "cannot be modified in place; no gradient was modified. Make it a real "
                "tensor, e.g. p.grad = p.grad.contiguous()"
            )


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


def as_list(items: Any, arg_name: str = "parameters", warn_empty_generator: bool = False) -> list:
    """``items`` as a list (a list is returned as is), with the checks of :func:`collect`."""
    if type(items) is list:
        return items
    return _materialize(items, arg_name, warn_empty_generator)


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

    The steady state walks the gradients once: ``.grad``, then ``data_ptr()`` (the plan
    key), then one C++ check that every gradient's dtype, shape and strides are unchanged
    behind those addresses (``Plan.matches``).
    """
    if not items or norm_type not in _FUSED_NORMS:
        return None
    requested = requested_backend(backend)
    if requested == "torch" or torch.compiler.is_compiling():  # traced code: custom ops (generic)
        return None
    names = None
    try:
        tensors = items
        if type(items[0]) is tuple:  # named_parameters() pairs
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
            return None  # auto: Triton on CUDA only
    except (AttributeError, TypeError, RuntimeError):
        return None
    impl = triton_module()
    if impl is None:
        return None  # the generic path says why (or falls back to torch for auto)
    kernels = impl.kernels
    plan = impl.plan_for((hash(ptrs), kernels.BLOCK, kernels.TILE), ptrs, grads)
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
    kernels = impl.kernels
    plan = impl.plan_for((hash(ptrs), kernels.BLOCK, kernels.TILE), ptrs, grads)
    if plan is None:
        return False
    impl.zero_fused(plan, flag, grads)
    return True


def nonfinite_report(names: list[str], stats: GroupStats, limit: int = 10) -> str:
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


__all__ = [
    "Fused",
    "GradList",
    "Groups",
    "as_list",
    "check_grad",
    "check_max_norm",
    "check_norm_type",
    "check_writable",
    "clamp_groups_",
    "clip_coefficient",
    "collect",
    "finish_total",
    "fused",
    "group",
    "nonfinite_report",
    "per_tensor_norms",
    "per_tensor_stats",
    "result_dtype",
    "scale_groups_",
    "torch_backend",
    "total_norm",
    "zero_groups_where_",
    "zero_where_fused",
]
