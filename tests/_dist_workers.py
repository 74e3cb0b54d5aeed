"""Worker side of tests/test_distributed/test_distributed.py: every scenario, run by each
of 2 gloo ranks.

``main(rank, world_size, seed, out_dir)`` runs all scenarios in one process group (spawning
costs seconds, so it happens once per test module) and saves, per rank, a dict
``{scenario: {key: value}}`` to ``out_dir/rank{rank}.pt``. Each scenario stores what
fastgradstats returned next to a single-process reference computed on the full model in
float64 (or by torch.nn.utils); the pytest side does the comparing. A scenario that raises
stores its traceback under ``"error"``.
"""

from __future__ import annotations

import copy
import faulthandler
import itertools
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2
TIMEOUT = timedelta(seconds=30)  # a desynchronised collective fails instead of hanging
WORKER_LIMIT_S = 100  # after this a worker prints where it is stuck and exits
NORM_TYPES = (2.0, 1.0, float("inf"), 3.0)


def ref_stats(named: list[tuple[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Float64 per-tensor stats of full gradients, computed without fastgradstats."""
    out = {}
    for name, g in named:
        g64 = g.detach().double()
        out[name] = {
            "norm": torch.linalg.vector_norm(g64, 2).item(),
            "max_abs": g64.abs().max().item() if g64.numel() else 0.0,
            "nan_count": int(torch.isnan(g64).sum()),
            "inf_count": int(torch.isinf(g64).sum()),
            "numel": g64.numel(),
        }
    return out


def ref_total(grads: list[torch.Tensor], norm_type: float) -> float:
    flat = torch.cat([g.detach().double().flatten() for g in grads])
    return torch.linalg.vector_norm(flat, norm_type).item()


@contextmanager
def count_all_reduce() -> Iterator[list[int]]:
    """Count dist.all_reduce calls (fastgradstats.distributed calls it through the module)."""
    calls: list[int] = []
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def error_text(fn: Callable[[], Any]) -> str | None:
    """``"TypeName: message"`` of what ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def describe_total(total: torch.Tensor) -> dict[str, Any]:
    """What kind of tensor a total norm is: class, placements, dtype, shape, local value."""
    out: dict[str, Any] = {
        "type": type(total).__name__,
        "dtype": total.dtype,
        "shape": tuple(total.shape),
    }
    if hasattr(total, "placements"):
        out["placements"] = [repr(p) for p in total.placements]
        out["mesh_ndim"] = total.device_mesh.ndim
        out["local"] = total.to_local().item()
        out["full"] = total.full_tensor().item()
    return out


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


# ---------------------------------------------------------------- DDP


def scenario_ddp(rank: int, seed: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastgradstats as fgs

    torch.manual_seed(seed)
    model = mlp(7, 13, 5, 1)
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    xs, ys = torch.randn(WORLD, 6, 7), torch.randn(WORLD, 6)

    nn.functional.mse_loss(ddp(xs[rank]).squeeze(-1), ys[rank]).backward()
    nn.functional.mse_loss(ref(xs.flatten(0, 1)).squeeze(-1), ys.flatten()).backward()
    named = list(ddp.module.named_parameters())
    ref_named = list(ref.named_parameters())
    out: dict[str, Any] = {"want_stats": ref_stats([(n, p.grad) for n, p in ref_named])}
    out["stats"] = fgs.grad_stats(named).to_dict()

    want_total = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    max_norm = 0.4 * want_total
    with count_all_reduce() as calls:
        out["total"] = fgs.clip_grad_norm_(ddp.parameters(), max_norm).item()
    out["all_reduces_clip"] = len(calls)
    out["want_total"] = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
    out["clipped"] = {n: p.grad.clone() for n, p in named}
    out["want_clipped"] = {n: p.grad.clone() for n, p in ref_named}

    # A NaN made by one rank's backward reaches every rank through DDP's own all-reduce;
    # fastgradstats must then count it once, not once per replica.
    ddp.zero_grad()
    bad = dict(named)["2.weight"]

    def plant_nan(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[1, 3] = torch.nan
        return grad

    if rank == 1:
        bad.register_hook(plant_nan)  # runs before DDP's all-reduce hook
    nn.functional.mse_loss(ddp(xs[rank]).squeeze(-1), ys[rank]).backward()
    nan_stats = fgs.grad_stats(named)
    out["nan_stats"] = nan_stats.to_dict()
    return out


# ---------------------------------------------------------------- FSDP2


class TinyTransformer(nn.Module):
    """Embedding -> 2 encoder layers -> mean over the sequence -> one output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(16, 1)  # 1 row: one rank's shard of it is empty

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1)).sum(-1)  # sum, not a squeeze view: FSDP2 warns on views


def scenario_fsdp2(rank: int, seed: int) -> dict[str, Any]:
    # The README "Distributed" example runs the same calls.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fastgradstats as fgs

    torch.manual_seed(seed)
    model = TinyTransformer()
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tokens, target = torch.randint(0, 11, (WORLD, 3, 5)), torch.randn(WORLD, 3)

    nn.functional.mse_loss(model(tokens[rank]), target[rank]).backward()
    nn.functional.mse_loss(ref(tokens.flatten(0, 1)), target.flatten()).backward()
    ref_named = list(ref.named_parameters())
    ref_grads = [p.grad for _, p in ref_named]
    out: dict[str, Any] = {"want_stats": ref_stats([(n, p.grad) for n, p in ref_named])}
    out["placements"] = {n: str(p.grad.placements) for n, p in model.named_parameters()}

    with count_all_reduce() as calls:
        stats = fgs.grad_stats(model.named_parameters())
    out["all_reduces_stats"] = len(calls)
    out["stats"] = stats.to_dict()
    grads = [p.grad for p in model.parameters()]
    out["totals"] = {p: fgs.get_total_norm(grads, p).item() for p in NORM_TYPES}
    out["want_totals"] = {p: ref_total(ref_grads, p) for p in NORM_TYPES}
    out["totals_kind"] = {p: describe_total(fgs.get_total_norm(grads, p)) for p in NORM_TYPES}

    want_total = ref_total(ref_grads, 2.0)
    max_norm = 0.3 * want_total
    with count_all_reduce() as calls:
        total = fgs.clip_grad_norm_(model.parameters(), max_norm)
    out["all_reduces_clip"] = len(calls)
    out["total"] = total.full_tensor().item()  # torch's FSDP2 test calls full_tensor() here
    out["total_kind"] = describe_total(total)
    out["want_total"] = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
    out["clipped"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    out["want_clipped"] = {n: p.grad.clone() for n, p in ref_named}

    # plant a NaN in rank 1's shard of one parameter and an Inf in rank 0's of another
    params = dict(model.named_parameters())
    with torch.no_grad():
        if rank == 1:
            params["layers.0.linear1.weight"].grad.to_local()[0, 0] = torch.nan
        else:
            params["head.weight"].grad.to_local()[0, 2] = torch.inf
    out["nan_stats"] = fgs.grad_stats(model.named_parameters()).to_dict()
    out["nan_inf_norm"] = fgs.get_total_norm([p.grad for p in params.values()], "inf").item()
    before = {n: p.grad.to_local().clone() for n, p in params.items()}
    out["nonfinite_error"] = error_text(
        lambda: fgs.clip_grad_norm_(model.named_parameters(), 1.0, error_if_nonfinite=True)
    )
    out["unchanged_after_error"] = all(
        torch.allclose(before[n], p.grad.to_local(), rtol=0, atol=0, equal_nan=True)
        for n, p in params.items()
    )
    return out


# ---------------------------------------------------------------- DTensor, TP-like placements


def scenario_dtensor(rank: int, seed: int) -> dict[str, Any]:
    """Shard / Replicate mixes on a 1-D and a (1, 2) mesh, plus one plain replicated tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastgradstats as fgs

    gen = torch.Generator().manual_seed(seed + 1)
    mesh1 = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    layouts = {
        "1d": (
            mesh1,
            {
                "col": ((7, 5), [Shard(0)]),
                "row": ((6, 9), [Shard(1)]),
                "norm": ((13,), [Replicate()]),
                "tiny": ((1,), [Shard(0)]),
            },
        ),
        "2d": (
            mesh2,
            {
                "col": ((7, 5), [Replicate(), Shard(0)]),
                "row": ((6, 9), [Shard(0), Replicate()]),
                "norm": ((13,), [Replicate(), Replicate()]),
                "both": ((5, 4), [Shard(0), Shard(1)]),
            },
        ),
    }
    out: dict[str, Any] = {}
    for key, (mesh, specs) in layouts.items():
        full = {n: torch.randn(shape, generator=gen) * 3 for n, (shape, _) in specs.items()}
        full["plain"] = torch.randn(4, 3, generator=gen)  # not a DTensor: every rank holds it
        params = {}
        for name, (_, placements) in specs.items():
            p = distribute_tensor(torch.zeros_like(full[name]), mesh, placements)
            p.grad = distribute_tensor(full[name].clone(), mesh, placements)
            params[name] = p
        params["plain"] = torch.zeros(4, 3)
        params["plain"].grad = full["plain"].clone()
        named = list(params.items())
        res: dict[str, Any] = {"want_stats": ref_stats(list(full.items()))}
        with count_all_reduce() as calls:
            res["stats"] = fgs.grad_stats(named).to_dict()
        res["all_reduces_stats"] = len(calls)
        grads = [p.grad for p in params.values()]
        res["totals"] = {p: fgs.get_total_norm(grads, p).item() for p in NORM_TYPES}
        res["want_totals"] = {p: ref_total(list(full.values()), p) for p in NORM_TYPES}
        max_norm = 0.5 * res["want_totals"][2.0]
        with count_all_reduce() as calls:
            total = fgs.clip_grad_norm_(named, max_norm)
        res["all_reduces_clip"] = len(calls)
        res["total"] = total.full_tensor().item()
        res["total_kind"] = describe_total(total)
        coef = max_norm / (res["want_totals"][2.0] + 1e-6)
        res["clipped"] = {
            n: (p.grad.full_tensor() if n != "plain" else p.grad.clone()) for n, p in named
        }
        res["want_clipped"] = {n: t * coef for n, t in full.items()}
        out[key] = res
    return out


# ---------------------------------------------------------------- hand-sharded, process_group

SHARD_SPECS = {  # name: (shape, dtype); sharded along dim 0, unevenly where it can be
    "empty": ((0,), torch.float32),
    "one": ((1,), torch.float32),
    "seven": ((7,), torch.float64),
    "big": ((1023,), torch.float32),
    "mat": ((13, 5), torch.bfloat16),
    "cube": ((3, 1, 4), torch.float32),
}


def scenario_process_group(rank: int, seed: int) -> dict[str, Any]:
    import fastgradstats as fgs

    gen = torch.Generator().manual_seed(seed + 2)
    group = dist.new_group(list(range(WORLD)), timeout=TIMEOUT)
    full = {
        n: (torch.randn(shape, generator=gen) * 2).to(dtype)
        for n, (shape, dtype) in SHARD_SPECS.items()
    }
    params = {}
    for name, tensor in full.items():
        shard = torch.tensor_split(tensor, WORLD, dim=0)[rank].clone()
        params[name] = torch.zeros_like(shard, requires_grad=True)
        params[name].grad = shard
    named = list(params.items())
    out: dict[str, Any] = {"want_stats": ref_stats(list(full.items()))}
    out["stats"] = fgs.grad_stats(named, process_group=group).to_dict()
    # rank 1 holds only empty shards here: the ranks must still agree on the buffer size
    out["one_stats"] = fgs.grad_stats(named[:2], process_group=group).to_dict()
    shards = [p.grad for p in params.values()]
    out["totals"] = {
        p: fgs.get_total_norm(shards, p, process_group=group).item() for p in NORM_TYPES
    }
    out["want_totals"] = {p: ref_total(list(full.values()), p) for p in NORM_TYPES}
    out["local_total"] = fgs.get_total_norm(shards).item()  # what a clip without the group sees
    out["total_kind"] = describe_total(fgs.get_total_norm(shards, process_group=group))

    max_norm = 0.25 * out["want_totals"][2.0]
    with count_all_reduce() as calls:
        total, clip_stats = fgs.clip_grad_norm_(
            named, max_norm, process_group=group, return_stats=True
        )
    out["all_reduces_clip_with_stats"] = len(calls)
    out["total"] = total.item()
    out["clip_coef"] = clip_stats.clip_coef.item()
    out["clipped_shards"] = {n: p.grad.clone() for n, p in named}
    # float64 coefficient: torch's own clip would round bf16 per-tensor norms first
    coef = max_norm / (out["want_totals"][2.0] + 1e-6)
    out["want_clipped"] = {n: (t.double() * coef).to(t.dtype) for n, t in full.items()}

    with torch.no_grad():  # NaN in rank 1's shard of "big", Inf in rank 0's shard of "mat"
        if rank == 1:
            params["big"].grad[5] = torch.nan
        else:
            params["mat"].grad[2, 3] = torch.inf
    out["nan_stats"] = fgs.grad_stats(named, process_group=group).to_dict()
    out["nan_total"] = fgs.get_total_norm(shards, process_group=group).item()
    return out


# ---------------------------------------------------------------- pipeline, 2 stages

STAGE_OF_MODULE = {0: 0, 2: 0, 4: 1, 6: 1}  # Linear index in the Sequential -> stage (rank)


def scenario_pipeline(rank: int, seed: int) -> dict[str, Any]:
    import fastgradstats as fgs
    from fastgradstats.distributed import combine_pipeline_norm, combine_pipeline_stats

    torch.manual_seed(seed + 3)
    full = mlp(7, 13, 11, 5, 1)
    ref = copy.deepcopy(full)
    x, y = torch.randn(6, 7), torch.randn(6)
    stage = full[:4] if rank == 0 else full[4:]
    named = [(n, p) for n, p in full.named_parameters() if STAGE_OF_MODULE[int(n[0])] == rank]

    # one micro-batch through the 2-stage split: activations forward, their grads back
    if rank == 0:
        h = stage(x)
        dist.send(h.detach(), dst=1)
        grad_h = torch.empty_like(h)
        dist.recv(grad_h, src=1)
        h.backward(grad_h)
    else:
        h = torch.empty(6, 11)
        dist.recv(h, src=0)
        h.requires_grad_()
        nn.functional.mse_loss(stage(h).squeeze(-1), y).backward()
        dist.send(h.grad, dst=0)
    nn.functional.mse_loss(ref(x).squeeze(-1), y).backward()
    ref_named = list(ref.named_parameters())
    ref_grads = [p.grad for _, p in ref_named]

    out: dict[str, Any] = {"want_stats": ref_stats([(n, p.grad) for n, p in ref_named])}
    out["stats"] = combine_pipeline_stats(fgs.grad_stats(named)).to_dict()
    grads = [p.grad for _, p in named]
    totals = {}
    for p in NORM_TYPES:
        with count_all_reduce() as calls:
            totals[p] = combine_pipeline_norm(fgs.get_total_norm(grads, p), p).item()
        out[f"all_reduces_{p}"] = len(calls)
    out["totals"] = totals
    out["want_totals"] = {p: ref_total(ref_grads, p) for p in NORM_TYPES}

    max_norm = 0.3 * out["want_totals"][2.0]
    total = combine_pipeline_norm(fgs.get_total_norm(grads))
    fgs.clip_grads_with_norm_([p for _, p in named], max_norm, total)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    out["clipped"] = {n: p.grad.clone() for n, p in named}
    out["want_clipped"] = {n: p.grad.clone() for n, p in ref_named}

    # unnamed stats reuse "0", "1", ... on both stages: names get a stage prefix
    out["unnamed_names"] = combine_pipeline_stats(fgs.grad_stats(p for _, p in named)).names

    if rank == 1:
        with torch.no_grad():
            dict(named)["6.bias"].grad[0] = torch.nan
    out["nan_stats"] = combine_pipeline_stats(fgs.grad_stats(named)).to_dict()
    out["nan_inf_norm"] = combine_pipeline_norm(fgs.get_total_norm(grads, "inf"), "inf").item()
    return out


# ---------------------------------------------------------------- errors


def scenario_errors(rank: int, seed: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    import fastgradstats as fgs

    mesh_a = init_device_mesh("cpu", (WORLD,))
    mesh_b = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("other",))
    only_rank0 = dist.new_group([0], timeout=TIMEOUT)

    def param(mesh: Any, grad: torch.Tensor) -> torch.Tensor:
        p = distribute_tensor(torch.zeros(8, 3), mesh, [Shard(0)])
        p.grad = distribute_tensor(grad, mesh, [Shard(0)])
        return p

    full = torch.randn(8, 3, generator=torch.Generator().manual_seed(seed + 4))
    on_a, on_b = param(mesh_a, full.clone()), param(mesh_b, full.clone())
    before = on_a.grad.to_local().clone()
    out: dict[str, Any] = {
        "mixed_meshes": error_text(
            lambda: fgs.clip_grad_norm_([("enc.w", on_a), ("dec.w", on_b)], 0.01)
        ),
        "group_mismatch": error_text(
            lambda: fgs.grad_stats([("enc.w", on_a)], process_group=only_rank0)
        ),
        "not_a_group": error_text(lambda: fgs.grad_stats([on_a.grad.to_local()], process_group=3)),
    }
    out["unchanged"] = torch.equal(before, on_a.grad.to_local())
    partial = DTensor.from_local(torch.ones(2), mesh_a, [Partial()])
    out["partial"] = error_text(lambda: fgs.get_total_norm([("attn.bias", partial)]))
    # element-wise operations need no reduction, so mixed meshes are fine there
    fgs.clip_grads_with_norm_([on_a, on_b], 1.0, torch.tensor(4.0))
    fgs.clip_grad_value_([on_a, on_b], 0.2)
    want = (full * (1.0 / (4.0 + 1e-6))).clamp(-0.2, 0.2)
    out["scaled_on_mixed_meshes"] = [p.grad.full_tensor() for p in (on_a, on_b)]
    out["want_scaled"] = want
    return out


SCENARIOS = {
    "ddp": scenario_ddp,
    "fsdp2": scenario_fsdp2,
    "dtensor": scenario_dtensor,
    "process_group": scenario_process_group,
    "pipeline": scenario_pipeline,
    "errors": scenario_errors,
}


def spawn(target: Callable[..., None], world: int, args: tuple, out_dir: str, timeout_s: float):
    """Run ``target(rank, world, *args, out_dir)`` on ``world`` spawned processes.

    Returns ``(exit codes, hung)``: the processes still alive after ``timeout_s`` are
    killed and reported as hung. Each worker saves its results under ``out_dir`` itself.

    A run in which a worker was killed by a signal (gloo's threads can abort the process
    at teardown on a loaded machine: "terminate called without an active exception",
    SIGABRT) is run once more from a clean ``out_dir``, with a warning; a second signal,
    an exception (exit code 1) or a hang is returned as it is.
    """
    codes, hung = _spawn_once(target, world, args, out_dir, timeout_s)
    if not hung and any(code is not None and code < 0 for code in codes):
        import shutil
        import warnings

        warnings.warn(f"distributed workers died by signal (exit codes {codes}); rerun once",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        for entry in os.listdir(out_dir):  # the file store and any partial results
            path = os.path.join(out_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        codes, hung = _spawn_once(target, world, args, out_dir, timeout_s)
    return codes, hung


def _spawn_once(target: Callable[..., None], world: int, args: tuple, out_dir: str,
                timeout_s: float):  # fmt: skip
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=target, args=(rank, world, *args, out_dir)) for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [proc.is_alive() for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs], any(hung)


def main(rank: int, world_size: int, seed: int, out_dir: str) -> None:
    # the torch backend by default: the Triton interpreter is too slow for a 1-minute budget
    os.environ["FASTGRADSTATS_BACKEND"] = os.environ.get("FASTGRADSTATS_DIST_BACKEND", "torch")
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )
    from fastgradstats.dispatch import backend_for

    backend = backend_for(torch.device("cpu"), torch.float32, 2.0).__name__
    run_scenarios(SCENARIOS, rank, seed, out_dir, {"seed": seed, "backend": backend})


def run_scenarios(
    scenarios: dict[str, Any], rank: int, seed: int, out_dir: str, results: dict[str, Any]
) -> None:
    """Run each ``scenario(rank, seed)`` in turn (a barrier between them), save ``results``
    for the parent as ``rank{rank}.pt``, and tear the process group down."""
    try:
        for name, scenario in scenarios.items():
            try:
                results[name] = scenario(rank, seed)
            except Exception:
                # the other rank may now wait in a collective this one never joins: stop here
                results[name] = {"error": traceback.format_exc()}
                break
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
