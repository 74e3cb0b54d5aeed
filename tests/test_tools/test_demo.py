"""The `fastgradstats demo` runs (fastgradstats.demo), through the command line too."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from fastgradstats import cli, demo


def test_demo_writes_the_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert cli.main(["demo", "--out", str(out), "--steps", "40", "--seed", "1"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"summary.json", "summary.md", "exploding.png", "clipped.png", "vanishing.png"} <= names
    assert "adaptive.png" in names
    for png in ("exploding.png", "clipped.png", "vanishing.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["key"]: r["diagnosis"] for r in summary["runs"]}
    assert runs["exploding"]["verdict"] == "exploding"
    assert runs["exploding"]["first_nonfinite_step"] is not None
    assert runs["clipped"]["nonfinite_steps"] == 0
    # far above max_norm but not growing: clipped, not exploding (issue 20)
    assert runs["clipped"]["verdict"] == "clipped"
    assert runs["clipped"]["contained_by_clipping"] is False
    assert runs["vanishing"]["verdict"] == "vanishing"
    # ZClip clips the outlier steps only, and the run survives them
    adaptive = runs["adaptive"]
    assert adaptive["verdict"] == "healthy" and adaptive["nonfinite_steps"] == 0
    assert 0 < adaptive["clipped_steps"] <= 4
    assert any(f.startswith("Adaptive clipping scaled") for f in adaptive["findings"])
    markdown = (out / "summary.md").read_text()
    assert "![vanishing](vanishing.png)" in markdown and "| exploding |" in markdown
    # the vanishing run records histograms: its early layers underflow fp16
    data = (out / "vanishing_histograms.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "![vanishing histograms](vanishing_histograms.png)" in markdown
    fp16 = [f for f in runs["vanishing"]["findings"] if "fp16's smallest normal" in f]
    assert any("`0.weight`" in f and "flush to zero" in f for f in fp16)
    assert not any("fp16" in f for f in runs["exploding"]["findings"])
    captured = capsys.readouterr()
    assert "verdict: VANISHING" in captured.out and "wrote" in captured.out


def test_demo_quiet_prints_nothing(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "12", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (tmp_path / "summary.json").exists()


def test_progress_bar_on_a_non_terminal_prints_one_line():
    stream = io.StringIO()
    bar = demo.ProgressBar(50, "run", stream=stream)
    bar.update(10, "loss 1")
    bar.close("done", done=30)
    text = stream.getvalue()
    assert text.count("\n") == 1 and "30/50" in text and "done" in text


def test_python_dash_m_runs(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "fastgradstats", "demo", "--out", str(tmp_path), "--steps", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "verdict" in result.stdout
    assert (tmp_path / "summary.md").exists()


def test_run_writes_the_report_without_the_command_line(tmp_path, capsys):
    assert demo.run(out=tmp_path / "r", steps=6, seed=2, quiet=True) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["seed"] == 2
    assert [r["key"] for r in summary["runs"]] == [r.key for r in demo.RUNS]
    assert capsys.readouterr().out == ""
