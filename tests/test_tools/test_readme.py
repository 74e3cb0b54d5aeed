"""The README's Python snippets run as written, on a tiny model (a snippet that drifts from
the API fails here). Each block is run or exempted with its reason, so a new block cannot
go unnoticed."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastgradstats

README = Path(__file__).resolve().parents[2] / "README.md"

# Blocks (by their first code line) not run here, with where the same calls are tested.
EXEMPT = {
    "import lightning.pytorch as pl": "placeholders; "
    "tests/test_integrations/test_integrations_lightning.py",
    "from fastgradstats.integrations.huggingface import attach": "placeholders (`...`); "
    "tests/test_integrations/test_integrations_hf.py",
    "import torch": "needs torchrun; the same calls run in tests/_dist_workers.py",
    "from fastgradstats.distributed import fsdp1_grads": "needs an FSDP1 process group; "
    "tests/_fsdp1_workers.py",
    "from fastgradstats.distributed import deepspeed_zero_grads": "needs a DeepSpeed engine; "
    "tests/_fsdp1_workers.py",
    "from fastgradstats.distributed import combine_pipeline_norm, combine_pipeline_stats": (
        "needs a pipeline group; tests/test_distributed/test_distributed.py"
    ),
}


def python_blocks() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.M | re.S)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


class TinyLM(torch.nn.Module):
    """``model(batch).loss``, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 1)

    def forward(self, batch):
        return SimpleNamespace(loss=self.head(self.body(batch)).pow(2).mean())


class Logger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, row: dict, step: int) -> None:
        self.rows.append((step, row))


def namespace(tmp_path) -> dict:
    torch.manual_seed(0)
    model = TinyLM()
    loader = [torch.randn(4, 6) * 3 for _ in range(3)]
    model(loader[-1]).loss.backward()  # blocks that only read gradients find some
    return {
        "torch": torch,
        "fgs": fastgradstats,  # imported by the first block, as a reader goes on from there
        "model": model,
        "loader": loader,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
        "logger": Logger(),
        "path": tmp_path / "ckpt.pt",
        "loss": model(loader[0]).loss,
    }


def test_every_block_is_run_or_exempted():
    firsts = [block.strip().splitlines()[0] for block in python_blocks()]
    assert len(firsts) >= 5
    runnable = [f for f in firsts if f not in EXEMPT]
    assert len(runnable) == len(firsts) - len(EXEMPT), "an exemption matches no block"


RUNNABLE = [
    (i, block)
    for i, block in enumerate(python_blocks())
    if block.strip().splitlines()[0] not in EXEMPT
]


@pytest.mark.parametrize(("index", "block"), RUNNABLE, ids=[f"block{i}" for i, _ in RUNNABLE])
def test_readme_block_runs(index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # plots land here
    scope = namespace(tmp_path)
    before = [p.detach().clone() for p in scope["model"].parameters()]
    exec(compile(block, f"README.md block {index}", "exec"), scope)
    after = list(scope["model"].parameters())
    if "step()" in block:
        assert any(not torch.equal(a, b) for a, b in zip(after, before)), "no step was taken"
    if "stats" in scope:
        assert scope["stats"].names[0] == "body.0.weight"
    for opt in (scope["optimizer"], scope["opt"]):
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
