"""The one parser of ``parameters`` and the argument validators every entry point shares.

``parameters`` may be a Tensor, an iterable of Tensors, or ``named_parameters()`` pairs
(generators included); gradients are validated here, before anything is computed or
written, and errors name the argument or the parameter.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .histogram import SUPPORTED_DTYPES as HISTOGRAM_DTYPES


@dataclass
class GradList:
    """Gradients gathered from the user's input, in input order (``None`` grads dropped)."""

    names: list[str]
    params: list[Tensor]  # the tensors whose .grad is in ``grads`` (the grads themselves
    grads: list[Tensor]  # when the caller passed gradients directly)


class NamedTensors(list):
    """``(name, tensor)`` pairs, split into ``names`` and ``tensors`` once.

    For a caller that measures the same parameters every step (the monitor): the fused
    path takes the two lists as they are instead of splitting and type-checking 10k pairs
    per call. Build a new one rather than mutating it (the lists are not kept in sync).
    """

    __slots__ = ("names", "tensors")

    def __init__(self, names: list[str], tensors: list[Tensor]) -> None:
        if len(names) != len(tensors):
            raise ValueError(f"{len(names)} names for {len(tensors)} tensors")
        for index, (name, tensor) in enumerate(zip(names, tensors)):
            if not (isinstance(name, str) and isinstance(tensor, Tensor)):
                raise TypeError(f"item {index} is not a (str, Tensor) pair")
        super().__init__(zip(names, tensors))
        self.names = list(names)
        self.tensors = list(tensors)


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


def as_list(items: Any, arg_name: str = "parameters", warn_empty_generator: bool = False) -> list:
    """``items`` as a list (a list is returned as is), with the checks of :func:`collect`."""
    if type(items) is list or type(items) is NamedTensors:
        return items
    return _materialize(items, arg_name, warn_empty_generator)


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


def check_histogram_input(grads: GradList) -> None:
    """Refuse what ``histogram=True`` cannot do, before anything is computed: complex
    gradients and dtypes other than fp32/bf16/fp16/fp64 raise ``TypeError`` naming the
    parameter."""
    for name, g in zip(grads.names, grads.grads):
        if g.dtype not in HISTOGRAM_DTYPES:
            raise TypeError(
                f"gradient of parameter {name!r} has dtype {g.dtype}; histogram=True "
                "supports float32, bfloat16, float16 and float64 gradients"
            )


def check_histogram_flag(histogram: Any) -> None:
    """Refuse a ``histogram=`` that is not a bool (``TypeError``)."""
    if not isinstance(histogram, bool):
        raise TypeError(f"histogram must be a bool, got {type(histogram).__name__}")


__all__ = [
    "GradList",
    "NamedTensors",
    "as_list",
    "check_grad",
    "check_histogram_flag",
    "check_histogram_input",
    "check_max_norm",
    "check_norm_type",
    "check_writable",
    "collect",
]
