"""A refused adaptive-clipper call changes nothing (issue 19 item 8).

Every error path of ``ZClip`` / ``AutoClip`` (called directly, or through
``GradMonitor(max_norm=clipper)``) must leave the clipper's ``state_dict()`` and every
gradient bit-identical, so that the retry the error message asks for records the norm
once: the same result as a clipper that never saw the refused call.
"""

from __future__ import annotations

import pytest
import torch

import fastgradstats as fgs
from fastgradstats import GradMonitor, handoff

CLIPPERS = {
    "zclip": lambda: fgs.ZClip(warmup_steps=3, skip_update_on_spike=True),
    "autoclip": lambda: fgs.AutoClip(50.0, history=4),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of the same width: equality of these is bit equality (NaN too)."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert torch.equal(_bits(a[key]), _bits(b[key])), key
        else:
            assert a[key] == b[key], key


def _params(seed: int, scale: float = 1.0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n in (3, 8, 5):
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = torch.randn(n, generator=gen) * scale
        params.append(p)
    return params


def _history(clipper, steps: int) -> None:
    # through compute_coef: the same state as calls, without kernel runs (the interpreter
    # is slow)
    for k in range(steps):
        clipper.compute_coef(torch.tensor(3.0 + 0.3 * (k % 3)))


@pytest.mark.parametrize("make", CLIPPERS.values(), ids=CLIPPERS.keys())
@pytest.mark.parametrize("steps", [1, 5])  # during and after ZClip's warm-up
def test_expanded_gradient_refusal_leaves_state_and_gradients_alone(make, steps, backend):
    clipper, twin = make(), make()
    _history(clipper, steps)
    _history(twin, steps)
    params = _params(7, scale=30.0)  # a spike: clipped once the statistics exist
    wide = torch.nn.Parameter(torch.zeros(4, 3))
    wide.grad = torch.full((1, 3), 2.0).expand(4, 3)  # stride 0: cannot be written in place
    params.append(wide)
    before_state = clipper.state_dict()
    before_grads = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="no gradient was modified"):
        clipper(params, backend=backend)
    _same_state(clipper.state_dict(), before_state)
    for p, g in zip(params, before_grads):
        assert torch.equal(_bits(p.grad), _bits(g))
    # the retry the message asks for: the norm is recorded once, as by a clipper that
    # never saw the refused call
    wide.grad = wide.grad.contiguous()
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    total = clipper(params, backend=backend)
    twin_total = twin(twin_params, backend=backend)
    assert torch.equal(total, twin_total)
    _same_state(clipper.state_dict(), twin.state_dict())
    for p, q in zip(params, twin_params):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("make", CLIPPERS.values(), ids=CLIPPERS.keys())
def test_clipped_twice_before_step_refusal_leaves_the_state_alone(make, backend):
    """A fused optimizer still holding the first coefficient refuses a second clip
    ("called twice"): the second call must not have counted its norm."""
    clipper, twin = make(), make()
    _history(clipper, 5)
    _history(twin, 5)
    params = _params(9, scale=50.0)
    opt = torch.optim.SGD(params, lr=0.1, fused=True)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    twin_opt = torch.optim.SGD(twin_params, lr=0.1, fused=True)
    clipper(params, opt, backend=backend)
    twin(twin_params, twin_opt, backend=backend)
    if not handoff.pending(opt):
        pytest.skip("nothing was handed over (no clip at this step)")
    before_state = clipper.state_dict()
    before_grads = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="called twice"):
        clipper(params, opt, backend=backend)
    _same_state(clipper.state_dict(), before_state)
    for p, g in zip(params, before_grads):
        assert torch.equal(_bits(p.grad), _bits(g))
    opt.step()
    twin_opt.step()
    _same_state(clipper.state_dict(), twin.state_dict())
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_autoclip_refusal_at_the_buffer_growth_does_not_grow_it():
    """The host-side step count and the doubled buffer are state too."""
    clipper = fgs.AutoClip(30.0)
    for k in range(fgs.AutoClip._INITIAL):
        clipper.compute_coef(torch.tensor(1.0 + k))
    params = _params(3)
    wide = torch.nn.Parameter(torch.zeros(2, 2))
    wide.grad = torch.ones(1, 2).expand(2, 2)
    before = clipper.state_dict()
    capacity = clipper._norms.numel()
    with pytest.raises(RuntimeError, match="no gradient was modified"):
        clipper([*params, wide])
    _same_state(clipper.state_dict(), before)
    assert clipper._steps == fgs.AutoClip._INITIAL and clipper._norms.numel() == capacity


@pytest.mark.parametrize("make", CLIPPERS.values(), ids=CLIPPERS.keys())
def test_monitor_with_a_clipper_refusal_leaves_the_clipper_alone(make, backend):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    clipper, twin = make(), make()
    _history(clipper, 5)
    _history(twin, 5)
    monitor = GradMonitor(model, max_norm=clipper, history=8)
    gen = torch.Generator().manual_seed(4)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 40.0
    good = model[1].bias.grad.clone()
    model[1].bias.grad = good[:1].expand(2)  # stride 0
    before_state = clipper.state_dict()
    before_grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no gradient was modified"):
        monitor.step()
    _same_state(clipper.state_dict(), before_state)
    for p, g in zip(model.parameters(), before_grads):
        assert torch.equal(_bits(p.grad), _bits(g))
    model[1].bias.grad = model[1].bias.grad.contiguous()
    monitor.step()
    grads = [p.grad.clone() for p in model.parameters()]
    twin.compute_coef(fgs.get_total_norm([g.contiguous() for g in before_grads]))
    _same_state(clipper.state_dict(), twin.state_dict())
    assert monitor.num_steps == 1  # the refused call was not counted as a step
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.backend_independent  # no gradient op
@pytest.mark.parametrize("key,value", [("mean", torch.zeros(2)), ("var", "x"), ("count", [])])
def test_zclip_load_state_dict_refusal_changes_nothing(key, value):
    """A bad field raises ValueError naming it, before any field is assigned (the buffer
    used to be replaced already when the mean turned out to have the wrong shape)."""
    clipper = fgs.ZClip(warmup_steps=3)
    _history(clipper, 5)
    before = clipper.state_dict()
    other = fgs.ZClip(warmup_steps=3)
    _history(other, 2)
    state = other.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=rf"state\['{key}'\]"):
        clipper.load_state_dict(state)
    _same_state(clipper.state_dict(), before)
