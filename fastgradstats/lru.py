"""The library's one cache: a small, thread-safe least-recently-used map.

It serves the kernel tables (``kernels.tables``), the fused plans (``triton_backend``) and
the monitor's device index tensors (``monitor.binding``). Each is bounded because its keys
can change every step (MoE routing changes which parameters have gradients; a caching
allocator moves gradients): an unbounded cache would grow by one device tensor per step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

_MISSING: Any = object()


class Lru:
    """A bounded ``dict`` that forgets its least recently used entry first.

    Every method takes one lock, so threads may share it; making a value is the caller's
    business, outside the lock (a table's host-to-device copy must not serialize threads).
    ``maxsize`` may be changed at any time; it applies at the next put.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:  # get + move_to_end must not interleave with another put
            value = self._data.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any, *, keep_existing: bool = False) -> Any:
        """Store ``value`` under ``key`` (most recently used) and evict beyond ``maxsize``.

        ``keep_existing``: when another thread stored ``key`` meanwhile, keep its value.
        Returns the value now stored."""
        with self._lock:
            if keep_existing:
                value = self._data.setdefault(key, value)
            else:
                self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            return value

    def values(self) -> list[Any]:
        """A snapshot of the values, least recently used first."""
        with self._lock:
            return list(self._data.values())

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {"maxsize": self.maxsize, "_data": OrderedDict(self._data)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["maxsize"])  # type: ignore[misc]
        self._data.update(state["_data"])


__all__ = ["Lru"]
