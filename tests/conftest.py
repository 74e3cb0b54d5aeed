"""Shared fixtures. Decides, before anything imports Triton, how Triton kernels run here.

Without CUDA the Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1), so
their logic is tested on every push; set the variable yourself to override.
``FASTGRADSTATS_BACKEND=torch|triton`` restricts the ``backend`` fixture to one backend.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastgradstats import dispatch


def _backends() -> list[str]:
    forced = os.environ.get(dispatch.ENV_BACKEND)
    if forced and forced != "auto":
        return [forced]
    names = ["torch"]
    if dispatch.triton_available() and (
        torch.cuda.is_available() or dispatch.triton_interpreter_on()
    ):
        names.append("triton")
    return names


BACKENDS = _backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per available backend, selected through the environment."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, request.param)
    return request.param


@pytest.fixture
def device() -> str:
    """The device tests put tensors on: CUDA when present, else the CPU."""
    return DEVICE
