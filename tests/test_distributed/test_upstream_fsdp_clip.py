"""torch's FSDP2 clip test (pytorch test/distributed/_composable/fsdp/
test_fully_shard_clip_grad_norm_.py), rewritten for the CPU, clipping with fastgradstats.

``1d``: ``fully_shard`` on 2 gloo ranks; ``2d``: tensor + sequence parallel on a tp mesh,
``fully_shard`` on a dp mesh, 4 gloo ranks. The reference is a DDP copy clipped by
``torch.nn.utils.clip_grad_norm_``. Each job is spawned once (tests/_fsdp_clip_workers.py
runs every backend and norm type) and the tests below assert, per rank and iteration,
what upstream asserts. The one relaxed assertion is marked RELAXED. Stricter than the
current upstream in two places, as its earlier version was: every gradient (not just one)
must exceed max_norm before clipping, and the clip passes ``foreach=True``. Beyond
upstream, the optimizers step between iterations, so each iteration sees new weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.backend_independent,  # parametrized over the backends itself
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with gloo",
    ),
]

WORLDS = {"1d": 2, "2d": 4}
SPAWN_TIMEOUT_S = 240  # normally well under a minute; this only stops a hang


@pytest.fixture(scope="module", params=sorted(WORLDS))
def job(request, tmp_path_factory) -> tuple[str, list[dict]]:
    import _dist_workers
    import _fsdp_clip_workers

    kind, world = request.param, WORLDS[request.param]
    out_dir = tmp_path_factory.mktemp(f"fsdp_clip_{kind}")
    codes, hung = _dist_workers.spawn(
        _fsdp_clip_workers.main, world, (kind,), str(out_dir), SPAWN_TIMEOUT_S
    )
    if hung:
        pytest.fail(f"{kind}: workers hung for {SPAWN_TIMEOUT_S} s")
    assert codes == [0] * world, f"{kind}: workers exited with {codes}"
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    expected = {
        f"{b}-{p}"
        for b in _fsdp_clip_workers.backends()
        for p in _fsdp_clip_workers.NORM_TYPES[kind]
    }
    for rank, r in enumerate(results):
        for key, value in r.items():
            if isinstance(value, dict) and "error" in value:
                pytest.fail(f"{kind}, rank {rank}, {key}:\n{value['error']}")
        assert set(r) == expected, f"{kind}, rank {rank}: ran {sorted(r)}"
    return kind, results


def _iterations(job):
    kind, results = job
    for rank, per_case in enumerate(results):
        for case, iterations in per_case.items():
            for i, it in enumerate(iterations):
                yield f"{kind} rank {rank} {case} iteration {i}", it


def test_sharded_grads_match_the_replicated_reference(job):
    for where, it in _iterations(job):
        # upstream skips (Shard(0), Shard(0)) parameters; FSDP2 now gives them a strided
        # shard whose full_tensor() is right, so every parameter is compared here
        bad = {n: e for n, e in it["grad_mismatch"].items() if e is not None}
        assert not bad, f"{where}: {bad}"


def test_clipping_is_not_vacuous(job):
    """Upstream: every gradient (full and local shard) has a norm above max_norm before."""
    from _fsdp_clip_workers import MAX_NORM

    for where, it in _iterations(job):
        assert min(it["ref_norms_before"]) > MAX_NORM, where
        assert min(it["local_norms_before"]) > MAX_NORM, where


def test_total_norm_is_torch_s_as_a_dtensor(job):
    for where, it in _iterations(job):
        assert it["total_type"] == "DTensor", where
        torch.testing.assert_close(it["total_full"], it["ref_total"], msg=where)
        ndim = {"1d": 1, "2d": 2}[job[0]]
        assert it["total_placements"] == ["Replicate()"] * ndim, where


def test_one_all_reduce_per_reduction_group(job):
    """RELAXED: upstream asserts ``all_reduce count == len(total_norm.placements)`` (one per
    mesh dim: 1 in 1-D, 2 in 2-D). fastgradstats reduces every sharded mesh dim in one
    all-reduce over the whole mesh when it spans the world (fastgradstats.distributed), so
    it issues 1 in both cases, and no other collective."""
    for where, it in _iterations(job):
        assert it["all_reduces"] == 1, where
        assert it["all_reduces"] <= len(it["total_placements"]), where
        assert it["other_collectives"] == {}, where


def test_every_gradient_clipped_below_max_norm(job):
    from _fsdp_clip_workers import MAX_NORM

    for where, it in _iterations(job):
        slack = 1e-5  # float32 rounding of norm(g * coef)
        assert max(it["ref_norms_after"]) <= MAX_NORM * (1 + slack), where
        assert max(it["local_norms_after"]) <= MAX_NORM * (1 + slack), where
        # nonzero gradients were changed by clipping
        assert not any(it["ref_unchanged"]), where
        assert not any(it["local_unchanged"]), where


def test_2d_job_mixes_sharded_and_replicated_mesh_dims(job):
    """The 2-D model must exercise both kinds of mesh dims (what the port is for)."""
    kind, results = job
    placements = next(iter(results[0].values()))[0]["placements"]
    if kind == "1d":
        assert set(placements.values()) == {"(Shard(dim=0),)"}
        return
    assert any("Replicate" in p for p in placements.values()), placements
    assert any(p.count("Shard") == 2 for p in placements.values()), placements
