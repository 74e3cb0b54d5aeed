"""fgs.backward_stats: statistics measured during backward equal the after-backward path's
(``grad_stats(..., backend="torch")``, ``clip_grad_norm_``), bit for bit on the torch path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_same_stats, assert_same_tensors
from torch.utils.checkpoint import checkpoint

import fastgradstats as fgs
from fastgradstats import backward as bwd
from fastgradstats import dispatch

pytestmark = pytest.mark.backend_independent  # pinned to the torch path (the fixture below)


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """The handle follows dispatch (Triton on CUDA or with FASTGRADSTATS_BACKEND=triton);
    these tests check the torch path, bit for bit against ``backend="torch"``
    (tests/test_backward/test_backward_triton.py checks the Triton path)."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(),
        torch.nn.Linear(12, 3),
    ).to(dtype)  # fmt: skip


def _loss(model, seed=1, dtype=None):
    dtype = dtype or next(model.parameters()).dtype
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return model(x).float().pow(2).sum()


def _reference(model, norm_type=2.0):
    return fgs.grad_stats(model.named_parameters(), norm_type, backend="torch")


class _Counter:
    """Counts the calls of the measurement seam (one per bucket)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = bwd._measure_bucket

        def counted(grads, norm_type):
            self.calls += 1
            return real(grads, norm_type)

        monkeypatch.setattr(bwd, "_measure_bucket", counted)


class _Mixed(torch.nn.Module):
    """float32 and float64 layers: per-tensor results in float64, total promoted."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 3).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).double()).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, "mixed"])
@pytest.mark.parametrize("bucket_bytes", [1, 200, bwd.DEFAULT_BUCKET_BYTES])
def test_plain_model_matches_after_backward(dtype, bucket_bytes):
    model = _Mixed() if dtype == "mixed" else _mlp(dtype)
    twin = copy.deepcopy(model)
    with fgs.backward_stats(model, bucket_bytes=bucket_bytes) as handle:
        _loss(model, dtype=torch.float32 if dtype == "mixed" else None).backward()
        _loss(twin, dtype=torch.float32 if dtype == "mixed" else None).backward()
        expected_stats = _reference(model)
        stats = handle.finalize()
        assert stats.catchup_tensors == 0
        assert_same_stats(stats, expected_stats)
        # clip: the same total, coefficient and clipped gradients as torch's function
        model.zero_grad()
        _loss(model, seed=2, dtype=torch.float32 if dtype == "mixed" else None).backward()
        twin.zero_grad()
        _loss(twin, seed=2, dtype=torch.float32 if dtype == "mixed" else None).backward()
        expected_total = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        total, stats = handle.clip_grad_norm_(0.05)
    assert stats.catchup_tensors == 0 and stats.clip_coef is not None
    assert_same_tensors([total], [expected_total])
    assert_same_tensors([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])


@pytest.mark.parametrize("norm_type", [1.0, float("inf"), 3.0])
def test_other_norm_types(norm_type):
    model = _mlp()
    handle = fgs.backward_stats(model, norm_type, bucket_bytes=300)
    _loss(model).backward()
    assert_same_stats(handle.finalize(), _reference(model, norm_type))
    handle.remove()


def test_clip_matches_fastgradstats_clip_on_the_torch_path():
    model = _mlp()
    twin = copy.deepcopy(model)
    handle = fgs.backward_stats(model, bucket_bytes=256)
    _loss(model).backward()
    _loss(twin).backward()
    expected_total, expected = fgs.clip_grad_norm_(
        twin.named_parameters(), 0.1, return_stats=True, backend="torch"
    )
    total, stats = handle.clip_grad_norm_(0.1)
    assert_same_tensors([total, stats.clip_coef], [expected_total, expected.clip_coef])
    assert_same_stats(stats, expected)
    assert_same_tensors([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])


class _TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 8)
        self.mid = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def test_tied_weights_fire_once_and_match(monkeypatch):
    model = _TiedLM()
    fired = []
    model.embed.weight.register_post_accumulate_grad_hook(lambda p: fired.append(1))
    counter = _Counter(monkeypatch)
    handle = fgs.backward_stats(model, bucket_bytes=1)  # one tensor per bucket
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    model(ids).pow(2).sum().backward()
    assert len(fired) == 1  # the tied weight accumulates both uses, then fires once
    assert counter.calls == handle.num_buckets == 3  # embed.weight listed once
    stats = handle.finalize()
    assert counter.calls == 3 and stats.catchup_tensors == 0
    assert_same_stats(stats, _reference(model))


