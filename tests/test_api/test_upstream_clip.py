"""torch's own clip tests (the ``clip_grad_*`` tests of pytorch's test/test_nn.py), rewritten
for pytest and run against fastgradstats on both backends.

Same inputs, same checks, torch's default comparison tolerances (``assert_close``). Where a
documented difference of fastgradstats (clip.py module docstring) changes an outcome, the
test says which upstream assertion it relaxes; none of the cases below needs one.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import fastgradstats as fgs

INF = math.inf
NAN = math.nan


def _total(params, norm_type: float) -> torch.Tensor:
    """The upstream reference norm: sum of |g|^p over all elements, then the p-th root."""
    norm_type = float(norm_type)
    grads = [p.grad.detach() for p in params]
    if norm_type == INF:
        return max(g.abs().max() for g in grads)
    return sum(g.abs().pow(norm_type).sum() for g in grads) ** (1.0 / norm_type)


def _uniform_scale(params, originals) -> torch.Tensor:
    """Every element must have been scaled by the same factor; returns that factor."""
    scale = torch.cat([p.grad.div(g).flatten() for p, g in zip(params, originals)])
    torch.testing.assert_close(scale.std(), torch.tensor(0.0))
    return scale[0]


def _set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone().view_as(p)


def _big_grads():
    return torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
def test_clip_grad_norm(backend, norm_type, foreach):
    layer = nn.Linear(10, 10)
    params = list(layer.parameters())
    max_norm = 2

    # clipping needed: the returned norm is the one before, the norm after is max_norm
    grads = _big_grads()
    _set_grads(params, grads)
    before = _total(params, norm_type)
    norm = fgs.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    after = _total(params, norm_type)
    torch.testing.assert_close(norm, before)
    torch.testing.assert_close(after, torch.tensor(float(max_norm)))
    assert after <= before
    _uniform_scale(params, grads)

    # the decomposed API behaves the same
    grads = _big_grads()
    _set_grads(params, grads)
    before = _total(params, norm_type)
    total = fgs.get_total_norm([p.grad for p in params], norm_type=norm_type, foreach=foreach)
    fgs.clip_grads_with_norm_(layer.parameters(), max_norm, total, foreach=foreach)
    after = _total(params, norm_type)
    torch.testing.assert_close(total, before)
    torch.testing.assert_close(after, torch.tensor(float(max_norm)))
    assert after <= before
    _uniform_scale(params, grads)

    # small gradients are left as they are
    grads = torch.rand(10, 10).div(10000), torch.ones(10).div(500)
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    before = _total(params, norm_type)
    norm = fgs.clip_grad_norm_(layer.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    after = _total(params, norm_type)
    torch.testing.assert_close(norm, before)
    torch.testing.assert_close(before, after)
    assert after <= max_norm
    torch.testing.assert_close(_uniform_scale(params, grads), torch.tensor(1.0))

    # a single Tensor is accepted, and clipped like a one-element list
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    g = torch.arange(1.0, 101).view(10, 10)
    p1.grad, p2.grad = g.clone(), g.clone()
    fgs.clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    fgs.clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    torch.testing.assert_close(p1.grad, p2.grad)

    # an exhausted generator warns, with torch's exact message
    exhausted = layer.parameters()
    for _ in exhausted:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fgs.clip_grad_norm_(exhausted, max_norm, norm_type=norm_type, foreach=foreach)
    assert [str(w.message) for w in caught] == [
        "`parameters` is an empty generator, no gradient clipping will occur."
    ]


@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_value(backend, foreach):
    layer = nn.Linear(10, 10)
    clip_value = 2.5
    grad_w = torch.arange(-50.0, 50).view(10, 10).div_(5)
    grad_b = torch.ones(10).mul_(2)
    for grad_list in ([grad_w, grad_b], [grad_w, None]):
        for p, g in zip(layer.parameters(), grad_list):
            p.grad = g.clone().view_as(p) if g is not None else None
        fgs.clip_grad_value_(layer.parameters(), clip_value, foreach=foreach)
        for p in layer.parameters():
            if p.grad is not None:
                assert p.grad.max() <= clip_value
                assert p.grad.min() >= -clip_value

    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    g = torch.arange(-50.0, 50).view(10, 10).div_(5)
    p1.grad, p2.grad = g.clone(), g.clone()
    fgs.clip_grad_value_(p1, clip_value, foreach=foreach)
    fgs.clip_grad_value_([p2], clip_value, foreach=foreach)
    torch.testing.assert_close(p1.grad, p2.grad)


NORMS_POS = [0.1, 1, 2, 3.5, INF]
NORMS_NEG = [-0.1, -1, -2, -3.5]
NORMS_EXCEPT_0 = NORMS_POS + NORMS_NEG
NORMS_ALL = [*NORMS_EXCEPT_0, 0]

# (one_element, finite_prefix_param, scalars, norm types giving a non-finite total,
#  norm types giving a finite total), as upstream:
#   one_element: only element 1 of the float64 gradient is the scalar, the rest 0
#   finite_prefix_param: a parameter whose gradient is 1 comes first
NONFINITE_CASES = [
    # an infinite gradient
    (False, False, [INF, -INF], NORMS_EXCEPT_0, [0]),
    (False, True, [INF, -INF], NORMS_POS, [*NORMS_NEG, 0]),
    (True, False, [INF, -INF], NORMS_POS, [*NORMS_NEG, 0]),
    (True, True, [INF, -INF], NORMS_POS, [*NORMS_NEG, 0]),
    # a NaN gradient
    (False, False, [NAN], NORMS_EXCEPT_0, [0]),
    (False, True, [NAN], NORMS_EXCEPT_0, [0]),
    (True, False, [NAN], NORMS_EXCEPT_0, [0]),
    (True, True, [NAN], NORMS_EXCEPT_0, [0]),
    # a gradient that never gives a non-finite norm
    (False, False, [2e22, -2e22], [], NORMS_ALL),
    (False, True, [2e22, -2e22], [], NORMS_ALL),
    (True, False, [2e22, -2e22], [], NORMS_ALL),
    (True, True, [2e22, -2e22], [], NORMS_ALL),
    # a gradient whose norm overflows for some orders only
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [INF, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, INF, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, INF, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, INF, 1, 0.1, 0]),
]


def _nonfinite_case_params(scalar: float, one_element: bool, prefix: bool) -> list[torch.Tensor]:
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    (param[1] if one_element else param).mul(scalar).sum().backward()
    if not prefix:
        return [param]
    first = torch.ones(1, dtype=torch.float64, requires_grad=True)
    first.mul(1).sum().backward()
    return [first, param]


@pytest.mark.parametrize("case", range(len(NONFINITE_CASES)))
def test_clip_grad_norm_error_if_nonfinite(backend, case):
    one_element, prefix, scalars, norms_nonfinite, norms_finite = NONFINITE_CASES[case]
    runs = [(n, s, True) for n, s in itertools.product(norms_nonfinite, scalars)]
    runs += [(n, s, False) for n, s in itertools.product(norms_finite, scalars)]
    for error_if_nonfinite in (False, True):
        for norm_type, scalar, nonfinite in runs:
            what = f"norm_type={norm_type} scalar={scalar} error_if_nonfinite={error_if_nonfinite}"
            params = _nonfinite_case_params(scalar, one_element, prefix)
            if nonfinite and error_if_nonfinite:
                before = [p.grad.clone() for p in params]
                with pytest.raises(
                    RuntimeError, match=f"The total norm of order {float(norm_type)} for gradients"
                ):
                    fgs.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True)
                # an error leaves the gradients as they were
                torch.testing.assert_close(
                    [p.grad for p in params], before, equal_nan=True, msg=what
                )
                continue
            # beyond upstream: the returned norm and the clipped gradients are torch's
            ref = _nonfinite_case_params(scalar, one_element, prefix)
            want = torch.nn.utils.clip_grad_norm_(ref, 1, norm_type=norm_type)
            got = fgs.clip_grad_norm_(
                params, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
            )
            assert math.isfinite(got) != nonfinite, what
            torch.testing.assert_close(got, want, equal_nan=True, msg=what)
            torch.testing.assert_close(
                [p.grad for p in params], [p.grad for p in ref], equal_nan=True, msg=what
            )


def _device_pairs() -> list[tuple[str, str]]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [("cuda:0", "cuda:1")] if n >= 2 else []


@pytest.mark.skipif(not _device_pairs(), reason="needs two CUDA devices")
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_norm_multi_device(backend, foreach):
    first, second = _device_pairs()[0]

    class TwoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer1 = nn.Linear(10, 10)
            self.layer2 = nn.Linear(10, 10)

    model = TwoLayers()
    model.layer1.to(first)
    model.layer2.to(second)
    ref = TwoLayers().to(first)
    for norm_type in (2.0, INF):
        for p in itertools.chain(model.parameters(), ref.parameters()):
            p.grad = torch.ones_like(p)
        norm = fgs.clip_grad_norm_(model.parameters(), 0.5, norm_type=norm_type, foreach=foreach)
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, norm_type, foreach=foreach)
        torch.testing.assert_close(norm, want)
        for p, pe in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.to(first), pe.grad)
