"""Shared fixtures. Decides, before anything imports Triton, how Triton kernels run here.

Without CUDA the Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1), so
their logic is tested on every push; set the variable yourself to override.
``FASTGRADSTATS_BACKEND=torch|triton`` restricts the ``backend`` fixture to one backend.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from wandb_helpers import wandb_run  # noqa: F401 (the W&B offline-run fixture)

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


def pytest_addoption(parser):
    parser.addoption(
        "--routed-only",
        action="store_true",
        help="keep only the tests whose backend comes from the environment: drop those "
        "parametrized by the `backend` fixture (the default pass already ran them on both "
        "backends) and those marked `backend_independent`. CI's FASTGRADSTATS_BACKEND=triton "
        "pass uses it to run what only that pass can catch.",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``slow_on_triton`` tests are ``slow`` in their Triton case; ``--routed-only`` filters."""
    slow = pytest.mark.slow
    for item in items:
        params = getattr(item, "callspec", None)
        on_triton = params is not None and params.params.get("backend") == "triton"
        if on_triton and item.get_closest_marker("slow_on_triton") is not None:
            item.add_marker(slow)
    if not config.getoption("--routed-only"):
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        fixture_backend = params is not None and "backend" in params.params
        independent = item.get_closest_marker("backend_independent") is not None
        (drop if fixture_backend or independent else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per available backend, selected through the environment."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, request.param)
    return request.param


@pytest.fixture
def device() -> str:
    """The device tests put tensors on: CUDA when present, else the CPU."""
    return DEVICE


class HostSyncError(AssertionError):
    """A fastgradstats frame read a tensor's value back to the host (see forbid_host_reads)."""


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Makes fastgradstats code that reads a tensor's value back to the host raise
    :class:`HostSyncError`, and ``torch.cuda.synchronize`` too.

    Only calls made from fastgradstats' own frames count: the interpreter and torch move
    data around on the host themselves, which on a GPU would be device code.
    """

    def guard(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("fastgradstats"):
                raise HostSyncError(f"{caller} called Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    def synchronize(*args, **kwargs):
        raise HostSyncError("torch.cuda.synchronize")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)


@pytest.fixture
def small_kernel_blocks(monkeypatch):
    """Small Triton block sizes (many blocks and tiles from tiny tensors, quick under the
    interpreter) and empty plan and table caches before and after the test."""
    from fastgradstats import kernels, triton_backend
    from fastgradstats.kernels import tables

    monkeypatch.setattr(kernels, "BLOCK", 128)
    monkeypatch.setattr(kernels, "TILE", 32)
    monkeypatch.setattr(kernels, "FINALIZE_CHUNK", 4)
    triton_backend.clear_plans()
    tables.clear_cache()
    yield
    triton_backend.clear_plans()
    tables.clear_cache()