class _Checkpointed(torch.nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.reentrant = reentrant
        self.a = torch.nn.Linear(6, 10)
        self.b = torch.nn.Linear(10, 10)
        self.c = torch.nn.Linear(10, 10)
        self.d = torch.nn.Linear(10, 3)

    def block(self, x):
        return torch.tanh(self.c(torch.tanh(self.b(x))))

    def forward(self, x):
        h = self.a(x)
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.d(h)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("bucket_bytes", [1, 500, bwd.DEFAULT_BUCKET_BYTES])
def test_activation_checkpointing(reentrant, bucket_bytes):
    model = _Checkpointed(reentrant)
    handle = fgs.backward_stats(model, bucket_bytes=bucket_bytes)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), requires_grad=reentrant)
    model(x).pow(2).sum().backward()
    stats = handle.finalize()
    assert stats.catchup_tensors == 0
    assert_same_stats(stats, _reference(model))
    handle.remove()


class _TwoHeads(torch.nn.Module):
    """``first`` is used only when ``use_first`` (the first micro-step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 8)
        self.first = torch.nn.Linear(8, 3)
        self.second = torch.nn.Linear(8, 3)

    def forward(self, x, use_first):
        h = torch.tanh(self.body(x))
        return self.first(h) if use_first else self.second(h)


@pytest.mark.parametrize("micro_steps", [2, 4])
@pytest.mark.parametrize("bucket_bytes", [1, 100, bwd.DEFAULT_BUCKET_BYTES])
@pytest.mark.parametrize("declare", [False, True])
def test_gradient_accumulation(micro_steps, bucket_bytes, declare):
    model = _TwoHeads()
    handle = fgs.backward_stats(model, bucket_bytes=bucket_bytes)
    for step in range(2):  # two optimizer steps: the second starts from fresh slots
        model.zero_grad(set_to_none=True)
        for micro in range(micro_steps):
            x = torch.randn(3, 6, generator=torch.Generator().manual_seed(10 * step + micro))
            final = micro == micro_steps - 1
            if declare and not final:
                with handle.accumulating():
                    model(x, micro == 0).pow(2).sum().backward()
            else:
                model(x, micro == 0).pow(2).sum().backward()
        stats = handle.finalize()
        assert_same_stats(stats, _reference(model))
        # ``first`` got its gradient in micro-step 0 only: measured then, unchanged since
        # (fresh) unless that micro-step was declared accumulating (then caught up)
        assert stats.catchup_tensors == (2 if declare else 0)


def test_accumulating_skips_the_measurements(monkeypatch):
    model = _mlp()
    counter = _Counter(monkeypatch)
    handle = fgs.backward_stats(model, bucket_bytes=1)
    with handle.accumulating():
        _loss(model, seed=1).backward()
    assert counter.calls == 0
    _loss(model, seed=2).backward()
    assert counter.calls == handle.num_buckets
    stats = handle.finalize()
    assert stats.catchup_tensors == 0
    assert_same_stats(stats, _reference(model))


def _plant(value):
    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[::3] = value
        return grad

    return hook


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_planted(value):
    model = _mlp()
    model[2].weight.register_hook(_plant(value))
    handle = fgs.backward_stats(model, bucket_bytes=300)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    x[0, 1] = value  # and through the input: non-finite in the first layer's gradient
    model(x).pow(2).sum().backward()
    expected = _reference(model)
    assert bool(expected.has_nonfinite)
    assert_same_stats(handle.finalize(), expected)


def test_nonfinite_clip_error_names_the_tensor_and_writes_nothing():
    model = _mlp()
    model[2].weight.register_hook(_plant(float("nan")))
    handle = fgs.backward_stats(model)
    _loss(model).backward()
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"2\.weight"):
        handle.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert_same_tensors([p.grad for p in model.parameters()], before)


@pytest.mark.parametrize(
    "change",
    ["mul_", "zero_", "foreach_mul_", "replace", "torch_clip"],
)
def test_catchup_after_the_user_changes_a_gradient(change, monkeypatch):
    model = _mlp()
    counter = _Counter(monkeypatch)
    handle = fgs.backward_stats(model, bucket_bytes=1)
    _loss(model).backward()
    assert counter.calls == handle.num_buckets
    w = model[2].weight
    if change == "mul_":
        w.grad.mul_(3.0)
    elif change == "zero_":
        w.grad.zero_()
    elif change == "foreach_mul_":
        torch._foreach_mul_([w.grad, model[4].bias.grad], 0.5)
    elif change == "replace":
        w.grad = w.grad * 2.0
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    stats = handle.finalize()
    expected = {"foreach_mul_": 2, "torch_clip": len(stats), "mul_": 1, "zero_": 1, "replace": 1}
    assert stats.catchup_tensors == expected[change]
    assert counter.calls == handle.num_buckets + 1  # one catch-up measurement
    assert_same_stats(stats, _reference(model))


def test_finalize_twice_catches_everything_up():
    model = _mlp()
    handle = fgs.backward_stats(model)
    _loss(model).backward()
    first = handle.finalize()
    assert first.catchup_tensors == 0
    second = handle.finalize()  # no backward since: nothing was measured for this step
    assert second.catchup_tensors == len(second)
    assert_same_stats(second, first)


def test_returned_stats_are_not_overwritten_by_the_next_backward():
    model = _mlp()
    handle = fgs.backward_stats(model)
    _loss(model, seed=1).backward()
    stats = handle.finalize()
    kept = [stats.norms.clone(), stats.max_abs.clone()]
    model.zero_grad()
    _loss(model, seed=2).backward()
    assert_same_tensors([stats.norms, stats.max_abs], kept)
    assert_same_stats(handle.finalize(), _reference(model))


def test_warns_once_when_most_tensors_catch_up():
    model = _mlp()
    handle = fgs.backward_stats(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _loss(model).backward()
            for p in model.parameters():
                p.grad.mul_(0.5)
            handle.finalize()
        assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
        _loss(model).backward()  # a good step resets the count
        handle.finalize()
        for _ in range(5):
            _loss(model).backward()
            for p in model.parameters():
                p.grad.mul_(0.5)
            handle.finalize()
    found = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(found) == 1 and "catch-up" in str(found[0].message)


def test_parameters_without_gradient_stay_out(monkeypatch):
    model = _TwoHeads()
    model.body.bias.requires_grad_(False)  # frozen: no hook, no entry
    counter = _Counter(monkeypatch)
    handle = fgs.backward_stats(model, bucket_bytes=bwd.DEFAULT_BUCKET_BYTES)
    assert handle.num_buckets == 1
    model(torch.randn(3, 6), True).pow(2).sum().backward()  # ``second`` gets no grad
    # the bucket never completes: the end-of-backward callback measures what fired, once
    assert counter.calls == 1
    stats = handle.finalize()
    assert counter.calls == 1 and stats.catchup_tensors == 0
    assert "second.weight" not in stats.names and "body.bias" not in stats.names
    assert_same_stats(stats, _reference(model))


def test_no_gradient_at_all():
    model = _mlp()
    handle = fgs.backward_stats(model)
    stats = handle.finalize()
    assert len(stats) == 0 and float(stats.total_norm) == 0.0
    total, stats = handle.clip_grad_norm_(1.0)
    assert float(total) == 0.0 and len(stats) == 0


def test_one_measurement_per_bucket_and_none_after_backward(monkeypatch):
    model = _mlp()
    counter = _Counter(monkeypatch)
    handle = fgs.backward_stats(model, bucket_bytes=600)
    sizes = [len(b) for b in handle._buckets]
    assert handle.num_buckets == 3 and sum(sizes) == 6, sizes
    # reverse registration order: the last layer's tensors come first
    assert 5 in handle._buckets[0]
    for step in range(3):
        model.zero_grad(set_to_none=step % 2 == 0)
        _loss(model, seed=step).backward()
        assert counter.calls == (step + 1) * handle.num_buckets
        _total, stats = handle.clip_grad_norm_(1e6)
        assert counter.calls == (step + 1) * handle.num_buckets  # nothing after backward
        assert stats.catchup_tensors == 0


def test_remove_and_context_manager_unregister_every_hook(monkeypatch):
    model = _mlp()
    with fgs.backward_stats(model) as handle:
        assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    handle.remove()  # idempotent
    counter = _Counter(monkeypatch)
    _loss(model).backward()
    assert counter.calls == 0
    second = fgs.backward_stats(model)
    second.remove()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_gradscaler_unscale_through_the_handle_needs_no_catchup(monkeypatch):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    counter = _Counter(monkeypatch)
    handle = fgs.backward_stats(model, bucket_bytes=300)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(_loss(model)).backward()
        calls = counter.calls
        handle.unscale_(scaler, opt)
        _total, stats = handle.clip_grad_norm_(1e6)
        assert counter.calls == calls and stats.catchup_tensors == 0
        assert_same_stats(stats, _reference(model))
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("through_handle", [True, False])
def test_gradscaler_given_detects_a_direct_unscale(through_handle):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    handle = fgs.backward_stats(model, bucket_bytes=300, scaler=scaler)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(_loss(model)).backward()
        if through_handle:
            handle.unscale_(scaler, opt)
        else:
            scaler.unscale_(opt)  # invisible to the slots: finalize measures everything again
        stats = handle.finalize()
        assert stats.catchup_tensors == (0 if through_handle else len(stats))
        assert_same_stats(stats, _reference(model))
        scaler.step(opt)
        scaler.update()


def test_plain_scaler_unscale_is_invisible_to_version_counters():
    # why BackwardStats.unscale_ exists: torch's unscale kernel bumps no version counter
    g = torch.randn(4)
    version = g._version
    torch._amp_foreach_non_finite_check_and_unscale_([g], torch.zeros(1), torch.tensor([0.5]))
    assert g._version == version


def test_sparse_gradient_is_refused_at_finalize_not_in_backward():
    torch.manual_seed(0)
    model = torch.nn.Embedding(5, 3, sparse=True)
    handle = fgs.backward_stats(model)
    model(torch.tensor([1, 2])).sum().backward()  # the hook must not break backward
    with pytest.raises(TypeError, match="weight"):
        handle.finalize()


def test_bad_arguments():
    model = _mlp()
    with pytest.raises(TypeError, match="model"):
        fgs.backward_stats(list(model.parameters()))
    with pytest.raises(ValueError, match="bucket_bytes"):
        fgs.backward_stats(model, bucket_bytes=0)
    with pytest.raises(TypeError, match="bucket_bytes"):
        fgs.backward_stats(model, bucket_bytes=2.5)
    with pytest.raises(ValueError, match="norm_type"):
        fgs.backward_stats(model, "fro")
    with pytest.raises(TypeError, match="scaler"):
        fgs.backward_stats(model, scaler=object())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    handle = fgs.backward_stats(model)
    _loss(model).backward()
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="max_norm"):
        handle.clip_grad_norm_(-1.0)
    assert_same_tensors([p.grad for p in model.parameters()], before)


def test_ddp_is_refused_with_the_reason():
    from torch.nn.parallel import DistributedDataParallel

    # an instance without a process group: the refusal looks at the type only
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)
    torch.nn.Module.__init__(ddp)
    ddp.module = _mlp()
    with pytest.raises(ValueError, match="unreduced"):
        fgs.backward_stats(ddp, source="params")
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        fgs.backward_stats(_mlp(), source="comm_hook")
    with pytest.raises(ValueError, match="source"):
        fgs.backward_stats(_mlp(), source="grads")
    assert all(not p._post_accumulate_grad_hooks for p in ddp.module.parameters())


@pytest.mark.parametrize("finalize", [True, False])
def test_the_handle_keeps_no_gradient_alive(finalize):
    import gc
    import weakref

    model = _mlp()
    handle = fgs.backward_stats(model)
    _loss(model).backward()
    if finalize:
        _total, _stats = handle.clip_grad_norm_(1.0)
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.slow  # torch.compile: seconds of tracing and C++ compiling on 2 cores
def test_compiled_model_needs_no_catchup():
    import torch._dynamo

    torch._dynamo.reset()
    try:
        model = torch.compile(_mlp())
        handle = fgs.backward_stats(model, bucket_bytes=300)
        for seed in range(2):
            model.zero_grad()
            _loss(model, seed=seed).backward()
            stats = handle.finalize()
            # the hooks live on the parameters' AccumulateGrad nodes, outside the graph
            assert stats.catchup_tensors == 0
            assert stats.names[0] == "_orig_mod.0.weight"
            assert_same_stats(stats, _reference(model))
    finally:
        torch._dynamo.reset()


def test_fsdp1_is_refused():
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(fsdp)
    fsdp.inner = _mlp()
    with pytest.raises(ValueError, match="FSDP1"):
        fgs.backward_stats(fsdp)
    assert all(not p._post_accumulate_grad_hooks for p in fsdp.inner.parameters())


def test_create_graph_backward_measures_outside_the_graph():
    """``backward(create_graph=True)`` runs the hooks with grad mode on: the measurement
    must not join the graph (it switches grad mode off itself, per bucket)."""
    model = _mlp()
    handle = fgs.backward_stats(model, bucket_bytes=256)  # several buckets
    seen = []
    real = bwd._measure_bucket

    def spy(grads, norm_type):
        seen.append(torch.is_grad_enabled())
        return real(grads, norm_type)

    bwd._measure_bucket = spy
    try:
        _loss(model).backward(create_graph=True)
    finally:
        bwd._measure_bucket = real
    assert seen and not any(seen)
    stats = handle.finalize()
    assert stats.catchup_tensors == 0 and not stats.norms.requires_grad
    assert_same_stats(stats, _reference(model))
    for p in model.parameters():
        p.grad = None  # the graph of the gradients holds the parameters
