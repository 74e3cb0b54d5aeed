"""``python -m benchmarks codegen --out DIR``: what the Triton kernels compile to, no GPU needed.

Every kernel is compiled offline (``triton.compile`` with a ``GPUTarget``, the ptxas and
cuobjdump shipped in Triton's wheel) for sm_90 and sm_80, for every supported gradient
dtype, with the constexprs and ``num_warps`` the host launches with (the same
``stats_config`` / ``finalize_config`` / ``elementwise_config`` helpers the launchers
use). For each it records, in ``DIR/codegen.json``::

    {kernel, variant, dtype, target, role, ptx, num_warps, constexprs, regs, spills,
     vector_loads, vector_stores, sass_per_element, loop_instructions, loop_elements,
     shared, resident_warps, load_bytes_per_thread, bytes_in_flight}

* ``role``: ``"grad"`` for a kernel that reads gradient memory (and may write it),
  ``"write"`` for one that only writes it (the zero kernel), else ``"aux"``;
* ``vector_loads`` / ``vector_stores``: 128-bit global accesses in the PTX
  (``ld.global.v4.b32``, ``ld.global.v2.b64``, ...);
* ``regs`` / ``spills``: from ``ptxas -v`` on that PTX (spill stores + spill loads, bytes);
* ``sass_per_element``: the SASS instructions one thread executes per gradient element in
  the steady state: the instructions of the hot loop (the innermost backward branch whose
  body loads the most gradient bytes; ptxas may unroll it), divided by the elements the
  body loads per thread (the widths of its ``LDG`` instructions over the element size);
* ``shared``: bytes of shared memory per block (Triton's metadata);
* ``resident_warps``: warps resident on one SM of the target, from ``regs``, ``shared`` and
  ``num_warps`` (the occupancy model of :data:`SM_LIMITS`: NVIDIA's occupancy calculator);
* ``load_bytes_per_thread``: bytes one thread loads per hot-loop iteration before its first
  use of a loaded register (:func:`bytes_before_first_use`): what it has in flight when it
  first waits for memory;
* ``bytes_in_flight``: ``resident_warps * 32 * load_bytes_per_thread``: the bytes of
  gradient loads one SM has in flight (issue 18 puts the floor that saturates HBM at
  ~32 KiB per SM).

It exits with status 1, after writing everything, when a grad kernel has no 128-bit load,
a scale or zero kernel no 128-bit store, anything spills, a stats kernel runs more than
:data:`STATS_BUDGET` instructions per element (or has no steady-state loop) or has fewer
than :data:`IN_FLIGHT_BUDGET` bytes in flight per SM, or the stats variant with the
histogram (:data:`HIST_VARIANT`, ``grad_stats(histogram=True)``) uses more than
:data:`HIST_REGS_BUDGET` registers. That variant is outside the instruction and in-flight
budgets: binning costs shared-memory atomics per element.

Triton must not be in interpreter mode for this: when ``TRITON_INTERPRET`` is set the
command re-runs itself in a child process without it. Compiled kernels land in Triton's
cache (``TRITON_CACHE_DIR``), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATS_BUDGET = 10.0  # SASS instructions per element, stats kernel, steady state
IN_FLIGHT_BUDGET = 40 * 1024  # least bytes of gradient loads in flight per SM, stats kernel
HIST_REGS_BUDGET = 64  # most registers per thread of the stats variant with the histogram
HIST_VARIANT = "p2-stats-hist"  # stats + histogram: outside the stats and in-flight budgets
TARGETS = {"sm_90": 90, "sm_80": 80}
DTYPE_NAMES = ("float32", "bfloat16", "float16")

_VEC_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*\.(?:v4\.(?:b|f|u|s)32|v2\.(?:b|f|u|s)64)")
_VEC_STORE = re.compile(r"\bst\.global(?:\.[a-z0-9_:]+)*\.(?:v4\.(?:b|f|u|s)32|v2\.(?:b|f|u|s)64)")
_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
_LDG = re.compile(r"\bLDG\.E(?:\.(\d+|U8|S8|U16|S16|64|128))?")
_LDG_BYTES = {None: 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_DEST = re.compile(r"^(?:R\d+|RZ|U?P\d+|U?PT|UR\d+|URZ)(?:\.\w+)*$")

# Per-SM limits of the occupancy model: NVIDIA's occupancy calculator (cuda_occupancy.h,
# cudaOccMaxBlocksPerSMRegsLimit with partitioned global caching off: registers are
# allocated per warp in units of 256 from 4 sub-partitions of the register file, so warps
# by registers = floor(65536 / 4 / roundup(regs * 32, 256)) * 4), and the CUDA C++
# Programming Guide's table of compute capabilities (64K registers, 64 warps and 32 blocks
# per SM; 228 KiB of shared memory per SM on 9.0, 164 KiB on 8.0; 1 KiB of it reserved per
# block, allocated in 128-byte units).
SM_LIMITS = {
    target: {"regs": 65536, "sub_partitions": 4, "reg_unit": 256, "warps": 64, "blocks": 32,
             "shared": shared_kib * 1024, "shared_reserved": 1024, "shared_unit": 128}
    for target, shared_kib in (("sm_90", 228), ("sm_80", 164))
}  # fmt: skip


def _nvidia_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise FileNotFoundError(f"{tool} not found in Triton's wheel ({path})")
    return str(path)


def kernel_specs() -> list[dict[str, Any]]:
    """Every (kernel, variant, dtype) the host launches, with its signature and config."""
    import torch

    from fastgradstats import kernels
    from fastgradstats.kernels import histogram, scale, stats

    block = kernels.block_size()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    specs = []
    stats_sig = {"table_ptr": "*i64", "partials_ptr": "*fp32", "n_tensors": "i32",
                 "num_blocks": "i32", "block_lo": "i32", "hist_ptr": "*i64",
                 "zeros_ptr": "*i64"}  # fmt: skip
    for name, dtype in dtypes.items():
        for norm in (2.0, 1.0, float("inf")):
            for full in (True, False):
                config = stats.stats_config(dtype, block, True, norm, full)
                specs.append({
                    "kernel": "stats_kernel", "fn": stats.stats_kernel, "role": "grad",
                    "variant": f"p{norm:g}-{'stats' if full else 'norm'}", "dtype": name,
                    "signature": stats_sig, "config": config,
                })  # fmt: skip
        # grad_stats(histogram=True): the same read also bins every element
        specs.append({
            "kernel": "stats_kernel", "fn": stats.stats_kernel, "role": "grad",
            "variant": HIST_VARIANT, "dtype": name, "signature": stats_sig,
            "config": stats.stats_config(dtype, block, True, 2.0, True, histogram=True),
        })  # fmt: skip
        elementwise = (
            ("scale_kernel", scale.scale_kernel, ("coef_ptr", "*fp32")),
            ("clamp_kernel", scale.clamp_kernel, ("clip_value", "fp32")),
            ("zero_kernel", scale.zero_kernel, ("flag_ptr", "*i1")),
        )
        for kernel, fn, arg in elementwise:
            sig = {"table_ptr": "*i64", arg[0]: arg[1], "n_tensors": "i32", "block_lo": "i32"}
            role = "write" if kernel == "zero_kernel" else "grad"  # zero: stores only
            specs.append({
                "kernel": kernel, "fn": fn, "role": role, "variant": "aligned",
                "dtype": name, "signature": sig,
                "config": scale.elementwise_config(dtype, block, True),
            })  # fmt: skip
        hist_sig = {"table_ptr": "*i64", "counts_ptr": "*i64", "zeros_ptr": "*i64",
                    "n_tensors": "i32", "block_lo": "i32"}  # fmt: skip
        specs.append({
            "kernel": "histogram_kernel", "fn": histogram.histogram_kernel, "role": "grad",
            "variant": "aligned", "dtype": name, "signature": hist_sig,
            "config": histogram.histogram_config(dtype, block, True),
        })  # fmt: skip
        # finalize: the clip call (total + coefficient in the result dtype), with stats
        fin_sig = {"table_ptr": "*i64", "partials_ptr": "*fp32", "floats_ptr": "*fp32",
                   "counts_ptr": "*i64", "total_ptr": f"*{_short(name)}",
                   "exact_total_ptr": "*fp32", "coef_ptr": "*fp32", "ticket_ptr": "*i32",
                   "n_tensors": "i32", "num_blocks": "i32", "max_norm": "fp32"}  # fmt: skip
        finishes = [
            ("p2-stats-clip", 2.0, True, stats.FINISH_CLIP),  # clip, return_stats
            ("p2-total", 2.0, False, stats.FINISH_TOTAL),
        ]  # get_total_norm
        if name == "float32":  # the generic path's per-group stats (no total)
            finishes.append(("p2-stats-only", 2.0, True, stats.FINISH_NONE))
        for variant, norm, full, finish in finishes:
            specs.append({
                "kernel": "finalize_kernel", "fn": stats.finalize_kernel, "role": "aux",
                "variant": variant, "dtype": name, "signature": fin_sig,
                "config": stats.finalize_config(norm, full, finish, dtype),
            })  # fmt: skip
    return specs


def _short(dtype_name: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name]


def hot_loop(sass: str) -> tuple[int, int] | None:
    """(instructions, bytes loaded per thread) of the hot loop of a SASS listing."""
    body = hot_loop_body(sass)
    if body is None:
        return None
    return len(body), sum(_LDG_BYTES.get(m.group(1), 4) for t in body if (m := _LDG.search(t)))


def hot_loop_body(sass: str) -> list[str] | None:
    """The instructions of the hot loop of a SASS listing, in address order (None: no loop).

    The hot loop is the innermost backward branch whose body loads the most bytes (``LDG``).
    """
    code = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    loops = []  # (target, branch address) of every backward branch
    for address, text in code:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            loops.append((int(m.group(1), 16), address))
    best = None
    for lo, hi in loops:
        if any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops):
            continue  # an inner loop lies inside: not innermost
        body = [t for a, t in code if lo <= a <= hi]
        loaded = 0
        for t in body:
            m = _LDG.search(t)
            if m:
                loaded += _LDG_BYTES.get(m.group(1), 4)
        if loaded and (best is None or loaded > best[1]):
            best = (body, loaded)
    return None if best is None else best[0]


def _registers(operand: str) -> set[int]:
    """General registers an operand names (``R4``, ``R4.reuse``, the pair ``R2.64``)."""
    regs = set()
    for m in _REG.finditer(operand):
        n = int(m.group(1))
        regs.update((n, n + 1) if m.group(2) else (n,))
    return regs


def bytes_before_first_use(body: list[str]) -> int:
    """Bytes one thread has in flight per loop iteration: the widths of the ``LDG``
    instructions of ``body`` issued before the first instruction that reads a register one
    of them writes (where the warp must wait for memory). Loads of the next iteration that
    ptxas hoists above the back edge are not seen: a lower bound."""
    pending: set[int] = set()  # registers written by loads not yet read
    issued = 0
    for text in body:
        text = re.sub(r"^@!?U?P\w+\s+", "", text)  # the predicate guard
        opcode, _, rest = text.partition(" ")
        operands = [o.strip() for o in rest.split(",")] if rest else []
        m = _LDG.match(opcode)
        if m:
            dest = _registers(operands[0]) if operands else set()
            if any(_registers(o) & pending for o in operands[1:]):
                break  # an address computed from loaded data
            width = _LDG_BYTES.get(m.group(1), 4)
            first = min(dest) if dest else 0
            pending.update(range(first, first + max(width // 4, 1)))
            issued += width
            continue
        first_is_dest = bool(operands) and _DEST.match(operands[0]) is not None
        sources = operands[1:] if first_is_dest else operands
        if any(_registers(o) & pending for o in sources):
            break
        if first_is_dest:
            pending -= _registers(operands[0])  # overwritten unread: no longer waited on
    return issued


def resident_warps(regs: int, shared: int, num_warps: int, target: str) -> int:
    """Warps of a kernel resident on one SM of ``target`` (the occupancy model of
    :data:`SM_LIMITS`: the least of the register, shared-memory, warp and block limits)."""
    sm = SM_LIMITS[target]
    regs_per_warp = max(-(-regs * 32 // sm["reg_unit"]), 1) * sm["reg_unit"]
    partitions = sm["sub_partitions"]
    # a block's warps are spread over the sub-partitions, each with its own register file
    warps_by_regs = (sm["regs"] // partitions // regs_per_warp) * partitions
    if regs_per_warp * -(-num_warps // partitions) * partitions > sm["regs"]:
        return 0  # the hardware's per-block check
    shared_per_block = -(-shared // sm["shared_unit"]) * sm["shared_unit"] + sm["shared_reserved"]
    blocks = min(
        warps_by_regs // num_warps,
        sm["shared"] // shared_per_block,
        sm["warps"] // num_warps,
        sm["blocks"],
    )
    return blocks * num_warps


def _ptxas_stats(ptx_path: Path, arch: str, capability: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path  # the ptxas Triton itself uses for this target
    out = subprocess.run(
        [ptxas, f"-arch={arch}", "-v", str(ptx_path), "-o", os.devnull],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def compile_one(spec: dict[str, Any], target: str, out_dir: Path) -> dict[str, Any]:
    """Compile one spec for one target; write its PTX; measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = dict(spec["config"])
    num_warps = config.pop("num_warps", 4)
    signature = dict(spec["signature"])
    for name in config:
        signature[name] = "constexpr"
    source = ASTSource(spec["fn"], signature, config)
    compiled = triton.compile(source, target=GPUTarget("cuda", TARGETS[target], 32),
                              options={"num_warps": num_warps})  # fmt: skip
    ptx = compiled.asm["ptx"]
    stem = f"{spec['kernel']}-{spec['variant']}-{spec['dtype']}-{target}"
    ptx_path = out_dir / f"{stem}.ptx"
    ptx_path.write_text(ptx)
    arch = "sm_90a" if target == "sm_90" else target
    regs, spills = _ptxas_stats(ptx_path, arch, TARGETS[target])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin.name],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[spec["dtype"]]
    body = hot_loop_body(sass) if spec["role"] == "grad" else None
    loop = hot_loop(sass) if body is not None else None
    per_element = None
    if loop is not None:
        per_element = round(loop[0] / (loop[1] / itemsize), 3)
    shared = compiled.metadata.shared
    warps = resident_warps(regs, shared, num_warps, target)
    per_thread = bytes_before_first_use(body) if body is not None else None
    return {
        "kernel": spec["kernel"],
        "variant": spec["variant"],
        "dtype": spec["dtype"],
        "target": target,
        "role": spec["role"],
        "ptx": ptx_path.name,
        "num_warps": num_warps,
        "constexprs": {k: str(v) for k, v in config.items()},
        "regs": regs,
        "spills": spills,
        "vector_loads": len(_VEC_LOAD.findall(ptx)),
        "vector_stores": len(_VEC_STORE.findall(ptx)),
        "sass_per_element": per_element,
        "loop_instructions": loop[0] if loop else None,
        "loop_elements": loop[1] // itemsize if loop else None,
        "shared": shared,
        "resident_warps": warps,
        "load_bytes_per_thread": per_thread,
        "bytes_in_flight": None if per_thread is None else warps * 32 * per_thread,
    }


