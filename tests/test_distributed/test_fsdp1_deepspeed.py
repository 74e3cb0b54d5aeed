"""Global and per-layer statistics and clipping under FSDP1 and DeepSpeed ZeRO 1/2.

Each family runs in ONE spawned 2-rank gloo job on the CPU (tests/_fsdp1_workers.py) and is
compared with the library's own answer on an identical model (``FSDP.clip_grad_norm_``,
DeepSpeed's ``gradient_clipping``, ``get_global_grad_norm()`` and ``safe_get_full_grad``)
and with a float64 single-process reference on the full batch. Inputs come from a fresh
seed each run (printed on failure).
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch
import torch.distributed as dist

from fastgradstats.distributed import deepspeed_zero_grads, fsdp1_grads

WORLD = 2
SPAWN_TIMEOUT_S = 150  # FSDP1 takes ~10 s, DeepSpeed ~30 s (4 engines); this stops a hang

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
# .ci/run sets FASTGRADSTATS_REQUIRE_EXTRAS=1 and installs the extras: a missing deepspeed
# fails there instead of skipping
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None
    and not os.environ.get("FASTGRADSTATS_REQUIRE_EXTRAS"),
    reason="needs deepspeed (pip install -e '.[deepspeed]')",
)


def _spawn(tmp_path_factory, target_name: str) -> list[dict]:
    import _dist_workers
    import _fsdp1_workers

    out_dir = tmp_path_factory.mktemp(target_name)
    seed = random.SystemRandom().randrange(2**31)
    target = getattr(_fsdp1_workers, target_name)
    codes, hung = _dist_workers.spawn(target, WORLD, (seed,), str(out_dir), SPAWN_TIMEOUT_S)
    if hung:
        pytest.fail(f"{target_name} workers hung for {SPAWN_TIMEOUT_S} s (seed {seed})")
    print(f"{target_name}: seed {seed}")  # shown by pytest when a test fails
    assert codes == [0] * WORLD, f"workers exited with {codes} (seed {seed})"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def fsdp1(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, "fsdp1_main")


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, "deepspeed_main")


def scenario(results: list[dict], name: str) -> list[dict]:
    per_rank = [r.get(name, {"error": "not run: an earlier scenario failed"}) for r in results]
    for rank, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"rank {rank}, scenario {name} (seed {results[0]['seed']}):\n{r['error']}")
    return per_rank


def assert_stats(got: dict, want: dict, rtol: float = 1e-4) -> None:
    """``GradStats.to_dict()`` of full parameters against float64 references, in order."""
    assert list(got["tensors"]) == list(want)
    for name, ref in want.items():
        row = got["tensors"][name]
        assert row["numel"] == ref["numel"], name
        assert (row["nan_count"], row["inf_count"]) == (ref["nan_count"], ref["inf_count"]), name
        assert row["norm"] == pytest.approx(ref["norm"], rel=rtol, abs=1e-7), name
        assert row["max_abs"] == pytest.approx(ref["max_abs"], rel=rtol, abs=1e-7), name
    want_total = sum(ref["norm"] ** 2 for ref in want.values()) ** 0.5
    assert got["total_norm"] == pytest.approx(want_total, rel=rtol)


def assert_same_tensors(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- FSDP1

FSDP1_CASES = ["fsdp1_orig", "fsdp1_flat", "fsdp1_mixed", "fsdp1_mixed_orig"]


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("case", FSDP1_CASES)
def test_fsdp1_stats_are_those_of_the_full_parameters(fsdp1, case):
    for r in scenario(fsdp1, case):
        assert r["names"] == list(r["want_stats"])  # original names, model order
        assert_stats(r["stats"], r["want_stats"])
        for p, want in r["want_totals"].items():
            assert r["totals"][p] == pytest.approx(want, rel=1e-4), f"norm_type={p}"
        assert r["all_reduces_stats"] == 2  # one SUM, one MAX, whatever the model


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("case", FSDP1_CASES)
def test_fsdp1_clip_equals_fsdp_clip_grad_norm(fsdp1, case):
    for r in scenario(fsdp1, case):
        assert r["clip_total"] == pytest.approx(r["want_clip_total"], rel=1e-5)
        assert r["clip_total"] > r["max_norm"]  # the clip was active
        assert r["clip_dtype"] == r["want_clip_dtype"] == torch.float32
        assert r["all_reduces_clip"] == 1
        assert_same_tensors(r["clipped"], r["want_clipped"])
        assert r["clip_inf"] == pytest.approx(r["want_clip_inf"], rel=1e-5)
        assert_same_tensors(r["clipped_inf"], r["want_clipped_inf"])


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("case", FSDP1_CASES)
def test_fsdp1_histograms_and_nan_counts_cover_each_element_once(fsdp1, case):
    ranks = scenario(fsdp1, case)
    for r in ranks:
        assert (
            r["hist_elements"] == r["hist_numels"] == [w["numel"] for w in r["want_stats"].values()]
        )
        assert sum(r["nan_counts"]) == 1  # planted on rank 1 only
        assert len(r["nan_names"]) == 1
    assert ranks[0]["nan_names"] == ranks[1]["nan_names"]


@pytest.mark.distributed
@needs_gloo
def test_fsdp1_grads_refuses_what_is_not_fsdp1(fsdp1):
    r = scenario(fsdp1, "fsdp1_orig")[0]
    assert r["bad_model"].startswith("ValueError: model: no FullyShardedDataParallel")
    assert r["not_module"].startswith("TypeError: model must be an nn.Module")


def test_fsdp1_grads_bad_input_without_processes():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        fsdp1_grads([torch.zeros(2)])
    with pytest.raises(ValueError, match="no FullyShardedDataParallel"):
        fsdp1_grads(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- DeepSpeed ZeRO 1/2

ZERO_CASES = ["zero1", "zero2", "zero2_bf16"]


@pytest.mark.distributed
@needs_gloo
@needs_deepspeed
@pytest.mark.parametrize("case", ZERO_CASES)
def test_zero_stats_are_those_of_the_full_gradients(zero, case):
    ranks = scenario(zero, case)
    assert ranks[1]["pieces"][0] == ranks[1]["pieces"][1] + 1  # the last partition is padded
    for r in ranks:
        assert r["stage"] == (int(case[4]),) * 2
        assert r["names"] == list(r["want_stats"])
        assert r["grad_dtypes"] == ["torch.float32"]  # fp32 partitions, bf16 parameters too
        assert r["compact"] == r["bf16"]  # DeepSpeed's other partition layout
        if r["bf16"]:  # a bf16 forward: only DeepSpeed's own gradients are the reference
            numels = {n: row["numel"] for n, row in r["stats"]["tensors"].items()}
            assert numels == {n: w["numel"] for n, w in r["want_stats"].items()}
        else:
            assert_stats(r["stats"], r["want_stats"])
        assert r["all_reduces_stats"] == 2  # SUM and MAX for every parameter at once ...
        assert r["all_reduces_full_grads"] == len(r["names"])  # ... safe_get_full_grad: 1 each
        for name, full in r["full_grads"].items():  # DeepSpeed's own full gradients
            row = r["stats"]["tensors"][name]
            assert row["norm"] == pytest.approx(full.double().norm().item(), rel=1e-5), name
            assert row["max_abs"] == pytest.approx(full.abs().max().item(), rel=1e-5), name


@pytest.mark.distributed
@needs_gloo
@needs_deepspeed
@pytest.mark.parametrize("case", ZERO_CASES)
def test_zero_clip_equals_deepspeed_gradient_clipping(zero, case):
    for r in scenario(zero, case):
        assert r["clip_total"] == pytest.approx(r["want_clip_total"], rel=1e-5)
        assert r["clip_total"] > 0.02  # the clip was active
        assert_same_tensors(r["params"], r["want_params"])  # bf16 too: same fp32 master step
        assert r["after_step"].startswith("RuntimeError: engine: no reduced gradients")


def test_deepspeed_zero_grads_refuses_other_engines():
    class Engine:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    with pytest.raises(ValueError, match="not DeepSpeed's ZeRO stage 1/2"):
        deepspeed_zero_grads(Engine())

    class Stage3(Engine):
        def zero_optimization_stage(self) -> int:
            return 3

    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        deepspeed_zero_grads(Stage3())
