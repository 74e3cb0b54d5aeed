"""Progress of long benchmark runs: a counter and an ETA on stderr (tqdm when installed)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, log: Any) -> Iterator[T]:
    """Yield ``items`` while showing ``desc i/total`` with elapsed time and ETA on ``log``.

    ``log=None`` shows nothing. With tqdm installed (the ``dev`` extra) this is a tqdm bar;
    otherwise one line per item, e.g. ``[2/5] workloads, 12s elapsed, ETA 18s``.
    """
    if log is None:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, file=log, unit="step", leave=True)
        return
    start = time.perf_counter()
    for done, item in enumerate(items):
        elapsed = time.perf_counter() - start
        eta = f", ETA {elapsed / done * (total - done):.0f}s" if done else ""
        print(f"[{done + 1}/{total}] {desc}, {elapsed:.0f}s elapsed{eta}", file=log, flush=True)
        yield item


def write_line(text: str, log: Any) -> None:
    """Print ``text`` on ``log`` without breaking a tqdm bar that is on screen."""
    if log is None:
        return
    try:
        from tqdm import tqdm
    except ImportError:
        print(text, file=log, flush=True)
    else:
        tqdm.write(text, file=log)
