"""fgs.backward_stats on DistributedDataParallel (the comm-hook source) and FSDP2 (hooks on
the DTensor shards), 2 gloo ranks:
statistics measured on each all-reduced bucket equal, bit for bit, those of
``grad_stats(..., backend="torch")`` after backward, with no catch-up."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.backend_independent,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with gloo",
    ),
]

WORLD = 2
SPAWN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    import _backward_dist_workers
    import _dist_workers

    out_dir = tmp_path_factory.mktemp("bwd_ddp")
    seed = random.SystemRandom().randrange(2**31)
    codes, hung = _dist_workers.spawn(
        _backward_dist_workers.main, WORLD, (seed,), str(out_dir), SPAWN_TIMEOUT_S
    )
    if hung:
        pytest.fail(f"distributed workers hung for {SPAWN_TIMEOUT_S} s (seed {seed})")
    assert codes == [0] * WORLD, f"workers exited with {codes} (seed {seed})"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def scenario(results: list[dict], name: str) -> list[dict]:
    per_rank = [r.get(name, {"error": "not run: an earlier scenario failed"}) for r in results]
    for rank, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"rank {rank}, scenario {name} (seed {results[0]['seed']}):\n{r['error']}")
    return per_rank


def assert_steps(per_rank: list[dict]) -> None:
    for rank, r in enumerate(per_rank):
        for step, row in enumerate(r["steps"]):
            assert row["names"], (rank, step)
            assert all(row["equal"].values()), (rank, step, row["equal"])
            assert row["catchup"] == 0, (rank, step, row)
            assert row["n"] == 6
    # reduced gradients: every rank measured the same totals
    assert [row["total"] for row in per_rank[0]["steps"]] == [
        row["total"] for row in per_rank[1]["steps"]
    ]


@pytest.mark.parametrize("name", ["plain", "bucket_view", "no_sync"])
def test_ddp_buckets_measured_after_the_all_reduce(results, name):
    per_rank = scenario(results, name)
    assert_steps(per_rank)
    if name == "plain":
        assert per_rank[0]["source"] == "comm_hook"


def test_ddp_with_the_users_comm_hook(results):
    per_rank = scenario(results, "user_hook")
    assert_steps(per_rank)
    assert all(r["calls"] > 0 for r in per_rank)
    assert all("comm_hook=hook" in r["refused"] for r in per_rank)


def test_ddp_refuses_the_parameter_hook_source(results):
    per_rank = scenario(results, "params_refused")
    assert all(r["refused"] and "unreduced" in r["refused"] for r in per_rank)


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_accumulate", "fsdp2_sync_last"])
def test_fsdp2_shards_measured_in_backward_equal_grad_stats(results, name):
    """FSDP2 calls the post-accumulate hooks on the sharded parameters after its
    reduce-scatter; finalize all-reduces the shards' partials: the statistics of the full
    parameters, bit for bit those of grad_stats after backward, with no catch-up."""
    per_rank = scenario(results, name)
    assert_steps(per_rank)
    assert all(r["sharded"] and r["source"] == "params" for r in per_rank)


def test_fsdp2_clip_in_backward_equals_clip_after_backward(results):
    for rank, r in enumerate(scenario(results, "fsdp2_clip")):
        for step, row in enumerate(r["steps"]):
            where = (rank, step, row)
            assert row["totals"] == ["DTensor"] * 3, where  # as torch returns it
            assert row["same_total"] == [True, True], where
            assert row["clipped"] == [True, True], where
            assert row["coef_below_one"] and row["catchup"] == [0, 0], where
