"""The clip coefficient handed to fused optimizers (``clip_grad_norm_(..., optimizer=)``).

Every parity test runs the same gradients through torch (``torch.nn.utils.clip_grad_norm_``
+ ``step()``) and through the hand-off, with the same fused optimizer class, and compares
parameters, optimizer state and gradients after each step. Tolerances (relative L2 over
all tensors of a kind): fp32 1e-6 (measured <= 1e-7: ``g / (1/c)`` against ``g * c``);
bf16 2e-2 (measured ~1e-2: torch rounds the per-tensor norms and the clipped gradient to
bf16 before the update, the fused kernel updates with the unrounded fp32 quotient).

Fused SGD is tested in fp32 only: torch 2.13's fused CPU SGD skips the vectorized part of
16-bit updates (pytorch/pytorch#191763), with or without a hand-off.
"""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

import fastgradstats as fgs
from fastgradstats import handoff

SIZES = [1, 7, 13, 127, 1031]
STEPS = 50


def _rel(xs, ys) -> float:
    a = torch.cat([x.detach().double().flatten() for x in xs])
    b = torch.cat([y.detach().double().flatten() for y in ys])
    ref = torch.linalg.vector_norm(a)
    return float(torch.linalg.vector_norm(a - b) / ref) if ref > 0 else float((a - b).abs().max())


def _make(opt_cls, kwargs, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    opt_ours = opt_cls(ours, fused=True, **kwargs)
    handoff.watch(opt_ours)  # else the first hand-off scales in place (see handoff.watch)
    return ref, opt_cls(ref, fused=True, **kwargs), ours, opt_ours


def _new_grads(ref, ours, gen, step, dtype):
    for a, b in zip(ref, ours):
        g = (torch.randn(a.shape, generator=gen) * (1 + 3 * (step % 5))).to(dtype)
        a.grad = g.clone()
        b.grad = g.clone()


def _compare(ref, opt_ref, ours, opt_ours, tol, grads=True):
    errors = {"params": _rel(ref, ours)}
    if grads:
        errors["grads"] = _rel([p.grad for p in ref], [p.grad for p in ours])
    for key, value in opt_ref.state[ref[0]].items():
        if torch.is_tensor(value) and key != "step":
            errors[key] = _rel([opt_ref.state[p][key] for p in ref],
                               [opt_ours.state[p][key] for p in ours])  # fmt: skip
    steps_ref = [opt_ref.state[p].get("step") for p in ref]
    steps_ours = [opt_ours.state[p].get("step") for p in ours]
    for a, b in zip(steps_ref, steps_ours):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, bad


OPTIMIZERS = [
    pytest.param(torch.optim.Adam, {"lr": 1e-2}, id="Adam"),
    pytest.param(torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, id="AdamW"),
    pytest.param(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, id="SGD"),
]
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clipping", ["on", "off"])
def test_fifty_steps_match_torch_clip_then_step(opt_cls, kwargs, dtype, clipping, backend):
    if opt_cls is torch.optim.SGD and dtype != torch.float32:
        pytest.skip("torch 2.13 fused CPU SGD is broken for 16-bit params (#191763)")
    max_norm = 1.0 if clipping == "on" else 1e9
    ref, opt_ref, ours, opt_ours = _make(opt_cls, kwargs, dtype)
    gen = torch.Generator().manual_seed(1)
    handed = 0
    for step in range(STEPS):
        _new_grads(ref, ours, gen, step, dtype)
        before = [p.grad.clone() for p in ours]
        want = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt_ref.step()
        got = fgs.clip_grad_norm_(ours, max_norm, optimizer=opt_ours, backend=backend)
        # The hand-off leaves the gradients alone until step(); the optimizer divides them.
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, before))
        handed += handoff.pending_scale(opt_ours) is not None
        opt_ours.step()
        assert not hasattr(opt_ours, "grad_scale") and not hasattr(opt_ours, "found_inf")
        assert not handoff.pending(opt_ours)
        assert math.isclose(float(got), float(want), rel_tol=TOL[dtype])
        _compare(ref, opt_ref, ours, opt_ours, TOL[dtype])
    # On the CPU nothing is handed over when there is nothing to clip (reading the
    # coefficient is free there, and grad_scale = 1 would rewrite every gradient).
    assert handed == (STEPS if clipping == "on" else 0)


