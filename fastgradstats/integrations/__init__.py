"""Callbacks for training frameworks. Import the submodule you need:

* :mod:`fastgradstats.integrations.lightning` -- ``GradMonitorCallback`` for PyTorch Lightning
  (``pip install 'fastgradstats[lightning]'``);
* :mod:`fastgradstats.integrations.huggingface` -- ``GradMonitorCallback`` and ``attach`` for
  the Hugging Face ``Trainer`` (``pip install 'fastgradstats[hf]'``).

This package imports neither framework itself (``import fastgradstats`` never does): each
submodule imports its framework when it is imported.
"""

from __future__ import annotations

from typing import Any

import torch


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under framework wrappers (Lightning's, accelerate's), or ``None``.

    The monitor sets ``found_inf`` on the optimizer that actually runs the fused step, so it
    must get the innermost one.
    """
    seen = 0
    while optimizer is not None and seen < 8:
        seen += 1
        for attr in ("_optimizer", "optimizer"):
            inner = getattr(optimizer, attr, None)
            if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
                optimizer = inner
                break
        else:
            break
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def is_clipper(max_norm: Any) -> bool:
    """Whether ``max_norm`` is an adaptive clipper (has ``compute_coef``), as GradMonitor
    tells them apart from numbers."""
    return callable(getattr(max_norm, "compute_coef", None))


def check_max_norm_arg(callback: str, max_norm: Any, from_trainer: str) -> None:
    """Refuse, at construction, a ``max_norm`` a callback cannot use later in training.

    Accepted: ``None``, ``from_trainer``, a number (``float()`` works, not a bool), or an
    adaptive clipper. Raises ``ValueError`` (other strings) or ``TypeError`` (other
    objects), naming the callback and the argument.
    """
    if max_norm is None or is_clipper(max_norm):
        return
    if isinstance(max_norm, str) and max_norm == from_trainer:
        return
    expected = f'a number, None, "{from_trainer}" or an adaptive clipper (ZClip, AutoClip)'
    if isinstance(max_norm, str):
        raise ValueError(f"{callback}(max_norm=...) must be {expected}, got {max_norm!r}")
    try:
        ok = not isinstance(max_norm, bool) and isinstance(float(max_norm), float)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(
            f"{callback}(max_norm=...) must be {expected}, got {type(max_norm).__name__}"
        )


def total_key(monitor: Any) -> str:
    """The monitor's key of the total norm (``monitor.total_key`` where the monitor has it)."""
    return getattr(monitor, "total_key", "grad_norm/total")
