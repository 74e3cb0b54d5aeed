"""The one place that picks a backend: keyword over environment over auto."""

from __future__ import annotations

import pytest
import torch

from fastgradstats import dispatch, torch_backend

CPU = torch.device("cpu")


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    assert dispatch.requested_backend("torch") == "torch"
    assert dispatch.requested_backend(None) == "triton"
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    assert dispatch.requested_backend(None) == "auto"
    assert dispatch.requested_backend(" Torch ") == "torch"


def test_auto_uses_torch_for_cpu_tensors_even_with_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.backend_for(CPU, torch.float32, 2.0, "auto") is torch_backend


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.backend_for(CPU, torch.float32, 2.0, "triton")
    # and auto quietly stays on torch
    assert dispatch.backend_for(CPU, torch.float32, 2.0, "auto") is torch_backend


def test_unusable_triton_is_reported_or_avoided(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_triton_backend", "ImportError: no triton here")
    assert not dispatch.triton_available()
    with pytest.raises(RuntimeError, match="no triton here"):
        dispatch.backend_for(CPU, torch.float32, 2.0, "triton")
    assert dispatch.backend_for(torch.device("cuda"), torch.float32, 2.0, "auto") is torch_backend


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not importable")
def test_triton_requested_routes_unsupported_cases_to_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fastgradstats import triton_backend

    assert dispatch.backend_for(CPU, torch.float32, 2.0, "triton") is triton_backend
    assert dispatch.backend_for(CPU, torch.float32, 3.0, "triton") is torch_backend
    assert dispatch.backend_for(CPU, torch.float64, 2.0, "triton") is torch_backend


@pytest.mark.parametrize("bad", ["cuda", "", 3])
def test_bad_backend_names(bad):
    with pytest.raises(ValueError, match="backend"):
        dispatch.requested_backend(bad)