def test_coefficient_is_float32_reciprocal_on_the_grads_device():
    params = [torch.nn.Parameter(torch.zeros(5)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((5,), 3.0)
    opt = torch.optim.Adam(params, fused=True)
    handoff.watch(opt)
    total = fgs.clip_grad_norm_(params, 1.0, optimizer=opt)
    scale = handoff.pending_scale(opt)
    assert not hasattr(opt, "grad_scale")  # put on the optimizer only during step()
    assert scale.dtype == torch.float32 and scale.dim() == 0 and scale.device == params[0].device
    coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    assert torch.equal(scale, torch.reciprocal(coef))
    handoff.cancel_(opt)
    assert not hasattr(opt, "grad_scale") and not handoff.pending(opt)


def _fp32_params(n=3, value=2.0):
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(n)]
    for p in params:
        p.grad = torch.full((4,), value)
    return params


@pytest.mark.parametrize(
    "case",
    ["not_fused", "foreach", "subset", "superset", "float64", "one_group_unfused", "none"],
)
def test_falls_back_to_scaling(case):
    params = _fp32_params()
    clipped = params
    if case == "not_fused":
        opt = torch.optim.Adam(params)
    elif case == "foreach":
        opt = torch.optim.AdamW(params, foreach=True)
    elif case == "subset":  # the optimizer would divide a gradient we did not clip
        opt = torch.optim.Adam(params, fused=True)
        handoff.watch(opt)
        clipped = params[:2]
    elif case == "superset":  # a clipped gradient the optimizer would not divide
        opt = torch.optim.Adam(params[:2], fused=True)
        handoff.watch(opt)
    elif case == "float64":
        params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)) for _ in range(2)]
        for p in params:
            p.grad = torch.full((4,), 2.0, dtype=torch.float64)
        clipped = params
        opt = torch.optim.Adam(params, fused=True)
        handoff.watch(opt)
    elif case == "one_group_unfused":
        opt = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], fused=True)
        handoff.watch(opt)
        opt.param_groups[1]["fused"] = False
    else:
        opt = None
    expected = []
    for g in [p.grad.clone() for p in clipped]:
        q = torch.nn.Parameter(g.clone())
        q.grad = g.clone()
        expected.append(q)
    torch.nn.utils.clip_grad_norm_(expected, 1.0)
    fgs.clip_grad_norm_(clipped, 1.0, optimizer=opt)
    assert opt is None or not hasattr(opt, "grad_scale")
    for p, e in zip(clipped, expected):
        assert torch.equal(p.grad, e.grad)


def test_grads_none_in_the_optimizer_do_not_block_the_hand_off():
    params = _fp32_params(3)
    params[2].grad = None
    opt = torch.optim.Adam(params, fused=True)
    handoff.watch(opt)
    fgs.clip_grad_norm_(params, 1.0, optimizer=opt)
    assert handoff.pending_scale(opt) is not None
    opt.step()
    assert not hasattr(opt, "grad_scale")


def test_clipped_twice_before_a_step_raises_and_changes_nothing():
    params = _fp32_params()
    opt = torch.optim.AdamW(params, fused=True)
    handoff.watch(opt)
    fgs.clip_grad_norm_(params, 1.0, optimizer=opt)
    scale = handoff.pending_scale(opt)
    grads = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"twice before optimizer\.step"):
        fgs.clip_grad_norm_(params, 0.5, optimizer=opt)
    assert handoff.pending_scale(opt) is scale
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    opt.step()  # the first clip is still applied, then cleaned up
    assert not hasattr(opt, "grad_scale")
    for p in params:
        p.grad = torch.full((4,), 2.0)
    fgs.clip_grad_norm_(params, 1.0, optimizer=opt)  # a new step may clip again
    opt.step()


