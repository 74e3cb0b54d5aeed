"""The `fastgradstats` command: --version, bench (inside and outside a checkout), usage.

The entry points run in subprocesses from a temporary working directory, as a user runs
them after `pip install`: the package under test is put on PYTHONPATH through a folder that
holds only a link to it, so the repository's `benchmarks/` is not importable there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastgradstats
from fastgradstats import cli

pytestmark = pytest.mark.backend_independent  # no gradient op routed by the environment

PACKAGE = Path(fastgradstats.__file__).resolve().parent
REPO = PACKAGE.parent


@pytest.fixture
def outside(tmp_path):
    """(env, cwd) for a run outside any checkout, importing the package under test."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "fastgradstats").symlink_to(PACKAGE, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), PYTHONWARNINGS="ignore")
    return env, work


def run(args, env, cwd, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def entry_points():
    """``python -m fastgradstats`` and, where installed, the ``fastgradstats`` script."""
    commands = [[sys.executable, "-m", "fastgradstats"]]
    script = shutil.which("fastgradstats")
    if script is not None:
        commands.append([script])
    return commands


def pyproject_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def test_version_matches_pyproject(outside):
    env, cwd = outside
    assert fastgradstats.__version__ == pyproject_version()
    for command in entry_points():
        result = run([*command, "--version"], env, cwd)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"fastgradstats {pyproject_version()} (torch ")


def benchmark_options() -> set[str]:
    """The option strings of the repository's `python -m benchmarks` parser."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import __main__ as bench_main
    finally:
        sys.path.remove(str(REPO))
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            bench_main.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return {
        opt
        for action in captured["parser"]._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }


@pytest.mark.slow
def test_bench_help_outside_a_checkout_lists_the_options(outside):
    env, cwd = outside
    expected = benchmark_options()
    assert expected == {flag for flag, _, _ in cli.BENCH_OPTIONS}  # the list cannot drift
    for command in entry_points():
        result = run([*command, "bench", "--help"], env, cwd)
        assert result.returncode == 0, result.stderr
        assert "usage: fastgradstats bench" in result.stdout
        listed = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout, re.M))
        assert expected <= listed, expected - listed
        assert "checkout" in result.stdout


def test_bench_outside_a_checkout_explains_and_fails(outside):
    env, cwd = outside
    result = run([sys.executable, "-m", "fastgradstats", "bench", "--quick"], env, cwd)
    assert result.returncode == 2
    assert "python -m benchmarks" in result.stderr and "--help" in result.stderr


def test_bench_help_in_a_checkout_is_the_benchmarks_own(outside):
    env, _ = outside
    result = run([sys.executable, "-m", "fastgradstats", "bench", "--help"], env, REPO)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m benchmarks" in result.stdout
    assert "--no-verify" in result.stdout


def test_top_level_help_lists_the_commands(outside):
    env, cwd = outside
    result = run([sys.executable, "-m", "fastgradstats", "--help"], env, cwd)
    assert result.returncode == 0, result.stderr
    for word in ("demo", "bench", "--version"):
        assert word in result.stdout


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out


def test_bad_steps_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["demo", "--out", str(tmp_path), "--steps", "0"])
    assert excinfo.value.code == 2


def test_bench_without_benchmarks_explains(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


def test_bench_passes_options_through(monkeypatch):
    seen = {}

    def fake_run_module(name, run_name, alter_sys):
        seen["argv"] = list(sys.argv)
        raise SystemExit(0)

    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(cli.runpy, "run_module", fake_run_module)
    assert cli.main(["bench", "--quick", "--device", "cpu"]) == 0
    assert seen["argv"] == ["benchmarks", "--quick", "--device", "cpu"]
    assert cli.main(["bench", "--help"]) == 0  # inside a checkout: the benchmarks' own help
    assert seen["argv"] == ["benchmarks", "--help"]


def test_version_needs_no_model_code(outside):
    env, cwd = outside
    code = (
        "import sys; from fastgradstats import cli; cli.build_parser(); "
        "print('fastgradstats.demo' in sys.modules)"
    )
    result = run([sys.executable, "-c", code], env, cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
