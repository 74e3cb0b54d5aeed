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


def total_key(monitor: Any) -> str:
    """The monitor's key of the total norm (``monitor.total_key`` where the monitor has it)."""
    return getattr(monitor, "total_key", "grad_norm/total")