def failures(entries: list[dict[str, Any]]) -> list[str]:
    """Why the report fails its budgets (empty when it passes)."""
    bad = []
    for e in entries:
        where = f"{e['kernel']}[{e['variant']}, {e['dtype']}, {e['target']}]"
        if e["spills"]:
            bad.append(f"{where}: {e['spills']} bytes of spills")
        if e["role"] == "grad" and e["vector_loads"] == 0:
            bad.append(f"{where}: no 128-bit load of gradient memory")
        if e["kernel"] in ("scale_kernel", "zero_kernel") and e["vector_stores"] == 0:
            bad.append(f"{where}: no 128-bit store of gradient memory")
        if e["kernel"] == "stats_kernel" and e["variant"] != HIST_VARIANT:
            spe = e["sass_per_element"]
            if spe is None:
                bad.append(f"{where}: no steady-state loop found in the SASS")
            elif spe > STATS_BUDGET:
                bad.append(f"{where}: {spe} SASS instructions per element > {STATS_BUDGET}")
            flight = e.get("bytes_in_flight")
            if flight is not None and flight < IN_FLIGHT_BUDGET:
                bad.append(f"{where}: {flight} bytes of loads in flight per SM "
                           f"< {IN_FLIGHT_BUDGET}")  # fmt: skip
        hist = e["kernel"] == "stats_kernel" and e["variant"] == HIST_VARIANT
        if hist and e["regs"] > HIST_REGS_BUDGET:
            bad.append(f"{where}: {e['regs']} registers > {HIST_REGS_BUDGET}")
    return bad


