"""The ``fastgradstats demo`` runs: three small deep MLPs on synthetic data, on the CPU.

They are watched by :class:`~fastgradstats.GradMonitor`; :func:`run` prints the diagnosis and
writes a report folder (PNG plots, ``summary.json``, ``summary.md``). The command line
(:mod:`fastgradstats.cli`) only parses arguments and calls :func:`run`.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .clippers import ZClip
from .constants import CLIP_EPS
from .monitor import Diagnosis, GradMonitor


class ProgressBar:
    """A one-line progress bar on a stream (stderr); redraws in place on a terminal only."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 30):
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def _line(self, done: int, note: str) -> str:
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        return f"{self.label:<11} [{bar}] {done:>4}/{self.total} {elapsed:5.1f}s {note}"

    def update(self, done: int, note: str = "") -> None:
        if self.live:
            self.stream.write("\r" + self._line(done, note).ljust(100))
            self.stream.flush()

    def close(self, note: str = "", done: int | None = None) -> None:
        line = self._line(self.total if done is None else done, note)
        self.stream.write(("\r" + line.ljust(100) if self.live else line) + "\n")
        self.stream.flush()


@dataclass
class DemoRun:
    """One demo scenario: how to build the model and how to train it."""

    key: str
    title: str
    activation: str
    depth: int
    init_gain: float
    lr: float
    max_norm: float | None
    story: str
    histograms: bool = False  # also record per-layer |g| histograms (fp16 underflow plot)
    spikes: bool = False  # every SPIKE_EVERY steps one batch of 30x outlier inputs
    adaptive: bool = False  # clip with fastgradstats.ZClip instead of a fixed max_norm


RUNS = [
    DemoRun(
        "exploding",
        "Large init, no clipping",
        "relu",
        depth=10,
        init_gain=1.7,
        lr=0.004,
        max_norm=None,
        story="A 10-layer ReLU MLP with weights initialised 1.7/sqrt(2) = 1.2x too large "
        "(He init would be sqrt(2)), so the forward and backward signals grow with depth; "
        "plain SGD.",
    ),
    DemoRun(
        "clipped",
        "Large init, clipped by fastgradstats (max_norm=1)",
        "relu",
        depth=10,
        init_gain=1.7,
        lr=0.004,
        max_norm=1.0,
        story="The same network and data, with GradMonitor(max_norm=1.0) clipping.",
    ),
    DemoRun(
        "vanishing",
        "Deep sigmoid network",
        "sigmoid",
        depth=12,
        init_gain=1.0,
        lr=0.1,
        max_norm=None,
        story="A 12-layer sigmoid MLP: each layer shrinks the backward signal >= 4x. "
        "The monitor also records per-layer |g| histograms: the earliest layers' gradients "
        "fall below fp16's smallest normal (or flush to zero), so this fp32 run would "
        "lose them in fp16 without a loss scale.",
        histograms=True,
    ),
    DemoRun(
        "adaptive",
        "Outlier batches, clipped adaptively by ZClip",
        "relu",
        depth=10,
        init_gain=math.sqrt(2.0),
        lr=0.01,
        max_norm=None,
        story="A well-initialised 10-layer ReLU MLP (He init) hit by an outlier batch (inputs "
        "x30) every 40 steps: without clipping the first outlier step sends it to NaN. "
        "GradMonitor(max_norm=fastgradstats.ZClip(warmup_steps=10)) learns the usual "
        "gradient norm on the device and clips only the spikes.",
        spikes=True,
        adaptive=True,
    ),
]

IN_DIM, WIDTH, BATCH, N_SAMPLES = 32, 64, 64, 2048
SPIKE_EVERY, SPIKE_AT, SPIKE_SCALE = 40, 25, 30.0
HISTOGRAM_EVERY = 5  # histograms every 5th step: they cost more than the norms


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic regression: a smooth nonlinear function of 32 Gaussian features."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=gen)
    w = torch.randn(IN_DIM, 4, generator=gen) / math.sqrt(IN_DIM)
    y = torch.sin(2.0 * x @ w).sum(dim=1, keepdim=True)
    return x, y


def make_mlp(run: DemoRun, seed: int) -> nn.Sequential:
    """``depth`` Linear layers (width 64), weights ~ N(0, (gain / sqrt(fan_in))^2), bias 0."""
    gen = torch.Generator().manual_seed(seed + 1)
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[run.activation]
    layers: list[nn.Module] = []
    dims = [IN_DIM] + [WIDTH] * (run.depth - 1) + [1]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=gen))
            linear.weight.mul_(run.init_gain / math.sqrt(fan_in))
            linear.bias.zero_()
        layers.append(linear)
        if i < run.depth - 1:
            layers.append(act())
    return nn.Sequential(*layers)


def zclip_threshold(clipper: ZClip) -> torch.Tensor:
    """The norm above which ``clipper`` clips the next step (``mean + z_thresh * std`` of its
    statistics; NaN during warm-up), a 0-d device tensor: read without a host sync."""
    state = clipper.state_dict()
    mean, std = state["mean"], state["var"].sqrt()
    level = mean + clipper.z_thresh * (std + CLIP_EPS)
    if clipper.mode == "percentile":
        level = mean + clipper.z_thresh * std
    warm = state["count"] < max(clipper.warmup_steps, 1)
    return torch.where(warm, torch.full_like(level, math.nan), level)


