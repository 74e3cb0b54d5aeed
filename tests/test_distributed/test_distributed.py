"""Global norms and stats under DDP, FSDP2, DTensor placements, process_group shards, pipelines.

Two gloo ranks on the CPU are spawned ONCE for the module (tests/_dist_workers.py runs every
scenario and saves what each rank saw); the tests below compare each rank's results with
the single-process result on the full model. Inputs are drawn from a fresh seed each run
(printed on failure).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist

import fastgradstats as fgs
from fastgradstats import distributed, inputs

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with gloo",
    ),
]

WORLD = 2
SPAWN_TIMEOUT_S = 120  # the whole module normally takes ~15 s; this only stops a hang


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Per-rank result dicts of every scenario, from one spawned 2-rank gloo job."""
    import _dist_workers

    out_dir = tmp_path_factory.mktemp("dist")
    seed = random.SystemRandom().randrange(2**31)
    codes, hung = _dist_workers.spawn(
        _dist_workers.main, WORLD, (seed,), str(out_dir), SPAWN_TIMEOUT_S
    )
    if hung:
        pytest.fail(f"distributed workers hung for {SPAWN_TIMEOUT_S} s (seed {seed})")
    print(f"distributed workers: seed {seed}")  # shown by pytest when a test fails
    assert codes == [0] * WORLD, f"workers exited with {codes} (seed {seed})"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def scenario(results: list[dict], name: str) -> list[dict]:
    per_rank = [r.get(name, {"error": "not run: an earlier scenario failed"}) for r in results]
    for rank, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"rank {rank}, scenario {name} (seed {results[0]['seed']}):\n{r['error']}")
    return per_rank


def assert_stats(got: dict, want: dict, rtol: float) -> None:
    """``GradStats.to_dict()`` against float64 per-tensor references, names in order."""
    assert list(got["tensors"]) == list(want)
    for name, ref in want.items():
        row = got["tensors"][name]
        assert row["numel"] == ref["numel"], name
        assert row["nan_count"] == ref["nan_count"], name
        assert row["inf_count"] == ref["inf_count"], name
        assert row["norm"] == pytest.approx(ref["norm"], rel=rtol, abs=1e-7), name
        assert row["max_abs"] == pytest.approx(ref["max_abs"], rel=rtol, abs=1e-7), name
    want_total = math.sqrt(sum(ref["norm"] ** 2 for ref in want.values()))
    assert got["total_norm"] == pytest.approx(want_total, rel=rtol)


def assert_totals(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want)
    for p in want:
        assert got[p] == pytest.approx(want[p], rel=rtol), f"norm_type={p}"


def assert_tensors_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert list(got) == list(want)
    for name in want:
        tol = (1e-2, 1e-2) if want[name].dtype == torch.bfloat16 else (rtol, atol)
        torch.testing.assert_close(got[name], want[name], rtol=tol[0], atol=tol[1], msg=name)


# ---------------------------------------------------------------- DDP


def test_ddp_full_gradients_need_no_communication(results):
    for r in scenario(results, "ddp"):
        assert_stats(r["stats"], r["want_stats"], rtol=1e-4)
        assert r["total"] == pytest.approx(r["want_total"], rel=1e-4)
        assert r["all_reduces_clip"] == 0  # DDP grads are already the full gradients
        assert_tensors_close(r["clipped"], r["want_clipped"], 1e-4, 1e-6)


def test_ddp_nan_from_one_rank_counted_once_on_every_rank(results):
    for r in scenario(results, "ddp"):
        counts = {n: t["nan_count"] for n, t in r["nan_stats"]["tensors"].items()}
        assert counts == {n: (1 if n == "2.weight" else 0) for n in counts}
        assert math.isnan(r["nan_stats"]["total_norm"])


# ---------------------------------------------------------------- FSDP2


def test_fsdp2_stats_match_full_model(results):
    for r in scenario(results, "fsdp2"):
        assert set(r["placements"].values()) == {"(Shard(dim=0),)"}
        assert_stats(r["stats"], r["want_stats"], rtol=1e-4)
        assert_totals(r["totals"], r["want_totals"], rtol=1e-4)
        assert r["all_reduces_stats"] == 2  # one SUM (|g|^2, counts), one MAX (max |g|)