def run(out_dir: Path, targets: list[str], log=sys.stderr) -> dict[str, Any]:
    """Compile everything into ``out_dir``; return the report (also in codegen.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    entries = []
    for spec in kernel_specs():
        for target in targets:
            entries.append(compile_one(spec, target, out_dir))
    import triton

    report = {
        "triton": triton.__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "stats_budget": STATS_BUDGET,
        "in_flight_budget": IN_FLIGHT_BUDGET,
        "hist_regs_budget": HIST_REGS_BUDGET,
        "entries": entries,
        "failures": failures(entries),
    }
    (out_dir / "codegen.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'kernel':<18}{'variant':<15}{'dtype':<10}{'target':<7}{'regs':>5}{'spill':>6}"
             f"{'ld.v4':>6}{'st.v4':>6}{'sass/elem':>10}{'warps':>6}{'B/thr':>6}"
             f"{'KiB/SM':>7}"]  # fmt: skip
    for e in report["entries"]:
        spe = "-" if e["sass_per_element"] is None else f"{e['sass_per_element']:.2f}"
        per_thread = e.get("load_bytes_per_thread")
        flight = e.get("bytes_in_flight")
        lines.append(
            f"{e['kernel']:<18}{e['variant']:<15}{e['dtype']:<10}{e['target']:<7}"
            f"{e['regs']:>5}{e['spills']:>6}{e['vector_loads']:>6}{e['vector_stores']:>6}"
            f"{spe:>10}{e.get('resident_warps', '-'):>6}"
            f"{'-' if per_thread is None else per_thread:>6}"
            f"{'-' if flight is None else f'{flight / 1024:g}':>7}"
        )
    verdict = "OK" if not report["failures"] else "FAIL:\n  " + "\n  ".join(report["failures"])
    lines.append(f"{len(report['entries'])} kernels compiled in {report['seconds']} s: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks codegen", description=__doc__
                                     .split("\n")[0])  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="folder for PTX + codegen.json")
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    argv = sys.argv[2:] if argv is None else argv
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "benchmarks", "codegen", *argv]
        return subprocess.run(cmd, env=env).returncode
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud
    report = run(args.out, args.targets)
    print(format_report(report))
    return 1 if report["failures"] else 0


__all__ = [
    "HIST_REGS_BUDGET",
    "HIST_VARIANT",
    "IN_FLIGHT_BUDGET",
    "SM_LIMITS",
    "STATS_BUDGET",
    "bytes_before_first_use",
    "failures",
    "hot_loop",
    "hot_loop_body",
    "kernel_specs",
    "main",
    "resident_warps",
    "run",
]