def test_stale_hand_off_is_dropped_when_grads_are_replaced():
    params = _fp32_params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.Adam(params, fused=True, lr=0.1)
    handoff.watch(opt)
    opt_ref = torch.optim.Adam(ref, fused=True, lr=0.1)
    fgs.clip_grad_norm_(params, 1.0, optimizer=opt)  # ...and then no step()
    opt.zero_grad()
    for p, q in zip(params, ref):
        p.grad = torch.full((4,), 0.25)
        q.grad = torch.full((4,), 0.25)
    with pytest.warns(RuntimeWarning, match="dropped, never applied"):
        opt.step()
    opt_ref.step()
    assert not hasattr(opt, "grad_scale")
    assert all(torch.equal(p, q) for p, q in zip(params, ref))
    # A stale hand-off met by the next clip is replaced silently.
    fgs.clip_grad_norm_(params, 1.0, optimizer=opt)
    for p in params:
        p.grad = torch.full((4,), 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = fgs.clip_grad_norm_(params, 1.0, optimizer=opt)
    want = torch.reciprocal(torch.clamp(1 / (total + 1e-6), max=1))
    assert torch.equal(handoff.pending_scale(opt), want)
    opt.step()
    assert not hasattr(opt, "grad_scale")


def test_composes_with_a_grad_scale_already_set_and_restores_it():
    params = _fp32_params()
    opt = torch.optim.Adam(params, fused=True)
    handoff.watch(opt)
    mine = torch.tensor(8.0)
    opt.grad_scale = mine
    total = fgs.clip_grad_norm_(params, 1.0, optimizer=opt)
    coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    seen = []
    handle = opt.register_step_pre_hook(lambda o, a, k: seen.append(o.grad_scale))
    opt.step()  # our pre-hook runs first: the user's hook sees the composed scale
    handle.remove()
    assert torch.allclose(seen[0], 8.0 / coef, rtol=1e-7)
    assert opt.grad_scale is mine  # put back as it was: its owner removes it


def _scaler_run(use_fgs: bool, unscale_first: bool, steps: int = 8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    handoff.watch(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    scales, handed = [], 0
    for step in range(steps):
        x = torch.randn(32, 13, generator=gen) * (1 + step)
        loss = model(x).pow(2).mean()
        if step == 3:
            loss = loss * 1e36  # overflows once scaled: the scaler must skip this step
        opt.zero_grad()
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
        if use_fgs:
            fgs.clip_grad_norm_(model.parameters(), 0.5, optimizer=opt)
            handed += handoff.pending_scale(opt) is not None
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        assert not handoff.pending(opt)
        scales.append(scaler.get_scale())
    return model, opt, scales, handed


@pytest.mark.parametrize("unscale_first", [True, False], ids=["unscale_", "scaled"])
def test_grad_scaler_composes_and_cleans_up(unscale_first):
    ref_model, ref_opt, ref_scales, _ = _scaler_run(False, unscale_first)
    model, opt, scales, handed = _scaler_run(True, unscale_first)
    assert handed >= 7  # the overflow step hands over NaN/inf too; the scaler skips it
    assert scales == ref_scales and scales[3] < scales[2]  # the overflow step backed off
    ref, ours = list(ref_model.parameters()), list(model.parameters())
    _compare(ref, ref_opt, ours, opt, 1e-6, grads=False)


def test_nan_step_under_skip_leaves_params_and_state(backend):
    """What GradMonitor(skip_nonfinite=True) does with a fused optimizer: found_inf."""
    ref, opt_ref, ours, opt_ours = _make(torch.optim.AdamW, {"lr": 1e-2}, torch.float32)
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        _new_grads(ref, ours, gen, step, torch.float32)
        if step == 5:
            ref[2].grad[3] = float("nan")
            ours[2].grad[3] = float("nan")
        total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.found_inf = (~torch.isfinite(total)).float()
        opt_ref.step()
        del opt_ref.found_inf
        total = fgs.clip_grad_norm_(ours, 1.0, optimizer=opt_ours, backend=backend)
        assert handoff.set_found_inf_(opt_ours, ~torch.isfinite(total))
        before = [p.detach().clone() for p in ours]
        opt_ours.step()
        assert not hasattr(opt_ours, "grad_scale") and not hasattr(opt_ours, "found_inf")
        if step == 5:
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
        # On the skipped step torch's clip left NaN in every grad; ours are untouched.
        _compare(ref, opt_ref, ours, opt_ours, 1e-6, grads=step != 5)


def test_set_found_inf_composes_with_maximum():
    params = _fp32_params()
    opt = torch.optim.Adam(params, fused=True)
    handoff.watch(opt)
    assert not handoff.set_found_inf_(torch.optim.Adam(_fp32_params()), torch.tensor(True))
    opt.found_inf = torch.tensor(1.0)
    handoff.set_found_inf_(opt, torch.tensor(False))
    assert float(opt.found_inf) == 1.0
    opt.step()
    assert float(opt.found_inf) == 1.0  # the earlier owner's flag is back, for it to remove
    del opt.found_inf
    assert not handoff.set_found_inf_(None, torch.tensor(True))


def test_hand_off_path_never_reads_the_device(forbid_host_reads, monkeypatch):
    params = _fp32_params()
    opt = torch.optim.AdamW(params, fused=True)
    handoff.watch(opt)
    # The one deliberate read is the CPU-only "nothing to clip" shortcut (free on the host,
    # never taken for CUDA tensors): without it the path must not read anything.
    with pytest.raises(AssertionError, match="__bool__"):
        fgs.clip_grad_norm_(params, 1.0, optimizer=opt, backend="torch")
    handoff.cancel_(opt)
    monkeypatch.setattr(handoff, "_nothing_to_clip_on_host", lambda coef: False)
    fgs.clip_grad_norm_(params, 1.0, optimizer=opt, backend="torch")
    handoff.set_found_inf_(opt, torch.tensor(False))
    opt.step()
    assert not hasattr(opt, "grad_scale")


@pytest.mark.slow
def test_clip_step_benchmark_row_quick():
    """The "clip + optimizer step" benchmark row: well formed, and its check passes."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import ops, suite

    settings = suite.Settings(device=torch.device("cpu"), quick=True, budget_s=0.01)
    row = suite.run_clip_step("gpt2-124m-fp32", settings)
    assert row["op"] == "clip_step" and row["tensors"] == 148 and row["rounds"] >= 3
    assert set(row["times"]) == set(ops.CLIP_STEP_IMPLS)
    assert row["check"]["ok"] and row["check"]["handoff_used"], row["check"]
    assert all(v > 0 and math.isfinite(v) for v in row["ratios"].values())
    assert row["target"]["ratio"] == "handoff/fgs_clip_step"
    assert set(row["noclip"]["times"]) == set(ops.CLIP_STEP_IMPLS)
    assert row["noclip"]["max_norm"] > row["max_norm"]
    assert "clip + optimizer step" in "\n".join(suite.format_clip_step([row]))
