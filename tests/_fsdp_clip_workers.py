"""Worker side of tests/test_distributed/test_upstream_fsdp_clip.py: torch's FSDP2 clip
test, per gloo rank.

Rewrites pytorch's test/distributed/_composable/fsdp/test_fully_shard_clip_grad_norm_.py
for the CPU: a tiny language model, sharded by ``fully_shard`` (1-D: 2 ranks) or by tensor
parallelism with sequence parallelism plus ``fully_shard`` (2-D: dp=2 x tp=2 on 4 ranks),
against a replicated (DDP) copy clipped by ``torch.nn.utils.clip_grad_norm_``. The model is
clipped by fastgradstats, once per available backend. ``main`` saves, per rank, what each
iteration saw to ``out_dir/rank{rank}.pt``; the pytest side asserts what upstream asserts.
"""

from __future__ import annotations

import copy
import faulthandler
import os
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

TIMEOUT = timedelta(seconds=60)
WORKER_LIMIT_S = 200  # after this a worker prints where it is stuck and exits
VOCAB, DIM, HIDDEN, SEQ, BATCH = 8, 8, 16, 8, 3
ITERATIONS = 3  # upstream runs 10; each one is the same check on new weights
MAX_NORM = 1.0  # as upstream; the vacuity check on the pytest side proves it clips
NORM_TYPES = {"1d": (2.0, 1.0, float("inf")), "2d": (2.0, 1.0, 3.0, float("inf"))}


class Block(nn.Module):
    """Pre-norm MLP block with a residual connection."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


def tensor_parallel(model: TinyLM, tp_mesh: Any) -> TinyLM:
    """Every parameter on the tp mesh (sequence parallel norms), as upstream's Transformer."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan: dict[str, Any] = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "out": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for i in range(len(model.blocks)):
        plan[f"blocks.{i}.norm"] = SequenceParallel()
        plan[f"blocks.{i}.up"] = ColwiseParallel(input_layouts=Shard(1))
        plan[f"blocks.{i}.down"] = RowwiseParallel(output_layouts=Shard(1))
    return parallelize_module(model, tp_mesh, plan)


def error_of(fn: Any) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_case(kind: str, norm_type: float, rank: int) -> list[dict[str, Any]]:
    """One upstream ``_test_clip_grad_norm`` run: fresh models, ITERATIONS iterations."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastgradstats as fgs

    torch.manual_seed(42)
    model = TinyLM()
    if kind == "1d":
        dp_mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        ref_model = DDP(copy.deepcopy(model))
    else:
        mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))
        dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]
        ref_model = DDP(copy.deepcopy(model), process_group=dp_mesh.get_group())
        model = tensor_parallel(model, tp_mesh)
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    ref_optim = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)

    # as upstream: the input depends on the data-parallel rank only
    torch.manual_seed(42 + dp_mesh.get_local_rank() + 1)
    inp = torch.randint(0, VOCAB, (BATCH, SEQ))
    vector_norm = lambda g: torch.linalg.vector_norm(g, norm_type).item()  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    iterations = []
    for _ in range(ITERATIONS):
        ref_optim.zero_grad()
        ref_model(inp).sum().backward()
        optim.zero_grad()
        model(inp).sum().backward()

        ref_grads = [p.grad.detach().clone() for p in ref_model.parameters()]
        local_grads = [p.grad.to_local().detach().clone() for p in model.parameters()]
        it: dict[str, Any] = {
            "placements": {n: repr(tuple(p.placements)) for n, p in model.named_parameters()},
            "grad_mismatch": {
                n: error_of(lambda r=r, p=p: torch.testing.assert_close(p.grad.full_tensor(), r))
                for n, r, p in zip(names, ref_grads, model.parameters())
            },
            "ref_norms_before": [vector_norm(g) for g in ref_grads],
            "local_norms_before": [vector_norm(g) for g in local_grads],
        }

        ref_total = torch.nn.utils.clip_grad_norm_(
            ref_model.parameters(), max_norm=MAX_NORM, norm_type=norm_type
        )
        # torch's DTensor path all-reduces through functional collectives; fastgradstats
        # calls dist.all_reduce (c10d.allreduce_): both are all-reduces
        comm_mode = CommDebugMode()
        with comm_mode:
            total = fgs.clip_grad_norm_(
                model.parameters(), max_norm=MAX_NORM, norm_type=norm_type, foreach=True
            )
        counts = {str(op): n for op, n in comm_mode.get_comm_counts().items() if n}
        all_reduces = counts.pop("c10d.allreduce_", 0) + counts.pop("c10d_functional.all_reduce", 0)
        it.update(
            ref_total=ref_total.clone(),
            total_type=type(total).__name__,
            total_placements=[repr(p) for p in getattr(total, "placements", ())],
            total_full=total.full_tensor() if hasattr(total, "full_tensor") else total,
            all_reduces=all_reduces,
            other_collectives=counts,
            ref_norms_after=[vector_norm(p.grad) for p in ref_model.parameters()],
            local_norms_after=[vector_norm(p.grad.to_local()) for p in model.parameters()],
            ref_unchanged=[
                bool(torch.count_nonzero(g)) and torch.equal(p.grad, g)
                for p, g in zip(ref_model.parameters(), ref_grads)
            ],
            local_unchanged=[
                bool(torch.count_nonzero(g)) and torch.equal(p.grad.to_local(), g)
                for p, g in zip(model.parameters(), local_grads)
            ],
        )
        iterations.append(it)
        ref_optim.step()
        optim.step()
    return iterations


def backends() -> list[str]:
    """Both backends (Triton through the interpreter), or the one $FASTGRADSTATS_BACKEND
    forces, as the ``backend`` fixture of tests/conftest.py does."""
    from fastgradstats import dispatch

    forced = os.environ.get(dispatch.ENV_BACKEND)
    if forced and forced != "auto":
        return [forced]
    names = ["torch"]
    if dispatch.triton_available() and dispatch.triton_interpreter_on():
        names.append("triton")
    return names


def main(rank: int, world_size: int, kind: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # up to 4 ranks on 2 cores
    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )
    results: dict[str, Any] = {}
    try:
        for backend in backends():
            os.environ["FASTGRADSTATS_BACKEND"] = backend
            for norm_type in NORM_TYPES[kind]:
                key = f"{backend}-{norm_type}"
                try:
                    results[key] = run_case(kind, norm_type, rank)
                except Exception:
                    # the other ranks may now wait in a collective this one never joins
                    results[key] = {"error": traceback.format_exc()}
                    return
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
