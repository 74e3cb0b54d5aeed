"""Bad input gets a clear error naming the argument, and leaves every gradient as it was."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_tensors, clone_grads, make_params

import fastgradstats as fgs


@pytest.fixture
def params():
    ps = make_params([7, 13], scale=5.0)
    ps[1].grad[3] = float("nan")
    return ps


def _unchanged(params, original):
    assert_same_tensors(clone_grads(params), original, "a failed call modified gradients")


@pytest.mark.parametrize("max_norm", [-1.0, float("nan"), -math.inf])
def test_bad_max_norm(backend, params, max_norm):
    original = clone_grads(params)
    with pytest.raises(ValueError, match="max_norm"):
        fgs.clip_grad_norm_(params, max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        fgs.clip_grads_with_norm_(params, max_norm, torch.tensor(1.0))
    _unchanged(params, original)


def test_max_norm_of_wrong_type(params):
    original = clone_grads(params)
    with pytest.raises(TypeError, match="max_norm"):
        fgs.clip_grad_norm_(params, "big")
    _unchanged(params, original)


@pytest.mark.parametrize("norm_type", ["fro", "nuc", float("nan"), None])
def test_bad_norm_type(backend, params, norm_type):
    original = clone_grads(params)
    with pytest.raises(ValueError, match="norm_type"):
        fgs.clip_grad_norm_(params, 1.0, norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        fgs.grad_stats(params, norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        fgs.get_total_norm([p.grad for p in params], norm_type)
    _unchanged(params, original)


@pytest.mark.parametrize("clip_value", [-0.5, float("nan")])
def test_bad_clip_value(backend, params, clip_value):
    original = clone_grads(params)
    with pytest.raises(ValueError, match="clip_value"):
        fgs.clip_grad_value_(params, clip_value)
    _unchanged(params, original)


def test_sparse_gradient_is_refused_by_name(backend):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model[0].weight.grad = torch.randn(3, 3)
    model[0].bias.grad = torch.randn(3).to_sparse()
    original = [model[0].weight.grad.clone()]
    for call in (
        lambda: fgs.clip_grad_norm_(model.named_parameters(), 1e-3),
        lambda: fgs.grad_stats(model.named_parameters()),
        lambda: fgs.clip_grad_value_(model.named_parameters(), 1e-3),
    ):
        with pytest.raises(TypeError, match=r"'0\.bias'.*strided"):
            call()
    assert torch.equal(model[0].weight.grad, original[0])


def test_integer_tensor_is_refused(backend):
    good = torch.randn(4)
    with pytest.raises(TypeError, match=r"'1'.*floating point"):
        fgs.get_total_norm([good, torch.arange(4)])


@pytest.mark.parametrize("bad", [3, "abc", object()])
def test_parameters_of_wrong_type(bad):
    with pytest.raises(TypeError, match="parameters"):
        fgs.clip_grad_norm_(bad, 1.0)


def test_list_holding_a_non_tensor():
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        fgs.clip_grad_norm_([torch.nn.Parameter(torch.ones(2)), 5], 1.0)


def test_unknown_backend_names_the_argument(params):
    original = clone_grads(params)
    with pytest.raises(ValueError, match="backend"):
        fgs.clip_grad_norm_(params, 1.0, backend="cuda-magic")
    _unchanged(params, original)


def test_unknown_backend_in_environment(params, monkeypatch):
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTGRADSTATS_BACKEND"):
        fgs.grad_stats(params)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_error_if_nonfinite_names_parameter_and_leaves_grads(backend, bad):
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    model(torch.randn(3, 5)).sum().backward()
    model[1].weight.grad[1, 2] = bad
    params = list(model.parameters())
    original = clone_grads(params)
    kind = "NaN" if math.isnan(bad) else "Inf"
    expected = f"1.weight \\({int(kind == 'NaN')} NaN, {int(kind == 'Inf')} Inf\\)"
    with pytest.raises(RuntimeError, match=expected):
        fgs.clip_grad_norm_(model.named_parameters(), 1e-3, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=expected):
        fgs.clip_grad_norm_(
            model.named_parameters(), 1e-3, error_if_nonfinite=True, return_stats=True
        )
    with pytest.raises(RuntimeError, match="non-finite"):
        fgs.get_total_norm([p.grad for p in params], error_if_nonfinite=True)
    _unchanged(params, original)


def test_error_if_nonfinite_passes_when_finite(backend):
    params = make_params([5, 8])
    total = fgs.clip_grad_norm_(params, 1e9, error_if_nonfinite=True)
    assert math.isfinite(float(total))


def test_overflowing_norm_is_explained(backend):
    # every element is finite, yet the float32 sum of squares overflows to inf
    params = make_params([4])
    params[0].grad.fill_(3e38)
    with pytest.raises(RuntimeError, match="overflowed"):
        fgs.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_foreach_true_on_unsupported_device_raises_like_torch():
    grads = [torch.randn(3, device="meta")]
    with pytest.raises(RuntimeError, match="foreach"):
        torch.nn.utils.get_total_norm(grads, foreach=True)
    with pytest.raises(RuntimeError, match="foreach"):
        fgs.get_total_norm(grads, foreach=True, backend="torch")


_FLOAT8 = [
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
]


@pytest.mark.parametrize("dtype", _FLOAT8, ids=str)
def test_float8_gradient_is_refused_by_name(backend, dtype):
    """Not torch's internal promotion error: a TypeError naming the parameter, before any
    gradient (the float32 one listed first included) is touched."""
    good = torch.nn.Parameter(torch.zeros(7))
    good.grad = torch.randn(7) * 10
    low = torch.nn.Parameter(torch.zeros(5).to(dtype))
    low.grad = (torch.randn(5) * 10).to(dtype)
    named = [("encoder.weight", good), ("head.fp8_weight", low)]
    original = clone_grads([good, low])
    pattern = rf"'head\.fp8_weight'.*{str(dtype).removeprefix('torch.')}"
    for call in (
        lambda: fgs.clip_grad_norm_(named, 1e-3),
        lambda: fgs.clip_grad_norm_(named, 1e-3, return_stats=True),
        lambda: fgs.grad_stats(named),
        lambda: fgs.get_total_norm([(n, p.grad) for n, p in named]),
        lambda: fgs.clip_grads_with_norm_(named, 1e-3, torch.tensor(5.0)),
        lambda: fgs.clip_grad_value_(named, 1e-3),
    ):
        with pytest.raises(TypeError, match=pattern):
            call()
    _unchanged([good, low], original)
    with pytest.raises(TypeError, match=r"'1'.*float8"):  # unnamed: its position
        fgs.get_total_norm([good.grad, low.grad])
