"""The environment switches fastgradstats reads, in one place (README: "Environment switches").

Kept apart from :mod:`fastgradstats.dispatch` so that the Triton backend, which dispatch
imports lazily, can read them without importing dispatch back.
"""

from __future__ import annotations

import os

ENV_BACKEND = "FASTGRADSTATS_BACKEND"  # "auto" (default), "torch" or "triton"


def requested_backend_name() -> str:
    """``$FASTGRADSTATS_BACKEND`` as set (``"auto"`` when unset); dispatch validates it."""
    return os.environ.get(ENV_BACKEND, "auto")


def triton_interpreter_on() -> bool:
    """True when Triton kernels are to be run by the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = ["ENV_BACKEND", "requested_backend_name", "triton_interpreter_on"]