def train(
    run: DemoRun, steps: int, seed: int, quiet: bool, thresholds: list[float] | None = None
) -> tuple[GradMonitor, list[float]]:
    """Train one scenario for ``steps`` SGD steps; returns the monitor and the losses.

    ``thresholds``: for an adaptive run, filled with the clipper's threshold at each step
    (what the plot draws)."""
    torch.manual_seed(seed)
    x, y = make_data(seed)
    model = make_mlp(run, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    clipper = ZClip(warmup_steps=10) if run.adaptive else None
    levels: list[torch.Tensor] = []
    monitor = GradMonitor(
        model,
        max_norm=clipper if clipper is not None else run.max_norm,
        history=steps,
        histograms=run.histograms,
        histogram_every=HISTOGRAM_EVERY,
        histogram_history=max(1, -(-steps // HISTOGRAM_EVERY)),
        histogram_dtypes=[torch.float16],
    )
    bar = None if quiet else ProgressBar(steps, run.key)
    gen = torch.Generator().manual_seed(seed + 2)
    losses = []
    for step in range(steps):
        batch = torch.randint(0, N_SAMPLES, (BATCH,), generator=gen)
        inputs = x[batch]
        if run.spikes and step % SPIKE_EVERY == SPIKE_AT:
            inputs = inputs * SPIKE_SCALE  # an outlier batch: a gradient spike
        loss = nn.functional.mse_loss(model(inputs), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clipper is not None:
            levels.append(zclip_threshold(clipper))  # the level this step is judged against
        monitor.step()  # per-layer stats (and clipping) in one pass, no sync
        optimizer.step()
        losses.append(loss.detach())
        if step % 10 == 9 or step == steps - 1:  # the demo syncs here, never in step()
            current = losses[-1].item()
            if bar is not None:
                bar.update(step + 1, f"loss {current:.3g}")
            if not math.isfinite(current):
                stopped = step + 1
                break
    else:
        stopped = None
    values = torch.stack(losses).tolist()
    if thresholds is not None and levels:
        thresholds.extend(torch.stack(levels).tolist())
    if bar is not None:
        end = f"diverged, stopped after {stopped} steps" if stopped else f"{values[-1]:.3g}"
        bar.close(f"loss {values[0]:.3g} -> {end}", done=stopped)
    return monitor, values


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _write_markdown(path: Path, results: list[dict[str, Any]], seconds: float) -> None:
    lines = [
        "# fastgradstats demo report",
        "",
        f"{len(RUNS)} small deep MLPs trained with SGD on the same synthetic regression task, "
        "watched by `fastgradstats.GradMonitor` (one fused stats pass per step, no host "
        f"sync). Total time {seconds:.1f} s.",
        "",
        "| run | verdict | first NaN/Inf step | clipped steps | loss start -> end | plot |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r["diagnosis"]
        first = d["first_nonfinite_step"]
        lines.append(
            f"| {r['key']} | **{d['verdict']}** | {first if first is not None else '-'} | "
            f"{d['clipped_steps']}/{d['steps']} | {_fmt(r['loss_start'])} -> "
            f"{_fmt(r['loss_end'])} | [{r['plot']}]({r['plot']}) |"
        )
    for r in results:
        lines += ["", f"## {r['key']}: {r['title']}", "", r["story"], ""]
        lines += [f"- {text}" for text in r["diagnosis"]["findings"]]
        lines += ["", f"![{r['key']}]({r['plot']})"]
        if r.get("histogram_plot"):
            lines += ["", f"![{r['key']} histograms]({r['histogram_plot']})"]
    path.write_text("\n".join(lines) + "\n")


def _run_one(
    run: DemoRun, steps: int, seed: int, quiet: bool, out: Path, can_plot: bool, say: Any
) -> dict[str, Any]:
    thresholds: list[float] = []
    monitor, losses = train(run, steps, seed, quiet, thresholds)
    diagnosis: Diagnosis = monitor.report()
    plot_name = f"{run.key}.png"
    if can_plot:
        from .monitor.plots import plot_history

        history = monitor.history()
        plot_history(
            history,
            out / plot_name,
            title=f"{run.key}: {run.title}",
            # one value per step; every step is recorded in the demo (every=1)
            threshold=thresholds[: len(history)] if thresholds else None,
        )
    hist_plot = None
    if can_plot and run.histograms:
        hist_plot = f"{run.key}_histograms.png"
        monitor.plot_histograms(
            out / hist_plot, dtype=torch.float16, title=f"{run.key}: |g| histograms vs fp16"
        )
    say(f"\n== {run.key}: {run.title}\n{diagnosis.summary()}\n")
    return {
        "key": run.key,
        "title": run.title,
        "story": run.story,
        "plot": plot_name if can_plot else None,
        "histogram_plot": hist_plot,
        "loss_start": losses[0],
        "loss_end": losses[-1],
        "diagnosis": diagnosis.as_dict(),
    }


def run(
    out: str | Path = "fgs-report", steps: int = 200, seed: int = 0, quiet: bool = False
) -> int:
    """Run the three scenarios, print the diagnosis, write the report folder; returns 0."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    try:
        import matplotlib  # noqa: F401

        can_plot = True
    except ImportError:
        can_plot = False
        say("matplotlib is not installed: skipping the plots (pip install 'fastgradstats[plot]')")

    say(f"fastgradstats demo: {len(RUNS)} deep MLPs x {steps} SGD steps on CPU, report -> {out}/")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide layers: threads only add overhead
    try:
        results = [_run_one(r, steps, seed, quiet, out, can_plot, say) for r in RUNS]
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    summary = {
        "fastgradstats_demo": 1,
        "steps": steps,
        "seed": seed,
        "seconds": round(seconds, 2),
        "torch": torch.__version__,
        "runs": [
            {**r, "loss_start": _fmt(r["loss_start"]), "loss_end": _fmt(r["loss_end"])}
            for r in results
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_markdown(out / "summary.md", results, seconds)
    files = sorted(p.name for p in out.iterdir())
    say(f"wrote {out}/: {', '.join(files)}  ({seconds:.1f} s)")
    return 0
