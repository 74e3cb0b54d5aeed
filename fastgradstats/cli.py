"""Command line: ``fastgradstats demo`` (the first thing to run), ``fastgradstats bench``,
``fastgradstats --version``.

This module only parses arguments; the demo's training code lives in
:mod:`fastgradstats.demo`, the benchmarks in the repository's ``benchmarks/`` folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
import textwrap

_BENCH_DESCRIPTION = (
    "Run the benchmark summary of fastgradstats against torch (`python -m benchmarks`). The "
    "benchmarks live in the fastgradstats repository, not in the installed package: run this "
    "from the root of a checkout. Every option is passed to `python -m benchmarks` unchanged."
)

# The options of `python -m benchmarks`, for `fastgradstats bench --help` where the benchmarks
# are not importable (an installed package outside a checkout). tests/test_tools/test_cli.py
# checks this list against benchmarks/__main__.py so the two cannot drift apart.
BENCH_OPTIONS: list[tuple[str, str, str]] = [
    ("--quick", "", "tiny sizes and few repeats (seconds; for CI)"),
    ("--device", "{cpu,cuda}", "default: cuda when available, else cpu"),
    ("--workloads", "NAME [NAME ...]", "subset of the model-shaped workloads"),
    ("--ops", "OP [OP ...]", "subset of the timed operations"),
    ("--backend", "{auto,torch,triton}", "fastgradstats backend (default: env or auto)"),
    ("--budget", "SECONDS", "timing seconds per workload x op (3; quick 0.05)"),
    ("--out", "DIR", "folder for the results JSON"),
    ("--sweep", "", "also run the size and tensor-count sweeps and plot them"),
    ("--tag", "TAG", "appended to the results file name"),
    ("--threads", "N", "torch CPU threads (default: torch's choice)"),
    ("--no-verify", "", "skip the correctness check against torch before timing"),
]


def version() -> str:
    """The version of the imported package (kept equal to pyproject.toml's by a test)."""
    from . import __version__

    # Not importlib.metadata: an editable install of another checkout would answer for it.
    return __version__


def version_line() -> str:
    """``fastgradstats X (torch Y; Triton kernels: ...)``: says how to get the kernels if absent."""
    import torch

    from .dispatch import TRITON_INSTALL_HINT, triton_available

    kernels = "available" if triton_available() else f"not installed. {TRITON_INSTALL_HINT}"
    return f"fastgradstats {version()} (torch {torch.__version__}; Triton kernels: {kernels})"


def _find_benchmarks() -> bool:
    # A console script's sys.path starts at its bin/ folder, not at the checkout it is run
    # from, so look in the working directory too.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.util.find_spec("benchmarks") is not None


def _bench_help() -> str:
    lines = [
        "usage: fastgradstats bench [OPTIONS]",
        "",
        textwrap.fill(_BENCH_DESCRIPTION, width=79),
        "",
        "options (of python -m benchmarks):",
        "  -h, --help            show this help message and exit",
    ]
    for flag, metavar, text in BENCH_OPTIONS:
        head = f"  {flag} {metavar}".rstrip()
        lines.append(f"{head:<24}{text}" if len(head) < 23 else f"{head}\n{'':<24}{text}")
    return "\n".join(lines) + "\n"


def bench(bench_args: list[str]) -> int:
    """Run the repository's benchmark summary (``python -m benchmarks``) when available."""
    if not _find_benchmarks():
        if any(arg in ("-h", "--help") for arg in bench_args):
            sys.stdout.write(_bench_help())
            return 0
        print(
            "The benchmarks live in the fastgradstats repository, not in the installed "
            "package: clone it and run `python -m benchmarks` (or `pytest benchmarks/`, or "
            "`fastgradstats bench`) from its root. `fastgradstats bench --help` lists the "
            "options.",
            file=sys.stderr,
        )
        return 2
    saved = sys.argv
    sys.argv = ["benchmarks", *bench_args]
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


def _writable_dir(text: str) -> str:
    """``--out``: a folder the demo can write to, created here so a bad path fails at once."""
    path = os.path.abspath(text)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".fastgradstats-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot write the report to {text!r}: {exc.strerror or exc}"
        ) from None
    return text


def _demo(args: argparse.Namespace) -> int:
    from . import demo  # imported here: --version and bench need no model code

    return demo.run(out=args.out, steps=args.steps, seed=args.seed, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastgradstats`` command."""
    parser = argparse.ArgumentParser(
        prog="fastgradstats",
        description="Fused per-layer gradient statistics and clipping for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=version_line(), help="print it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_demo = sub.add_parser(
        "demo",
        help="train 4 small deep nets on CPU and diagnose their gradients (~10 s)",
        description="Train four deep MLPs on synthetic data (one exploding, the same clipped, "
        "one vanishing, one hit by outlier batches and clipped adaptively), print the "
        "gradient diagnosis, and write PNG plots + a JSON/markdown summary.",
    )
    p_demo.add_argument(
        "--out",
        type=_writable_dir,
        default="fgs-report",
        help="report folder, created if missing (default fgs-report)",
    )
    p_demo.add_argument("--steps", type=_positive, default=200, help="SGD steps per run")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bar or diagnosis text")
    p_demo.set_defaults(func=_demo)
    # Listed for the overview only: main() hands `bench ...` to bench() before argparse,
    # whose REMAINDER would drop a leading "--option".
    sub.add_parser(
        "bench",
        help="run the benchmark summary (python -m benchmarks, from a repository checkout)",
        description=_BENCH_DESCRIPTION,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgradstats`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
