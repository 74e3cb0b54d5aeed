"""``python -m benchmarks host-ab --baseline COMMIT``: host cost of this checkout against an
earlier commit, in one process.

``python -m benchmarks host`` gives each call's ratio to a floor; comparing two such runs
made one after the other mixes in whatever else the machine did between them (on a shared
2-core machine the floor itself moves by 30%). Here the baseline's ``fastgradstats`` is
extracted from git (``git archive COMMIT fastgradstats``) into a temporary folder and
imported as ``fastgradstats_baseline`` beside this checkout's package; both get the same
gradients, ``kernels.launch`` is stubbed in both (the Python cost alone, as in ``host``),
and every round times a batch of the baseline's call and a batch of ours, in alternating
order. The figure per call is the median of the per-round ratios ``ours / baseline``
(below 1: ours is cheaper), with the spread and the launch counts of both sides.

The workloads and calls are those of ``python -m benchmarks host`` (GPT-2-124M: 148 fp32
tensors; 10,000 x 64 elements), on the Triton path through ``TRITON_INTERPRET=1`` on a
CPU. A call the baseline lacks is skipped. Not a test, no verdict: numbers depend on the
machine; the JSON records it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .host import RESULTS, calls
from .provenance import short_commit

BASELINE = "fastgradstats_baseline"
ROOT = Path(__file__).resolve().parent.parent


def _import_baseline(commit: str, folder: Path) -> Any:
    """``fastgradstats`` as of ``commit``, imported as ``fastgradstats_baseline`` (the
    package imports itself relatively, so a renamed copy is a separate module tree)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "fastgradstats"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "fastgradstats").rename(folder / BASELINE)
    sys.path.insert(0, str(folder))
    importlib.import_module(f"{BASELINE}.kernels")  # the launch point, stubbed below
    return importlib.import_module(BASELINE)


def _launches(kernels: Any, call: Any) -> int:
    counts: Counter[str] = Counter()
    kernels.launch = lambda kernel, grid, *a, **k: counts.update([kernel.__name__])
    call()
    kernels.launch = _stub
    return sum(counts.values())


def _stub(*args: Any, **kwargs: Any) -> None:
    return None


def compare(baseline: Any, ours: Any, rounds: int) -> list[dict[str, Any]]:
    """Per workload and call: the median over ``rounds`` of ours / baseline (host time of
    a batch of calls, launches stubbed), the spread, and the launches per call."""
    import torch

    from .host import _workload

    rows = []
    for workload in ("gpt2-124m", "tiny10k"):
        params = _workload(workload, torch.device("cpu"))
        theirs_calls, our_calls = calls(baseline, params), calls(ours, params)
        batch = 20 if workload == "gpt2-124m" else 3
        for name, our_call in our_calls.items():
            their_call = theirs_calls[name]
            try:
                their_call()  # warm-up: plans and tables built
            except Exception as exc:  # a call the baseline lacks or refuses
                print(f"{workload} {name}: baseline fails ({exc!r}), skipped")
                continue
            our_call()
            ratios = []
            for r in range(rounds):
                order = (their_call, our_call) if r % 2 == 0 else (our_call, their_call)
                spent = {}
                for call in order:
                    start = time.perf_counter()
                    for _ in range(batch):
                        call()
                    spent[call] = time.perf_counter() - start
                ratios.append(spent[our_call] / spent[their_call])
            rows.append({
                "workload": workload, "call": name,
                "ours_over_baseline": round(statistics.median(ratios), 3),
                "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                "launches_baseline": _launches(baseline.kernels, their_call),
                "launches_ours": _launches(ours.kernels, our_call),
            })  # fmt: skip
            row = rows[-1]
            print(f"  {workload:<10}{name:<32}{row['ours_over_baseline']:>8.3f}"
                  f"   [{row['min']:.2f}, {row['max']:.2f}]"
                  f"{row['launches_baseline']:>5} ->{row['launches_ours']:>2}",
                  flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks host-ab",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--baseline", required=True, help="a commit of this repository")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"folder of host-ab-cpu-<date>-<commit>.json, {RESULTS}")  # fmt: skip
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            raise RuntimeError("set TRITON_INTERPRET=1 before importing triton")
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton path on CPU tensors (stubbed)
    import torch

    torch.set_num_threads(1)
    commit = short_commit()
    with tempfile.TemporaryDirectory() as folder:
        baseline = _import_baseline(args.baseline, Path(folder))
        import fastgradstats as ours
        import fastgradstats.kernels

        baseline.kernels.launch = _stub
        ours.kernels.launch = _stub
        print(f"ours ({commit}) / baseline ({args.baseline}), median of {args.rounds} "
              "interleaved rounds, [min, max], launches baseline -> ours")  # fmt: skip
        rows = compare(baseline, ours, args.rounds)
    result = {
        "meta": {
            "baseline": args.baseline, "ours": commit, "rounds": args.rounds,
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_avg": os.getloadavg()[0], "torch": torch.__version__,
            "method": "launches stubbed; one process; median of per-round ratios",
        },
        "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host-ab-cpu-{result['meta']['date_utc'][:10]}-{commit}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {path}")
    return 0


__all__ = ["compare", "main"]
