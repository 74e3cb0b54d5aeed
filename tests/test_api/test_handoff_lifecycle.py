"""Lifecycle of the optimizer hand-off on every exit path (issue 19, items 1-4).

Each test runs the hand-off (``clip_grad_norm_(..., optimizer=)``, ``GradMonitor``) next to
a plain-torch reference (``torch.nn.utils.clip_grad_norm_`` + ``step()``, same fused
optimizer) and checks, after every clip / step / zero_grad / exception, that nothing the
library set stays on the optimizer (:func:`assert_clean`).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastgradstats as fgs
from fastgradstats import handoff

SIZES = [3, 17, 40]
TOL = 1e-6


def assert_clean(opt: torch.optim.Optimizer) -> None:
    """No attribute of the hand-off left on ``opt``, and nothing waiting for a step."""
    assert not hasattr(opt, "grad_scale"), opt.grad_scale
    assert not hasattr(opt, "found_inf"), opt.found_inf
    assert not handoff.pending(opt)


def _pair(seed: int = 0, opt_cls=torch.optim.AdamW, **kw):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen) for n in SIZES]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    kw.setdefault("lr", 1e-2)
    opt = opt_cls(ours, fused=True, **kw)
    handoff.watch(opt)  # else the first hand-off scales in place (tested below)
    return ref, opt_cls(ref, fused=True, **kw), ours, opt


def _grads(ref, ours, gen, scale=10.0):
    for a, b in zip(ref, ours):
        g = torch.randn(a.shape, generator=gen) * scale
        a.grad = g.clone()
        b.grad = g.clone()


def _assert_same(ref, ours, tol=TOL):
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=tol, atol=tol)


# -- item 1: GradScaler, found without the call stack; every exit path --------------------


@pytest.mark.parametrize("enabled", [False, True], ids=["disabled", "enabled"])
def test_grad_scaler_enabled_or_not_matches_torch_and_cleans_up(backend, enabled):
    ref, opt_ref, ours, opt = _pair()
    scaler_ref = torch.amp.GradScaler("cpu", enabled=enabled, init_scale=1024.0)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled, init_scale=1024.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        target = [torch.randn(n, generator=gen) * 10 for n in SIZES]
        opt_ref.zero_grad()
        scaler_ref.scale(sum((p * t).sum() for p, t in zip(ref, target))).backward()
        scaler_ref.unscale_(opt_ref)
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        scaler_ref.step(opt_ref)
        scaler_ref.update()
        opt.zero_grad()
        scaler.scale(sum((p * t).sum() for p, t in zip(ours, target))).backward()
        scaler.unscale_(opt)
        fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
        assert handoff.pending_scale(opt) is not None
        scaler.step(opt)
        scaler.update()
        assert_clean(opt)
        _assert_same(ref, ours)


@pytest.mark.slow_on_triton
def test_disabled_scaler_nan_step_skips_once_then_updates_resume(backend):
    ref, opt_ref, ours, opt = _pair()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = dict(zip("abc", ours))
    monitor = fgs.GradMonitor(params.items(), max_norm=0.5, skip_nonfinite=True, optimizer=opt)
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        _grads(ref, ours, gen)
        if step == 1:
            ours[1].grad[0] = float("nan")
        else:  # the reference skips the NaN step altogether
            torch.nn.utils.clip_grad_norm_(ref, 0.5)
            opt_ref.step()
        before = [p.detach().clone() for p in ours]
        monitor.step()
        scaler.step(opt)
        scaler.update()
        assert_clean(opt)
        moved = any(not torch.equal(p, b) for p, b in zip(ours, before))
        assert moved == (step != 1), step
        _assert_same(ref, ours)


def test_handoff_inspects_no_call_stack(monkeypatch):
    """The GradScaler is not looked for in the caller's frames (none is needed).

    Only calls made by the library (or through ``inspect``) fail: torch and typing call
    ``sys._getframe`` themselves inside ``opt.step()`` (``record_function`` builds
    ``Optional[...]``, which typing_extensions resolves with a frame when typing's cache
    of such types has evicted it, as it does after enough other tests in one process)."""
    import sys
    import typing

    real = sys._getframe

    def forbidden(depth=0):
        caller = real(1).f_globals.get("__name__", "")
        if caller.startswith("fastgradstats") or caller == "inspect":
            raise AssertionError(f"sys._getframe called from {caller}")
        return real(depth + 1)

    ref, _, ours, opt = _pair()
    _grads(ref, ours, torch.Generator().manual_seed(3))
    fgs.clip_grad_norm_(ours, 0.5, optimizer=opt)
    for clear in getattr(typing, "_cleanups", []):  # as after many other tests: cold caches
        clear()
    with monkeypatch.context() as m:
        m.setattr(sys, "_getframe", forbidden)
        opt.step()
    assert_clean(opt)


def test_exception_between_clip_and_step_leaves_nothing(backend):
    ref, opt_ref, ours, opt = _pair()
    gen = torch.Generator().manual_seed(4)
    _grads(ref, ours, gen)
    with pytest.raises(ZeroDivisionError):
        fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
        _ = 1 / 0  # the user's code fails before step()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    # The loop goes on: zero_grad(), a new backward, clip, step.
    opt.zero_grad()
    _grads(ref, ours, gen)
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    opt_ref.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
        opt.step()
    assert_clean(opt)
    _assert_same(ref, ours)


def test_exception_inside_step_is_cleaned_by_the_next_call(backend):
    ref, opt_ref, ours, opt = _pair()
    gen = torch.Generator().manual_seed(5)
    _grads(ref, ours, gen)
    fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)

    def fail(*args):
        raise KeyError("in step")

    handle = opt.register_step_pre_hook(fail)  # runs after ours: attributes are set
    with pytest.raises(KeyError):
        opt.step()
    handle.remove()
    handoff.cancel_(opt)
    assert_clean(opt)
    # Or the next step cleans up by itself.
    fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
    handle = opt.register_step_pre_hook(fail)
    with pytest.raises(KeyError):
        opt.step()
    handle.remove()
    opt.zero_grad()
    _grads(ref, ours, gen)
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    opt_ref.step()
    fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
    opt.step()
    assert_clean(opt)
    _assert_same(ref, ours)


# -- item 2: stale coefficient after zero_grad(set_to_none=False) + a new backward --------


def _backward_into(params, target):
    """A real backward pass whose gradients accumulate into the existing .grad tensors."""
    loss = sum((p * t).sum() for p, t in zip(params, target))
    loss.backward()


@pytest.mark.parametrize("then", ["step", "clip_then_step"])
def test_zero_grad_keeping_tensors_never_applies_a_stale_coefficient(backend, then):
    ref, opt_ref, ours, opt = _pair()
    gen = torch.Generator().manual_seed(6)
    _grads(ref, ours, gen)
    fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)  # ... and no step()
    assert handoff.pending_scale(opt) is not None
    opt.zero_grad(set_to_none=False)
    objects = [p.grad for p in ours]
    target = [torch.randn(n, generator=gen) for n in SIZES]
    _backward_into(ours, target)
    assert all(p.grad is g for p, g in zip(ours, objects))  # same tensors, new values
    opt_ref.zero_grad()
    _backward_into(ref, target)
    if then == "step":
        opt_ref.step()
        with pytest.warns(RuntimeWarning, match="dropped, never applied"):
            opt.step()
    else:
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        opt_ref.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
            opt.step()
    assert_clean(opt)
    _assert_same(ref, ours)


def test_grads_modified_in_place_after_the_hand_off_drop_the_coefficient(backend):
    """Another clip between ours and step(): our coefficient no longer matches the
    gradients; it is dropped (warning), never multiplied into theirs."""
    ref, opt_ref, ours, opt = _pair()
    _grads(ref, ours, torch.Generator().manual_seed(7))
    fgs.clip_grad_norm_(ours, 5.0, optimizer=opt, backend=backend)
    torch.nn.utils.clip_grad_norm_(ours, 0.5)
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    opt_ref.step()
    with pytest.warns(RuntimeWarning, match="modified in place"):
        opt.step()
    assert_clean(opt)
    _assert_same(ref, ours)


def test_found_inf_survives_an_in_place_clip_but_not_replaced_grads():
    ref, _, ours, opt = _pair()
    _grads(ref, ours, torch.Generator().manual_seed(8))
    before = [p.detach().clone() for p in ours]
    handoff.set_found_inf_(opt, torch.tensor(True))
    torch.nn.utils.clip_grad_norm_(ours, 0.5)  # in place: NaN/Inf would stay where they are
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before))  # skipped
    assert_clean(opt)
    handoff.set_found_inf_(opt, torch.tensor(True))
    for p in ours:
        p.grad = torch.ones_like(p)  # a new backward (set_to_none=True)
    with pytest.warns(RuntimeWarning, match="found_inf"):
        opt.step()
    assert not all(torch.equal(p, b) for p, b in zip(ours, before))
    assert_clean(opt)


def test_found_inf_from_two_calls_on_the_same_grads_takes_the_maximum():
    ref, _, ours, opt = _pair()
    _grads(ref, ours, torch.Generator().manual_seed(9))
    before = [p.detach().clone() for p in ours]
    handoff.set_found_inf_(opt, torch.tensor(True))
    handoff.set_found_inf_(opt, torch.tensor(False))
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, before))
    assert_clean(opt)


# -- item 3: torch.compile ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_clip_with_optimizer_scales_in_place(backend, compile_backend):
    import torch._dynamo

    torch._dynamo.reset()
    ref, opt_ref, ours, opt = _pair()
    gen = torch.Generator().manual_seed(10)

    def clip(params):
        return fgs.clip_grad_norm_(params, 0.5, optimizer=opt)

    compiled = torch.compile(clip, backend=compile_backend, fullgraph=True)
    try:
        for _ in range(3):
            _grads(ref, ours, gen)
            want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
            opt_ref.step()
            got = compiled(ours)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            # scaled in place (nothing waits for the step), as torch's clip leaves them
            torch.testing.assert_close([p.grad for p in ours], [p.grad for p in ref])
            opt.step()
            assert_clean(opt)
            _assert_same(ref, ours)
    finally:
        torch._dynamo.reset()


# -- step(closure): the clip runs inside step(), after the pre-hook (Lightning) ------------


@pytest.mark.parametrize("watched", [True, False], ids=["watched", "first_use"])
def test_clip_inside_step_closure_matches_torch(backend, watched):
    ref, opt_ref, ours, _ = _pair()
    opt = torch.optim.AdamW(ours, fused=True, lr=1e-2)
    if watched:
        handoff.watch(opt)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        target = [torch.randn(n, generator=gen) * 10 for n in SIZES]

        def closure_ref(target=target):
            opt_ref.zero_grad()
            _backward_into(ref, target)
            torch.nn.utils.clip_grad_norm_(ref, 0.5)

        def closure(target=target, step=step):
            opt.zero_grad()
            _backward_into(ours, target)
            fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
            # handed over from the second step on (first use, unwatched: scaled in place)
            assert (handoff.pending_scale(opt) is not None) == (watched or step > 0)

        opt_ref.step(closure_ref)
        opt.step(closure)
        assert_clean(opt)
        _assert_same(ref, ours)


# -- any sequence -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_random_sequences_of_clip_step_zero_grad_backward(backend, seed):
    """Random clip / step / zero_grad / backward sequences against a model of the rules:
    a coefficient applies at the next step() iff its gradients are unchanged since; no
    attribute of ours is on the optimizer between calls."""
    import random

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    ref, opt_ref, ours, opt = _pair(seed)
    _grads(ref, ours, gen)
    coef = None  # the reference's pending coefficient, valid for the current gradients
    ops = ["clip", "step", "backward", "zero_grad_keep", "zero_grad_none", "clip", "step"]
    for _ in range(30):
        op = rng.choice(ops)
        if op == "clip":
            if coef is not None:
                with pytest.raises(RuntimeError, match="twice"):
                    fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
            else:
                total = torch.nn.utils.get_total_norm([p.grad for p in ref])
                coef = torch.clamp(0.5 / (total + 1e-6), max=1.0)
                fgs.clip_grad_norm_(ours, 0.5, optimizer=opt, backend=backend)
        elif op == "step":
            if coef is not None:
                torch._foreach_mul_([p.grad for p in ref], coef)
            coef = None
            opt_ref.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # dropped stale coefficients
                opt.step()
        else:
            if op == "zero_grad_keep":
                opt_ref.zero_grad(set_to_none=False)
                opt.zero_grad(set_to_none=False)
            elif op == "zero_grad_none":
                opt_ref.zero_grad()
                opt.zero_grad()
            target = [torch.randn(n, generator=gen) * 10 for n in SIZES]
            _backward_into(ref, target)
            _backward_into(ours, target)
            coef = None  # new gradient values: a pending coefficient is stale
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf"), op
        _assert_same(ref, ours, tol=1e-5)
    opt.step()
    assert_clean(opt)