def test_fsdp2_clip_scales_local_shards_by_global_coefficient(results):
    for r in scenario(results, "fsdp2"):
        assert r["total"] == pytest.approx(r["want_total"], rel=1e-4)
        assert r["all_reduces_clip"] == 1
        assert_tensors_close(r["clipped"], r["want_clipped"], 1e-4, 1e-6)


def assert_replicated_dtensor(kind: dict, ndim: int, value: float) -> None:
    """torch returns the total norm of DTensor grads as a DTensor (``Replicate``)."""
    assert kind["type"] == "DTensor", kind
    assert kind["placements"] == ["Replicate()"] * ndim and kind["mesh_ndim"] == ndim
    assert kind["dtype"] == torch.float32 and kind["shape"] == ()
    assert kind["local"] == kind["full"] == pytest.approx(value, rel=1e-4)


def test_fsdp2_total_norm_is_a_replicated_dtensor(results):
    for r in scenario(results, "fsdp2"):
        assert_replicated_dtensor(r["total_kind"], 1, r["want_total"])
        for p, kind in r["totals_kind"].items():
            assert_replicated_dtensor(kind, 1, r["want_totals"][p])


def test_fsdp2_nan_and_inf_on_one_rank_found_on_all(results):
    for r in scenario(results, "fsdp2"):
        tensors = r["nan_stats"]["tensors"]
        for name, row in tensors.items():
            assert row["nan_count"] == (name == "layers.0.linear1.weight"), name
            assert row["inf_count"] == (name == "head.weight"), name
        assert math.isnan(tensors["layers.0.linear1.weight"]["max_abs"])
        assert tensors["head.weight"]["max_abs"] == math.inf
        assert math.isnan(r["nan_stats"]["total_norm"])
        assert math.isnan(r["nan_inf_norm"])
        assert r["nonfinite_error"].startswith("RuntimeError")
        assert "layers.0.linear1.weight (1 NaN, 0 Inf)" in r["nonfinite_error"]
        assert "head.weight (0 NaN, 1 Inf)" in r["nonfinite_error"]
        assert r["unchanged_after_error"]


# ---------------------------------------------------------------- DTensor placements


@pytest.mark.parametrize("mesh", ["1d", "2d"])
def test_dtensor_replicated_counted_once_sharded_summed(results, mesh):
    for r in scenario(results, "dtensor"):
        res = r[mesh]
        assert_stats(res["stats"], res["want_stats"], rtol=2e-6)
        assert_totals(res["totals"], res["want_totals"], rtol=2e-6)
        assert res["all_reduces_stats"] == 2
        assert res["all_reduces_clip"] == 1
        assert res["total"] == pytest.approx(res["want_totals"][2.0], rel=2e-6)
        assert_replicated_dtensor(res["total_kind"], {"1d": 1, "2d": 2}[mesh], res["total"])
        assert_tensors_close(res["clipped"], res["want_clipped"], 2e-6, 1e-7)


# ---------------------------------------------------------------- process_group shards


def test_process_group_shards_give_full_parameter_stats(results):
    for r in scenario(results, "process_group"):
        assert_stats(r["stats"], r["want_stats"], rtol=2e-6)
        want_first_two = dict(list(r["want_stats"].items())[:2])
        assert_stats(r["one_stats"], want_first_two, rtol=2e-6)
        assert_totals(r["totals"], r["want_totals"], rtol=2e-6)
        assert r["local_total"] < r["want_totals"][2.0]  # why the group is needed
        assert r["total_kind"]["type"] == "Tensor"  # plain shards: a plain result


def test_process_group_clip(results):
    per_rank = scenario(results, "process_group")
    for r in per_rank:
        assert r["total"] == pytest.approx(r["want_totals"][2.0], rel=2e-6)
        want_coef = 0.25 * r["want_totals"][2.0] / (r["want_totals"][2.0] + 1e-6)
        assert r["clip_coef"] == pytest.approx(want_coef, rel=1e-5)
        assert r["all_reduces_clip_with_stats"] == 2
    names = list(per_rank[0]["clipped_shards"])
    joined = {n: torch.cat([r["clipped_shards"][n] for r in per_rank]) for n in names}
    assert_tensors_close(joined, per_rank[0]["want_clipped"], 1e-5, 1e-7)


