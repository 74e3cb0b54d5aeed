"""Checks of the monitor's constructor arguments (beyond the shared ``inputs.check_*``)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .. import inputs


def check_max_norm(max_norm: Any) -> float | None:
    """``inputs.check_max_norm``, with ``None`` and ``0`` meaning "no clipping"."""
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
    """``value`` when it is an int >= 1, else a ``ValueError`` naming ``arg_name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg_name} must be a positive int, got {value!r}")
    return value


def positive_float(value: Any, arg_name: str) -> float:
    """``float(value)`` when finite and > 0; ``TypeError``/``ValueError`` naming ``arg_name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg_name} must be a number, got {value!r}") from None
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{arg_name} must be a finite number > 0, got {value!r}")
    return number


def check_spike_beta(spike_beta: Any) -> float:
    """``float(spike_beta)`` when in (0, 1), else a ``ValueError``."""
    if not 0.0 < float(spike_beta) < 1.0:
        raise ValueError(f"spike_beta must be in (0, 1), got {spike_beta!r}")
    return float(spike_beta)


def check_spike_warmup(spike_warmup: Any) -> int:
    """``spike_warmup`` when it is an int >= 0, else a ``ValueError``."""
    if isinstance(spike_warmup, bool) or not isinstance(spike_warmup, int) or spike_warmup < 0:
        raise ValueError(f"spike_warmup must be a non-negative int, got {spike_warmup!r}")
    return spike_warmup


def histogram_targets(
    pairs: list[tuple[str, Tensor]], histograms: bool, dtypes: Any
) -> list[torch.dtype]:
    """The formats the precision report judges against (``histogram_dtypes``); with
    ``histograms`` also checks that every parameter's dtype can be binned."""
    from ..histogram import SUPPORTED_DTYPES
    from ..precision import float_format

    if histograms:
        for name, p in pairs:
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"histograms=True: parameter {name!r} has dtype {p.dtype}; histograms "
                    "support float32, bfloat16, float16 and float64"
                )
    if dtypes is not None:
        targets = [dtypes] if isinstance(dtypes, (torch.dtype, str)) else list(dtypes)
        return [float_format(d).dtype for d in targets]  # ValueError names the argument
    own = [d for d in (torch.float16, torch.bfloat16) if any(p.dtype == d for _, p in pairs)]
    return own or [torch.float16, torch.float8_e4m3fn]


def check_in_backward(in_backward: Any, model: Any, histograms: Any) -> None:
    """``in_backward=True`` needs an ``nn.Module`` (its hooks) and no histograms (not
    binned during backward yet)."""
    if not isinstance(in_backward, bool):
        raise TypeError(f"in_backward must be a bool, got {in_backward!r}")
    if not in_backward:
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "in_backward=True needs the model (an nn.Module): the statistics are measured "
            f"by hooks on its parameters during backward; got {type(model).__name__}"
        )
    if histograms:
        raise ValueError(
            "in_backward=True does not bin histograms during backward yet; use "
            "histograms=True without in_backward (one read after backward)"
        )


__all__ = [
    "check_in_backward",
    "check_max_norm",
    "check_spike_beta",
    "check_spike_warmup",
    "histogram_targets",
    "positive_float",
    "positive_int",
]
