"""torch.compile(fullgraph=True) of the public functions on the default CPU path.

Each case compiles under the ``eager``, ``aot_eager`` and ``inductor`` compile backends, on
both fastgradstats backends (Triton through its custom ops, run by the interpreter), and
compares with the eager call: 0 graph breaks, same results. Sizes stay tiny: inductor
compiles C++ on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from helpers import clone_grads, make_params

import fastgradstats as fgs

# torch.compile and offline sm_90 compiles take minutes on 2 cores: CI runs them
# (pytest -m "slow or distributed"), the README's quick command does not.
pytestmark = pytest.mark.slow

COMPILE_BACKENDS = ["eager", "aot_eager", "inductor"]
SIZES = [7, 13, 0, 1]  # an empty gradient takes the indexed-scatter path of the inf-norm


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # The fastgradstats backend is chosen while tracing (from the environment, which dynamo
    # does not guard on), so a graph cached by a previous test must not be reused.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(planted: bool = False) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1234)
    params = make_params(SIZES, generator=gen, scale=3.0)
    extra = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.bfloat16))
    extra.grad = torch.randn(5, 3, generator=gen).to(torch.bfloat16)  # a second dtype group
    params.append(extra)
    if planted:
        params[1].grad[4] = math.nan
        params[1].grad[9] = -math.inf
        params[4].grad[2, 1] = math.inf
    return params


def _assert_equal(got: torch.Tensor, want: torch.Tensor, compile_backend: str, what="") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    # inductor generates its own reduction loops: allow rounding-order differences there
    rtol = 2e-6 if compile_backend == "inductor" and got.is_floating_point() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=0, equal_nan=True, msg=what)


def _count_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    return explanation.graph_break_count


@pytest.mark.parametrize("compile_backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("clipping", [True, False])
def test_compiled_clip_grad_norm_matches_eager(backend, compile_backend, clipping):
    max_norm = 1.0 if clipping else 1e6

    def clip(params):
        return fgs.clip_grad_norm_(params, max_norm)

    assert _count_breaks(clip, _params()) == 0
    eager_params = _params()
    want_total = clip(eager_params)
    want_grads = clone_grads(eager_params)

    params = _params()
    original = clone_grads(params)
    # The total of a mixed fp32 + bf16 list rounds each bf16 per-tensor norm to bf16, as
    # torch does; inductor fuses that round trip away unless told to emulate it (the
    # documented difference under inductor's default config).
    with torch._inductor.config.patch(emulate_precision_casts=True):
        total = torch.compile(clip, fullgraph=True, backend=compile_backend)(params)
    _assert_equal(total, want_total, compile_backend)
    for got, want, before in zip(clone_grads(params), want_grads, original):
        _assert_equal(got, want, compile_backend)
        if not clipping:  # coefficient 1: written under compile, but with the same bits
            assert torch.equal(got.view(-1).view(torch.uint8), before.view(-1).view(torch.uint8))


@pytest.mark.parametrize("compile_backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_compiled_grad_stats_matches_eager(backend, compile_backend, norm_type):
    def stats(params):
        s = fgs.grad_stats(params, norm_type)
        return s.norms, s.max_abs, s.nan_count, s.inf_count, s.total_norm

    assert _count_breaks(stats, _params(planted=True)) == 0
    want = stats(_params(planted=True))
    got = torch.compile(stats, fullgraph=True, backend=compile_backend)(_params(planted=True))
    for field, g, w in zip(("norms", "max_abs", "nan_count", "inf_count", "total"), got, want):
        _assert_equal(g, w, compile_backend, field)
    # the planted values are counted where they were planted, as in eager mode
    assert got[2].tolist() == [0, 1, 0, 0, 0]
    assert got[3].tolist() == [0, 1, 0, 0, 1]


def test_compiled_return_stats_and_decomposed_clip(backend):
    """The other entry points compile too: return_stats, get_total_norm + clip_grads_with_norm_,
    clip_grad_value_."""

    def step(params):
        total, stats = fgs.clip_grad_norm_(params, 1.0, return_stats=True)
        norm = fgs.get_total_norm([p.grad for p in params], 1.0)
        fgs.clip_grads_with_norm_(params, 0.5, norm)
        fgs.clip_grad_value_(params, 0.05)
        return total, stats.clip_coef, norm

    assert _count_breaks(step, _params()) == 0
    eager_params, params = _params(), _params()
    want = step(eager_params)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(params)
    for g, w in zip(got, want):
        _assert_equal(g, w, "aot_eager")
    for g, w in zip(clone_grads(params), clone_grads(eager_params)):
        _assert_equal(g, w, "aot_eager")


def test_triton_backend_is_traced_as_custom_ops(monkeypatch):
    """Under compile the Triton backend must appear in the graph as its opaque custom ops
    (a traced launch would have broken the graph), not fall back to torch."""
    pytest.importorskip("triton")
    from fastgradstats import dispatch

    if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
        pytest.skip("Triton cannot run here")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    graphs: list[str] = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def step(params):
        return fgs.clip_grad_norm_(params, 1.0), fgs.grad_stats(params).total_norm

    torch.compile(step, fullgraph=True, backend=capture)(_params())
    assert len(graphs) == 1
    assert "fastgradstats.triton_group_stats" in graphs[0]
    assert "fastgradstats.triton_scale_" in graphs[0]


def test_compiled_clip_follows_new_shapes_and_dtypes(backend):
    """A recompile for other gradient sizes (dynamic shapes) must stay graph-break free."""

    def clip(params):
        return fgs.clip_grad_norm_(params, 0.5)

    compiled = torch.compile(clip, fullgraph=True, backend="eager")
    for sizes, dtype in (([7, 13], torch.float32), ([9, 0, 21], torch.float32), ([5, 8], None)):
        gen = torch.Generator().manual_seed(sum(sizes))
        params = make_params(sizes, dtype or torch.bfloat16, generator=gen, scale=2.0)
        eager = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for e, p in zip(eager, params):
            e.grad = p.grad.clone()
        got, want = compiled(params), clip(eager)
        if backend == "triton":
            # Eager Triton reduces the total inside its finalize kernel, the traced custom
            # ops with vector_norm: the same value up to float32 summation order.
            torch.testing.assert_close(got, want, rtol=2e-6, atol=0, msg=str(sizes))
            torch.testing.assert_close(
                clone_grads(params), clone_grads(eager), rtol=4e-6, atol=0, msg=str(sizes)
            )
            continue
        _assert_equal(got, want, "eager", str(sizes))
        for g, w in zip(clone_grads(params), clone_grads(eager)):
            _assert_equal(g, w, "eager", str(sizes))
