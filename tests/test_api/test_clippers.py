"""ZClip and AutoClip against float64 re-implementations of the published rules.

The references below are written from the papers' rules and the reference code's
behaviour (bluorion-com/ZClip ``zclip/zclip.py``; AutoClip: ``numpy.percentile`` of the
norm history, then ``torch.nn.utils.clip_grad_norm_``), on Python floats. One documented
extension: a non-finite norm leaves the state alone and gives coefficient 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastgradstats as fgs
from fastgradstats import handoff

EPS = 1e-6
REL = 1e-6


class RefZClip:
    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, max_norm=None,
                 skip_update_on_spike=False):  # fmt: skip
        self.alpha, self.z_thresh, self.warmup = alpha, z_thresh, warmup_steps
        self.mode, self.option, self.factor = mode, clip_option, clip_factor
        self.max_norm, self.skip_on_spike = max_norm, skip_update_on_spike
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def step(self, g: float) -> tuple[float, bool]:
        if not math.isfinite(g):
            return 1.0, False
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            if self.max_norm is None:
                return 1.0, False
            return min(self.max_norm / (g + EPS), 1.0), False
        std = self.var**0.5
        threshold = None
        if self.mode == "percentile":
            if g > self.mean + self.z_thresh * std:
                threshold = self.mean + self.z_thresh * std
        else:
            z = (g - self.mean) / (std + EPS)
            if z > self.z_thresh:
                if self.option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    threshold = (self.mean + self.z_thresh * std / eta) * self.factor
                else:
                    threshold = self.mean
        limit = g if threshold is None else threshold
        if self.max_norm is not None:
            limit = min(limit, self.max_norm)
        coef = limit / (g + EPS) if g > limit else 1.0
        if threshold is not None and self.skip_on_spike:
            return coef, True
        x = g if threshold is None else threshold
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return coef, False


class RefAutoClip:
    def __init__(self, percentile=10.0, history=None):
        self.percentile, self.history = percentile, history
        self.norms: list[float] = []

    def step(self, g: float) -> tuple[float, bool]:
        if not math.isfinite(g):
            return 1.0, False
        self.norms.append(g)
        if self.history is not None:
            self.norms = self.norms[-self.history :]
        clip_value = float(np.percentile(np.array(self.norms), self.percentile))
        return min(clip_value / (g + EPS), 1.0), False


def _sequences() -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    steady = list(1.0 + 0.01 * rng.standard_normal(90))
    rising = list(np.linspace(1.0, 10.0, 90) * (1 + 0.02 * rng.standard_normal(90)))
    spikes = list(1.0 + 0.05 * rng.standard_normal(90))
    for i, factor in ((27, 10.0), (28, 30.0), (45, 4.0), (60, 100.0), (61, 1.3)):
        spikes[i] *= factor
    nan_steps = list(spikes)
    for i, bad in ((3, math.nan), (24, math.inf), (26, math.nan), (40, -math.inf), (61, math.nan)):
        nan_steps[i] = bad
    constant = [2.0] * 30 + [2.0 + 1e-7, 2.0, 5.0, 2.0]  # zero variance: any rise is a spike
    return {"steady": steady, "rising": rising, "spikes": spikes, "nan_steps": nan_steps,
            "constant": constant}  # fmt: skip


SEQUENCES = _sequences()

ZCLIP_CONFIGS = [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile"},
    {"clip_factor": 0.7, "z_thresh": 2.0},
    {"max_norm": 1.5},
    {"max_norm": 0.5, "warmup_steps": 5},
    {"skip_update_on_spike": True},
    {"warmup_steps": 0},
    {"warmup_steps": 1, "alpha": 0.8},
    {"mode": "percentile", "skip_update_on_spike": True, "warmup_steps": 10},
]


def _close(a: float, b: float, rel: float = REL, floor: float = 1e-12) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + floor


@pytest.mark.parametrize("config", ZCLIP_CONFIGS, ids=lambda c: ",".join(map(str, c.items())))
@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_zclip_matches_the_float64_rule(config, sequence):
    ours, ref = fgs.ZClip(**config), RefZClip(**config)
    spikes = 0
    for step, g in enumerate(SEQUENCES[sequence]):
        coef, skip = ours.compute_coef(torch.tensor(g, dtype=torch.float32))
        want_coef, want_skip = ref.step(float(torch.tensor(g, dtype=torch.float32)))
        assert coef.dtype == torch.float32 and coef.dim() == 0 and skip.dtype == torch.bool
        assert _close(float(coef), want_coef), (step, float(coef), want_coef)
        assert bool(skip) == want_skip, step
        spikes += want_coef < 1.0
        state = ours.state_dict()
        if ref.mean is not None:
            assert _close(float(state["mean"]), ref.mean), step
            assert _close(float(state["var"]), ref.var), step
    if sequence in ("spikes", "nan_steps", "constant") and config.get("mode") != "percentile":
        assert spikes > 0  # the sequences do exercise the clipping branch


@pytest.mark.parametrize("window", [3, 4, 5])
@pytest.mark.parametrize("last_warm", [None, 40.0])
def test_zclip_warmup_boundary(window, last_warm):
    """A spike at the first post-warm-up step; or one on the last warm-up step, which is
    taken into the statistics unclipped."""
    seq = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0][:window] + [50.0, 1.0, 50.0]
    if last_warm is not None:
        seq[window - 1] = last_warm
    ours, ref = fgs.ZClip(warmup_steps=window), RefZClip(warmup_steps=window)
    coefs = []
    for g in seq:
        coef, _ = ours.compute_coef(torch.tensor(g, dtype=torch.float64))
        want, _ = ref.step(g)
        assert _close(float(coef), want)
        coefs.append(want)
    assert coefs[:window] == [1.0] * window  # never clipped during warm-up (no max_norm)
    if last_warm is None:
        assert coefs[window] < 1.0


@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("history", [None, 1, 7, 64, 100])
@pytest.mark.parametrize("sequence", ["rising", "spikes", "nan_steps"])
def test_autoclip_matches_numpy_percentile(percentile, history, sequence):
    ours, ref = fgs.AutoClip(percentile, history), RefAutoClip(percentile, history)
    seq = SEQUENCES[sequence] + SEQUENCES["rising"]  # 180 steps: the buffer grows twice
    for step, g in enumerate(seq):
        coef, skip = ours.compute_coef(torch.tensor(g, dtype=torch.float64))
        want, _ = ref.step(g)
        assert _close(float(coef), want), (step, float(coef), want)
        assert not bool(skip)
    state = ours.state_dict()
    assert state["norms"][~torch.isnan(state["norms"])].tolist() == ref.norms
    assert int(state["count"]) == sum(math.isfinite(g) for g in seq)


def test_autoclip_first_steps_and_only_nan():
    clip = fgs.AutoClip(50.0)
    coef, _ = clip.compute_coef(torch.tensor(math.nan))
    assert float(coef) == 1.0 and int(clip.state_dict()["count"]) == 0
    coef, _ = clip.compute_coef(torch.tensor(4.0))  # alone in the history: clips to itself
    assert _close(float(coef), 4.0 / (4.0 + EPS))


def _run(clipper, seq):
    return [float(clipper.compute_coef(torch.tensor(g))[0]) for g in seq]


@pytest.mark.parametrize(
    "make",
    [
        lambda: fgs.ZClip(warmup_steps=10, skip_update_on_spike=True),
        lambda: fgs.ZClip(mode="percentile", max_norm=3.0),
        lambda: fgs.AutoClip(25.0),
        lambda: fgs.AutoClip(60.0, history=16),
    ],
    ids=["zclip", "zclip-percentile", "autoclip", "autoclip-ring"],
)
def test_state_dict_round_trip_continues_identically(make):
    seq = SEQUENCES["nan_steps"]
    first = make()
    _run(first, seq[:50])
    saved = first.state_dict()
    second = make()
    second.load_state_dict(saved)
    assert _run(first, seq[50:]) == _run(second, seq[50:])


@pytest.mark.parametrize("make", [fgs.ZClip, lambda: fgs.AutoClip(history=5)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_step_leaves_the_state_unchanged(make, bad):
    clipper = make()
    _run(clipper, SEQUENCES["spikes"][:40])
    before = clipper.state_dict()
    coef, skip = clipper.compute_coef(torch.tensor(bad))
    after = clipper.state_dict()
    assert float(coef) == 1.0 and not bool(skip)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]) or (
                torch.equal(torch.isnan(value), torch.isnan(after[key]))
                and torch.equal(value.nan_to_num(), after[key].nan_to_num())
            ), key


def test_bad_arguments_name_the_argument():
    for kwargs, name in [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"z_thresh": -1}, "z_thresh"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"mode": "median"}, "mode"),
        ({"clip_option": "clamp"}, "clip_option"),
        ({"clip_factor": 0}, "clip_factor"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": math.nan}, "max_norm"),
    ]:
        with pytest.raises(ValueError, match=name):
            fgs.ZClip(**kwargs)
    with pytest.raises(TypeError, match="skip_update_on_spike"):
        fgs.ZClip(skip_update_on_spike="yes")
    with pytest.raises(ValueError, match="percentile"):
        fgs.AutoClip(percentile=101)
    with pytest.raises(ValueError, match="history"):
        fgs.AutoClip(history=0)
    with pytest.raises(ValueError, match="total_norm"):
        fgs.ZClip().compute_coef(torch.ones(2))
    with pytest.raises(TypeError, match="total_norm"):
        fgs.AutoClip().compute_coef("1.0")
    with pytest.raises(ValueError, match="buffer"):
        fgs.ZClip(warmup_steps=3).load_state_dict(fgs.ZClip(warmup_steps=4).state_dict())


# --- the __call__ path -------------------------------------------------------------------


def _params(scale: float, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n in (1, 7, 13, 1031):
        p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
        p.grad = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def _f64_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params])))


@pytest.mark.parametrize(
    "make,ref",
    [
        (lambda: fgs.ZClip(warmup_steps=5, max_norm=20.0), lambda: RefZClip(warmup_steps=5,
                                                                             max_norm=20.0)),
        (lambda: fgs.AutoClip(30.0), lambda: RefAutoClip(30.0)),
    ],
    ids=["zclip", "autoclip"],
)  # fmt: skip
def test_call_clips_in_place_like_the_rule(make, ref, backend):
    ours, reference = make(), ref()
    scales = [1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 9.0, 1.0, 40.0, 1.1, 0.95]
    for step, scale in enumerate(scales):
        params = _params(scale, seed=step)
        before = [p.grad.double().clone() for p in params]
        g = _f64_norm(params)
        total = ours(params, backend=backend)
        assert total.dtype == torch.float32 and total.dim() == 0
        assert _close(float(total), g, rel=1e-5)
        want, _ = reference.step(float(total))
        for p, b in zip(params, before):
            torch.testing.assert_close(p.grad.double(), b * want, rtol=2e-6, atol=1e-30)


def test_call_hands_off_to_a_fused_optimizer(backend):
    clip = fgs.ZClip(warmup_steps=3)
    ref = RefZClip(warmup_steps=3)
    params = _params(1.0)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    handoff.watch(opt)  # else its first hand-off scales in place
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, fused=True)
    for step, scale in enumerate([1.0, 1.1, 0.9, 1.0, 25.0, 1.0]):
        fresh = _params(scale, seed=step)
        for p, q, f in zip(params, ref_params, fresh):
            p.grad, q.grad = f.grad.clone(), f.grad.clone()
        total = clip(params, opt, backend=backend)
        want, _ = ref.step(float(total))
        assert (handoff.pending_scale(opt) is not None) == (want < 1.0)
        torch._foreach_mul_([q.grad for q in ref_params], want)
        opt.step()
        ref_opt.step()
        assert not hasattr(opt, "grad_scale") and not handoff.pending(opt)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-30)


def test_call_with_no_gradients_changes_nothing():
    clip = fgs.AutoClip()
    assert float(clip([torch.nn.Parameter(torch.zeros(3))])) == 0.0
    assert clip._steps == 0


def test_state_follows_the_device_of_the_norm_and_is_float64():
    clip = fgs.ZClip()
    clip.compute_coef(torch.tensor(1.0, dtype=torch.bfloat16))
    state = clip.state_dict()
    assert state["mean"].dtype == torch.float64 and state["count"].dtype == torch.int64


# --- no host sync --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        fgs.ZClip,
        lambda: fgs.ZClip(mode="percentile", max_norm=1.0, skip_update_on_spike=True),
        lambda: fgs.AutoClip(10.0),
        lambda: fgs.AutoClip(90.0, history=9),
    ],
)
def test_compute_coef_never_reads_the_device(forbid_host_reads, make):
    clipper = make()
    for g in SEQUENCES["nan_steps"][:80]:  # warm-up, spikes, NaN, and AutoClip's growth
        clipper.compute_coef(torch.tensor(g))
    clipper.state_dict()


def test_guard_catches_a_read(forbid_host_reads):
    # The torch backend reads the coefficient of CPU tensors (free there): caught.
    with pytest.raises(AssertionError, match="__bool__"):
        fgs.ZClip(warmup_steps=1)(_params(1.0), backend="torch")


def test_call_never_reads_the_device_on_the_triton_path(forbid_host_reads):
    from tests.conftest import BACKENDS

    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton backend (CUDA or TRITON_INTERPRET=1)")
    for clipper in (fgs.ZClip(warmup_steps=2), fgs.AutoClip()):
        for step in range(4):
            clipper(_params(1.0 + 10 * (step == 3), seed=step), backend="triton")


def test_autoclip_buffer_doubles_on_the_host_step_count():
    unbounded, bounded = fgs.AutoClip(), fgs.AutoClip(history=100)
    capacities = []
    for step in range(1, 300):
        g = torch.tensor(math.nan if step % 3 == 0 else float(step))
        unbounded.compute_coef(g)
        bounded.compute_coef(g)
        capacities.append((unbounded._norms.numel(), bounded._norms.numel()))
    # grows when the number of calls (known on the host) outgrows it, skipped steps included
    assert capacities[63] == (64, 64) and capacities[64] == (128, 100)
    assert capacities[-1] == (512, 100)
    assert int(unbounded.state_dict()["count"]) == sum(s % 3 != 0 for s in range(1, 300))