def test_process_group_nan_on_one_rank_found_on_all(results):
    for r in scenario(results, "process_group"):
        tensors = r["nan_stats"]["tensors"]
        assert {n: t["nan_count"] for n, t in tensors.items() if t["nan_count"]} == {"big": 1}
        assert {n: t["inf_count"] for n, t in tensors.items() if t["inf_count"]} == {"mat": 1}
        assert math.isnan(r["nan_total"])


# ---------------------------------------------------------------- pipeline


def test_pipeline_combined_stats_and_norms(results):
    for r in scenario(results, "pipeline"):
        assert_stats(r["stats"], r["want_stats"], rtol=1e-5)
        assert_totals(r["totals"], r["want_totals"], rtol=1e-5)
        assert all(r[f"all_reduces_{p}"] == 1 for p in r["totals"])


def test_pipeline_clip_with_combined_norm(results):
    per_rank = scenario(results, "pipeline")
    for rank, r in enumerate(per_rank):
        want = {n: t for n, t in r["want_clipped"].items() if n in r["clipped"]}
        assert len(want) == 4, rank
        assert_tensors_close(r["clipped"], want, 1e-5, 1e-7)


def test_pipeline_names_and_nan(results):
    per_rank = scenario(results, "pipeline")
    for r in per_rank:
        assert r["unnamed_names"] == [f"stage{s}.{i}" for s in range(WORLD) for i in range(4)]
        counts = {n: t["nan_count"] for n, t in r["nan_stats"]["tensors"].items()}
        assert counts == {n: (1 if n == "6.bias" else 0) for n in counts}
        assert math.isnan(r["nan_inf_norm"])


# ---------------------------------------------------------------- errors


def test_errors_name_the_parameter(results):
    for r in scenario(results, "errors"):
        assert r["mixed_meshes"].startswith("ValueError")
        assert "'dec.w'" in r["mixed_meshes"] and "'enc.w'" in r["mixed_meshes"]
        assert r["group_mismatch"].startswith("ValueError") and "'enc.w'" in r["group_mismatch"]
        assert r["not_a_group"].startswith("TypeError") and "process_group" in r["not_a_group"]
        assert r["partial"].startswith("ValueError") and "'attn.bias'" in r["partial"]
        assert r["unchanged"]
        for got in r["scaled_on_mixed_meshes"]:
            torch.testing.assert_close(got, r["want_scaled"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- single process


def test_plain_grads_without_group_take_the_local_path():
    grads = inputs.collect([torch.randn(3)], use_grad=False)
    assert distributed.localize(grads) is None


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs no process group")
def test_group_without_init_is_an_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        fgs.get_total_norm([torch.randn(3)], process_group=object())
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.combine_pipeline_norm(torch.tensor(1.0))


def _abort_first_time(rank: int, world: int, marker_dir: str, out_dir: str) -> None:
    import os

    marker = os.path.join(marker_dir, f"ran{rank}")
    first = not os.path.exists(marker)
    open(marker, "a").close()
    if first and rank == 0:
        os.abort()  # as gloo's teardown can, under load
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("ok")


def _exit_with_error(rank: int, world: int, out_dir: str) -> None:
    raise SystemExit(3)


def test_spawn_reruns_once_after_a_signal_death_but_not_after_an_error(tmp_path):
    import _dist_workers

    out_dir, markers = tmp_path / "out", tmp_path / "markers"
    out_dir.mkdir()
    markers.mkdir()
    (out_dir / "store").write_text("stale")  # the rerun starts from a clean out_dir
    with pytest.warns(RuntimeWarning, match="died by signal"):
        codes, hung = _dist_workers.spawn(_abort_first_time, 2, (str(markers),), str(out_dir), 60)
    assert (codes, hung) == ([0, 0], False)
    assert sorted(p.name for p in out_dir.iterdir()) == ["rank0.txt", "rank1.txt"]
    codes, hung = _dist_workers.spawn(_exit_with_error, 2, (), str(out_dir), 60)
    assert codes == [3, 3] and not hung  # an error is reported, never retried
