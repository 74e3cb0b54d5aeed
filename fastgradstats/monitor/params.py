"""The monitor's arguments and parameters: which tensors it watches and how it finds them."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .. import inputs


def named_parameters(model: Any) -> list[tuple[str, Tensor]]:
    """Every parameter of ``model`` as ``(name, tensor)``, frozen ones included."""
    if isinstance(model, nn.Module):
        pairs = list(model.named_parameters())
    elif isinstance(model, Tensor):
        pairs = [("0", model)]
    elif isinstance(model, Iterable) and not isinstance(model, (str, bytes)):
        pairs = []
        for index, item in enumerate(model):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                pairs.append(item)
            elif isinstance(item, Tensor):
                pairs.append((str(index), item))
            else:
                raise TypeError(
                    f"model[{index}] must be a Tensor or a (name, Tensor) pair, "
                    f"got {type(item).__name__}"
                )
    else:
        raise TypeError(
            "model must be an nn.Module, a Tensor, or an iterable of Tensors or "
            f"(name, Tensor) pairs; got {type(model).__name__}"
        )
    if not pairs:
        raise ValueError("model has no parameters to monitor")
    lazy = [name for name, p in pairs if is_lazy(p)]
    if lazy:
        listed = ", ".join(repr(n) for n in lazy[:5]) + (" ..." if len(lazy) > 5 else "")
        raise ValueError(
            f"model has uninitialized lazy parameters ({listed}; e.g. nn.LazyLinear before "
            "its first forward pass): run one forward pass (a dummy batch is enough) before "
            "creating the GradMonitor"
        )
    return pairs


def find_owners(model: nn.Module, pairs: list[tuple[str, Tensor]]) -> list[tuple[Any, str]] | None:
    """``(module, attribute)`` holding each parameter, or ``None`` when names don't resolve.

    Checking ``module._parameters[attribute] is param`` costs a dict lookup per parameter
    and no sync, so step() can afford it to notice replaced parameters.
    """
    owners = []
    for name, param in pairs:
        path, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            return None
        if module._parameters.get(leaf) is not param:
            return None
        owners.append((module, leaf))
    return owners


def check_max_norm(max_norm: Any) -> float | None:
    if max_norm is None:
        return None
    value = inputs.check_max_norm(max_norm)
    if value == 0:
        # torch's clip_grad_norm_(max_norm=0) zeroes every gradient, which no monitor user
        # wants; Hugging Face's max_grad_norm=0 means "off". Take the latter, loudly.
        warnings.warn(
            "GradMonitor(max_norm=0) is taken as 'no clipping' (as Hugging Face's "
            "max_grad_norm=0); torch's clip_grad_norm_ with max_norm=0 would zero every "
            "gradient. Pass max_norm=None for no clipping without this warning.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return value


def positive_int(value: Any, arg_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg_name} must be a positive int, got {value!r}")
    return value


def positive_float(value: Any, arg_name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg_name} must be a number, got {value!r}") from None
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{arg_name} must be a finite number > 0, got {value!r}")
    return number


__all__ = ["check_max_norm", "find_owners", "named_parameters", "positive_float", "positive_int"]
