"""What a user installs: the package without Triton, typing (py.typed, overloads), metadata,
and command lines that refuse bad arguments in one line (exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastgradstats

pytestmark = pytest.mark.backend_independent  # the subprocesses choose their own backend

PACKAGE = Path(fastgradstats.__file__).resolve().parent
REPO = PACKAGE.parent


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _run(args, env=None, cwd=None, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def no_triton(tmp_path):
    """(env, cwd) of a Python where ``import triton`` fails, as on a CPU-only install."""
    site = tmp_path / "site"
    (site / "triton").mkdir(parents=True)
    (site / "triton" / "__init__.py").write_text("raise ImportError('No module named triton')\n")
    (site / "fastgradstats").symlink_to(PACKAGE, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(site), PYTHONWARNINGS="ignore")
    env.pop("FASTGRADSTATS_BACKEND", None)
    return env, work


def test_triton_is_not_a_dependency():
    meta = _pyproject()["project"]
    assert not any(dep.startswith("triton") for dep in meta["dependencies"])
    assert any(dep.startswith("triton") for dep in meta["optional-dependencies"]["triton"])
    for extra in ("plot", "tensorboard", "wandb"):  # user extras, not only in [dev]
        assert meta["optional-dependencies"][extra]


def test_without_triton_clip_and_stats_work_and_the_kernels_are_explained(no_triton):
    env, cwd = no_triton
    code = textwrap.dedent(
        """
        import torch, fastgradstats as fgs
        from fastgradstats import dispatch
        assert not dispatch.triton_available()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        ref = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        ref.load_state_dict(model.state_dict())
        x = torch.randn(4, 7)
        model(x).pow(2).sum().backward(); ref(x).pow(2).sum().backward()
        total = fgs.clip_grad_norm_(model.parameters(), 0.1)
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        assert torch.equal(total, expected), (total, expected)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
        stats = fgs.grad_stats(model.named_parameters())
        assert stats.names[0] == "0.weight"
        try:
            fgs.grad_stats(model.parameters(), backend="triton")
        except RuntimeError as exc:
            print(exc)
        else:
            raise AssertionError("backend='triton' without Triton did not raise")
        """
    )
    result = _run([sys.executable, "-c", code], env, cwd)
    assert result.returncode == 0, result.stderr
    assert 'pip install "fastgradstats[triton]"' in result.stdout
    version = _run([sys.executable, "-m", "fastgradstats", "--version"], env, cwd)
    assert version.returncode == 0, version.stderr
    assert "Triton kernels: not installed" in version.stdout
    assert 'pip install "fastgradstats[triton]"' in version.stdout


def test_without_triton_the_demo_runs(no_triton, tmp_path):
    env, cwd = no_triton
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "fastgradstats", "demo", "--out", str(out), "--steps", "30"]
    result = _run([*cmd, "--quiet"], env, cwd)
    assert result.returncode == 0, result.stderr
    assert "triton" not in result.stderr.lower()
    assert (out / "summary.json").is_file()


def test_py_typed_ships_with_the_package():
    assert (PACKAGE / "py.typed").is_file()
    tool = _pyproject()["tool"]["setuptools"]
    assert "py.typed" in tool["package-data"]["fastgradstats"]


def test_metadata_is_complete():
    meta = _pyproject()["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
    assert meta["authors"] and meta["description"] and meta["keywords"]
    assert "Typing :: Typed" in meta["classifiers"]


DROP_IN = """
import torch
from torch import Tensor

import fastgradstats as fgs
from fastgradstats import GradStats

model = torch.nn.Linear(2, 2)
t: Tensor = fgs.clip_grad_norm_(model.parameters(), 1.0)
total, stats = fgs.clip_grad_norm_(model.named_parameters(), 1.0, return_stats=True)
u: Tensor = total
s: GradStats = stats
"""


@pytest.mark.slow
def test_the_drop_in_line_type_checks_under_mypy(tmp_path):
    pytest.importorskip("mypy")
    (tmp_path / "train.py").write_text(DROP_IN)
    # The wrong annotation must fail, or the check proves nothing.
    (tmp_path / "wrong.py").write_text(DROP_IN.replace("u: Tensor = total", "u: int = total"))
    env = {**os.environ, "MYPYPATH": str(REPO)}
    cache = str(tmp_path / "cache")
    args = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", cache]
    good = _run([*args, "train.py"], env, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _run([*args, "wrong.py"], env, tmp_path)
    assert bad.returncode == 1 and "wrong.py:11" in bad.stdout, bad.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "benchmarks", "--threads", "0"], "--threads: must be an integer >= 1"),
        (["-m", "benchmarks", "--tag", "a b"], "--tag: must be letters"),
        (["-m", "benchmarks", "--budget", "-1"], "--budget: must be a finite number > 0"),
        (["-m", "fastgradstats", "demo", "--out", "/proc/nope"], "cannot write the report"),
        (["-m", "fastgradstats", "demo", "--steps", "0"], "--steps: must be >= 1"),
    ],
)
def test_bad_command_line_arguments_exit_2_in_one_line(args, message):
    result = _run([sys.executable, *args], cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "copy bandwidth" not in result.stderr


def test_benchmark_help_lists_every_subcommand():
    from benchmarks.__main__ import SUBCOMMANDS

    result = _run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(SUBCOMMANDS) == {"codegen", "host", "host-ab", "gpu-check", "in-backward"}
    for name in SUBCOMMANDS:
        assert f"\n  {name} " in result.stdout
