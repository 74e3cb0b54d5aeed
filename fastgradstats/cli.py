"""Command line: ``fastgradstats demo`` (the first thing to run) and ``fastgradstats bench``.

``demo`` trains three small deep networks on synthetic data on the CPU, watches their
gradients with :class:`~fastgradstats.GradMonitor`, prints the diagnosis, and writes a
report folder (PNG plots, ``summary.json``, ``summary.md``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

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
        story="A 12-layer sigmoid MLP: each layer shrinks the backward signal >= 4x.",
    ),
]

IN_DIM, WIDTH, BATCH, N_SAMPLES = 32, 64, 64, 2048


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


def train(run: DemoRun, steps: int, seed: int, quiet: bool) -> tuple[GradMonitor, list[float]]:
    """Train one scenario for ``steps`` SGD steps; returns the monitor and the losses."""
    torch.manual_seed(seed)
    x, y = make_data(seed)
    model = make_mlp(run, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    monitor = GradMonitor(model, max_norm=run.max_norm, history=steps)
    bar = None if quiet else ProgressBar(steps, run.key)
    gen = torch.Generator().manual_seed(seed + 2)
    losses = []
    for step in range(steps):
        batch = torch.randint(0, N_SAMPLES, (BATCH,), generator=gen)
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
        "Three small deep MLPs trained with SGD on the same synthetic regression task, "
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
    path.write_text("\n".join(lines) + "\n")


def _run_one(
    run: DemoRun, args: argparse.Namespace, out: Path, can_plot: bool, say: Any
) -> dict[str, Any]:
    monitor, losses = train(run, args.steps, args.seed, args.quiet)
    diagnosis: Diagnosis = monitor.report()
    plot_name = f"{run.key}.png"
    if can_plot:
        from .plot import plot_history

        plot_history(monitor.history(), out / plot_name, title=f"{run.key}: {run.title}")
    say(f"\n== {run.key}: {run.title}\n{diagnosis.summary()}\n")
    return {
        "key": run.key,
        "title": run.title,
        "story": run.story,
        "plot": plot_name if can_plot else None,
        "loss_start": losses[0],
        "loss_end": losses[-1],
        "diagnosis": diagnosis.as_dict(),
    }


def demo(args: argparse.Namespace) -> int:
    """Run the three scenarios, print the diagnosis, write the report folder."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    try:
        import matplotlib  # noqa: F401

        can_plot = True
    except ImportError:
        can_plot = False
        say("matplotlib is not installed: skipping the plots (pip install 'fastgradstats[plot]')")

    say(f"fastgradstats demo: 3 deep MLPs x {args.steps} SGD steps on CPU, report -> {out}/")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide layers: threads only add overhead
    try:
        results = [_run_one(run, args, out, can_plot, say) for run in RUNS]
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    summary = {
        "fastgradstats_demo": 1,
        "steps": args.steps,
        "seed": args.seed,
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


def bench(args: argparse.Namespace) -> int:
    """Run the repository's benchmark summary (``python -m benchmarks``) when available."""
    # A console script's sys.path starts at its bin/ folder, not at the checkout it is run
    # from, so look in the working directory too.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if importlib.util.find_spec("benchmarks") is None:
        print(
            "The benchmarks live in the fastgradstats repository, not in the installed "
            "package: clone it and run `python -m benchmarks` (or "
            "`pytest benchmarks/`) from its root.",
            file=sys.stderr,
        )
        return 2
    saved = sys.argv
    sys.argv = ["benchmarks", *args.bench_args]
    try:
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgradstats",
        description="Fused per-layer gradient statistics and clipping for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_demo = sub.add_parser(
        "demo",
        help="train 3 small deep nets on CPU and diagnose their gradients (~10-20 s)",
        description="Train an exploding, a clipped and a vanishing deep MLP on synthetic "
        "data, print the gradient diagnosis, and write PNG plots + JSON/markdown summary.",
    )
    p_demo.add_argument("--out", default="fgs-report", help="report folder (default fgs-report)")
    p_demo.add_argument("--steps", type=_positive, default=200, help="SGD steps per run")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bar or diagnosis text")
    p_demo.set_defaults(func=demo)
    p_bench = sub.add_parser(
        "bench",
        help="run the benchmark summary (python -m benchmarks, from a repository checkout)",
    )
    p_bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to benchmarks")
    p_bench.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgradstats`` command; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # argparse's REMAINDER drops a leading "--option": hand the rest over untouched
        return bench(argparse.Namespace(bench_args=argv[1:]))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
