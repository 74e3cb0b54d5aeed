"""GradMonitor's clipping entry points of issue 11: the coefficient handed to a fused
optimizer (``optimizer=``), and adaptive clippers as ``max_norm`` (ZClip, AutoClip)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from monitor_helpers import tiny_model

import fastgradstats as fgs
from fastgradstats import GradMonitor, handoff

STEPS = 24
SPIKES = (9, 17)  # steps whose gradients are 40x larger


def _grads(step: int, model: torch.nn.Module, gen: torch.Generator) -> list[torch.Tensor]:
    scale = 40.0 if step in SPIKES else 1.0
    return [torch.randn(p.shape, generator=gen) * scale for p in model.parameters()]


def _set(model: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def _assert_params_close(a: torch.nn.Module, b: torch.nn.Module, rtol: float) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=1e-7)


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
@pytest.mark.parametrize("opt_name", ["Adam", "AdamW", "SGD"])
def test_monitor_hands_the_coefficient_to_a_fused_optimizer(backend, opt_name):
    model = tiny_model(seed=3)
    twin = copy.deepcopy(model)
    make = getattr(torch.optim, opt_name)
    kwargs = {"momentum": 0.9} if opt_name == "SGD" else {}
    opt = make(model.parameters(), lr=1e-2, fused=True, **kwargs)
    twin_opt = make(twin.parameters(), lr=1e-2, fused=True, **kwargs)
    monitor = GradMonitor(model, max_norm=2.0, optimizer=opt)
    gen = torch.Generator().manual_seed(3)
    handed = 0
    for step in range(STEPS):
        grads = _grads(step, model, gen)
        _set(model, grads)
        _set(twin, grads)
        monitor.step()
        handed += handoff.pending_scale(opt) is not None  # put on opt only inside step()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 2.0)
        opt.step()
        twin_opt.step()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        for p, q in zip(model.parameters(), twin.parameters()):  # clipped after the step
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    _assert_params_close(model, twin, rtol=1e-5)
    assert handed >= len(SPIKES)  # clipped steps went through grad_scale, not a scale pass
    coefs = monitor.history().clip_coef
    assert (coefs < 1).sum() >= len(SPIKES)


def test_hand_off_false_scales_in_the_monitor(backend):
    model = tiny_model(seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    monitor = GradMonitor(model, max_norm=0.5, optimizer=opt, hand_off=False)
    gen = torch.Generator().manual_seed(4)
    _set(model, _grads(SPIKES[0], model, gen))
    monitor.step()
    assert handoff.pending_scale(opt) is None and not hasattr(opt, "grad_scale")
    total = fgs.get_total_norm([p.grad for p in model.parameters()])
    assert float(total) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
@pytest.mark.parametrize(
    "make_clipper",
    [lambda: fgs.ZClip(warmup_steps=5), lambda: fgs.AutoClip(percentile=25.0, history=10)],
    ids=["zclip", "autoclip"],
)
def test_monitor_with_an_adaptive_clipper_equals_the_clipper_alone(backend, make_clipper):
    model = tiny_model(seed=5)
    twin = copy.deepcopy(model)
    ours, theirs = make_clipper(), make_clipper()
    monitor = GradMonitor(model, max_norm=ours)
    gen = torch.Generator().manual_seed(5)
    for step in range(STEPS):
        grads = _grads(step, model, gen)
        _set(model, grads)
        _set(twin, grads)
        total = monitor.step()
        twin_total = theirs(twin.parameters())
        torch.testing.assert_close(total, twin_total, rtol=1e-6, atol=0)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    hist = monitor.history()
    assert hist.clip_coef[list(SPIKES)].max() < 0.5  # both spikes clipped hard
    for key, value in ours.state_dict().items():
        other = theirs.state_dict()[key]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, other, rtol=1e-6, atol=0)
        else:
            assert value == other


def test_adaptive_clipper_with_skip_nonfinite_leaves_state_and_update_alone(backend):
    model = tiny_model(seed=6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    clipper = fgs.ZClip(warmup_steps=3)
    monitor = GradMonitor(model, max_norm=clipper, skip_nonfinite=True, optimizer=opt)
    gen = torch.Generator().manual_seed(6)
    for step in range(6):
        _set(model, _grads(step, model, gen))
        monitor.step()
        opt.step()
    state = copy.deepcopy(clipper.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    grads = _grads(0, model, gen)
    grads[0][0, 0] = math.nan
    _set(model, grads)
    monitor.step()
    opt.step()  # skipped on the device through found_inf
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    for key, value in clipper.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    assert monitor.history().skipped[-1]


def test_monitor_with_an_adaptive_clipper_never_syncs_on_meta_device():
    """On the meta device any read of a value raises, so clean steps prove no sync."""
    model = tiny_model(sizes=(4, 6, 6, 3)).to("meta")
    for clipper in (fgs.ZClip(warmup_steps=2), fgs.AutoClip(10.0)):
        monitor = GradMonitor(
            model, max_norm=clipper, history=3, skip_nonfinite=True, backend="torch"
        )  # Triton cannot run on meta tensors
        for _ in range(6):
            for p in model.parameters():
                p.grad = torch.empty_like(p)
            total = monitor.step()
            assert total.device.type == "meta"
        assert monitor.last_stats.clip_coef.device.type == "meta"


def test_monitor_clipping_step_makes_no_host_read(forbid_host_reads, monkeypatch):
    """On the Triton path the fused-optimizer step reads nothing back (the hand-off's
    CPU-only "nothing to clip" shortcut is turned off, as it is for CUDA tensors; the torch
    backend reads CPU values for free, which the meta-device test covers)."""
    from conftest import BACKENDS

    from fastgradstats import handoff

    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton backend (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setattr(handoff, "_nothing_to_clip_on_host", lambda coef: False)
    model = tiny_model(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    monitor = GradMonitor(
        model, max_norm=fgs.ZClip(warmup_steps=2), optimizer=opt, backend="triton"
    )
    gen = torch.Generator().manual_seed(7)
    for step in range(5):
        _set(model, _grads(step, model, gen))
        monitor.step()
        opt.step()
