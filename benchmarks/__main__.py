"""``python -m benchmarks``: the summary table of fastgradstats against torch.

Examples::

    python -m benchmarks                       # every workload and op, CUDA if present
    python -m benchmarks --device cpu --workloads gpt2-124m-fp32
    python -m benchmarks --quick --out /tmp/b  # tiny sizes, seconds (CI)
    python -m benchmarks --sweep               # also the size / tensor-count sweeps + PNGs
    python -m benchmarks codegen --out DIR     # offline sm_90/sm_80 PTX/SASS report (no GPU)
    python -m benchmarks host                  # host cost per call, launches stubbed
    python -m benchmarks host-ab --baseline C  # the same, this checkout / commit C, one process
    python -m benchmarks gpu-check             # everything that needs a GPU, one command
    python -m benchmarks in-backward           # GPT-2 124M, CPU: stats during vs after backward
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .ops import OP_NAMES
from .provenance import REPO_ROOT
from .suite import (
    Settings,
    default_device,
    format_table,
    results_path,
    run_suite,
    write_json,
)
from .workloads import WORKLOAD_NAMES

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


# The subcommands, each a module with its own main(argv) and --help.
SUBCOMMANDS = {
    "codegen": ("benchmarks.codegen", "offline sm_90/sm_80 PTX/SASS report (no GPU needed)"),
    "host": ("benchmarks.host", "host cost per call with the kernel launches stubbed"),
    "host-ab": ("benchmarks.host_ab", "host cost of this checkout against a commit, one process"),
    "gpu-check": ("benchmarks.gpu_check", "everything that needs a GPU, in one command"),
    "in-backward": ("benchmarks.in_backward", "GPT-2 on the CPU: stats during vs after backward"),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _tag(text: str) -> str:
    if text and not text.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"must be letters, digits, '-' or '_', got {text!r}")
    return text


def _subcommand_epilog() -> str:
    lines = ["subcommands (each has its own --help):"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the suite's options; a bad value exits with status 2 and one line, before any work."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        usage="python -m benchmarks [codegen|host|host-ab|gpu-check|in-backward] [OPTIONS]",
        description="Time fastgradstats against torch on model-shaped gradients.",
        epilog=_subcommand_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats (seconds; for CI)")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")  # fmt: skip
    parser.add_argument("--workloads", nargs="+", choices=WORKLOAD_NAMES,
                        default=list(WORKLOAD_NAMES), metavar="NAME",
                        help=f"subset of {', '.join(WORKLOAD_NAMES)}")  # fmt: skip
    parser.add_argument("--ops", nargs="+", choices=OP_NAMES, default=list(OP_NAMES),
                        metavar="OP", help=f"subset of {', '.join(OP_NAMES)}")  # fmt: skip
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default=None,
                        help="fastgradstats backend (default: env or auto)")  # fmt: skip
    parser.add_argument("--budget", type=_positive_float, default=None,
                        help="timing seconds per workload x op (3; quick 0.05)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the results JSON (default {DEFAULT_OUT}; "
                             "--quick writes JSON only when --out is given)")  # fmt: skip
    parser.add_argument("--sweep", action="store_true",
                        help="also run the size and tensor-count sweeps and plot them")  # fmt: skip
    parser.add_argument(
        "--tag",
        type=_tag,
        default="",
        help="appended to the results file name: <device>-<date>-<tag>.json",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the correctness check against torch before timing")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite from command-line arguments; print the table; return the result."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    settings = Settings(
        device=device,
        workloads=args.workloads,
        ops=args.ops,
        quick=args.quick,
        backend=args.backend,
        budget_s=args.budget,
        verify=args.verify,
    )
    result = run_suite(settings, log=sys.stderr)
    out_dir = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    suffix = ("-quick" if args.quick else "") + (f"-{args.threads}thread" if args.threads else "")
    if args.tag:
        suffix += f"-{args.tag}"
    if args.sweep:
        from .sweep import plot_sweep, run_sweep

        result["sweep"] = run_sweep(settings, log=sys.stderr)
        if out_dir is not None:
            prefix = results_path(out_dir, result, suffix).with_suffix("")
            pictures = plot_sweep(
                result["sweep"],
                result["copy_bandwidth"]["gbps"],
                f"{result['meta']['device_name']}, {result['meta']['date_utc'][:10]}",
                Path(f"{prefix}-sweep"),
            )
            result["sweep"]["plots"] = [p.name for p in pictures]
    print(format_table(result))
    if out_dir is not None:
        path = write_json(result, results_path(out_dir, result, suffix))
        print(f"results written to {path}")
    failed = [r for r in result["results"] if r["check"] is not None and not r["check"]["ok"]]
    if failed:
        names = ", ".join(f"{r['workload']}/{r['op']}" for r in failed)
        print(f"CORRECTNESS CHECK FAILED for {names}: these timings measure a wrong result",
              file=sys.stderr)  # fmt: skip
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[sys.argv[1]][0])
        sys.exit(module.main(sys.argv[2:]))
    outcome = main()
    sys.exit(1 if any(r["check"] and not r["check"]["ok"] for r in outcome["results"]) else 0)
