"""The one place that decides which backend handles a group of gradients.

Choice, per (device, dtype) group and norm type:

* ``backend="torch"``  -> the pure-PyTorch backend, everywhere.
* ``backend="triton"`` -> the Triton backend for every group it supports (CUDA tensors, or
  CPU tensors when ``TRITON_INTERPRET=1``); groups it does not support (e.g. a norm type
  other than 1, 2, inf) go to torch. Asking for Triton where it cannot run at all (no
  Triton installed, or CPU tensors without the interpreter) is a ``RuntimeError``.
* ``backend="auto"`` (default) -> Triton on CUDA when it imports, torch otherwise.

The keyword wins over the environment variable ``FASTGRADSTATS_BACKEND``, which wins over
``"auto"``. Triton is imported lazily, and only after the decision says it is needed, so a
machine with no GPU and no interpreter never touches it.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import torch_backend
from .env import ENV_BACKEND, requested_backend_name, triton_interpreter_on

BACKENDS = ("auto", "torch", "triton")

# One line for every place that has to say how to get the kernels.
TRITON_INSTALL_HINT = (
    'The Triton kernels need `pip install "fastgradstats[triton]"` (CUDA builds of torch '
    "bring Triton already); without them the PyTorch backend computes the same results."
)


def requested_backend(backend: str | None = None) -> str:
    """The backend name in force: the keyword, else ``$FASTGRADSTATS_BACKEND``, else auto."""
    name = backend if backend is not None else requested_backend_name()
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_BACKEND}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.strip().lower()


# The Triton backend module, or why it failed to import; filled on first need. A plain
# global rather than functools.lru_cache, which torch.compile warns about when tracing.
_triton_backend: ModuleType | str | None = None


def _triton_backend_or_error() -> ModuleType | str:
    global _triton_backend
    if _triton_backend is None:
        try:
            from . import triton_backend

            _triton_backend = triton_backend
        except Exception as exc:  # ImportError, or a broken Triton install
            _triton_backend = f"{type(exc).__name__}: {exc}"
    return _triton_backend


def triton_module() -> ModuleType | None:
    """The Triton backend module, or ``None`` when it does not import here."""
    module = _triton_backend_or_error()
    return None if isinstance(module, str) else module


def triton_available() -> bool:
    """True when the Triton backend imports on this machine."""
    return not isinstance(_triton_backend_or_error(), str)


def _triton_can_run_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_on()


def backend_for(
    device: torch.device, dtype: torch.dtype, norm_type: float, backend: str | None = None
) -> ModuleType:
    """The backend module for one (device, dtype) group of gradients."""
    name = requested_backend(backend)
    if name == "torch":
        return torch_backend
    if name == "auto" and device.type != "cuda":
        return torch_backend
    if not _triton_can_run_on(device):
        if name == "auto":
            return torch_backend
        hint = "" if triton_available() else f" {TRITON_INSTALL_HINT}"
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors: Triton needs CUDA "
            "tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported." + hint
        )
    module = _triton_backend_or_error()
    if isinstance(module, str):
        if name == "auto":
            return torch_backend
        raise RuntimeError(
            f"backend='triton' was requested but Triton is unusable: {module}. "
            f"{TRITON_INSTALL_HINT}"
        )
    if module.supports(device, dtype, norm_type):
        return module
    return torch_backend
