"""The library's one cache (``fastgradstats.lru.Lru``): order, bounds, threads, pickles."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from fastgradstats.lru import Lru

pytestmark = pytest.mark.backend_independent


def test_evicts_the_least_recently_used_entry():
    cache = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2
    assert cache.get("zzz", "default") == "default"


def test_maxsize_change_applies_at_the_next_put():
    cache = Lru(4)
    for k in range(4):
        cache.put(k, k)
    cache.maxsize = 1
    cache.put("new", 0)
    assert cache.values() == [0] and len(cache) == 1


def test_keep_existing_returns_the_value_another_thread_stored():
    cache = Lru(2)
    first = object()
    assert cache.put("k", first) is first
    assert cache.put("k", object(), keep_existing=True) is first
    replacement = object()
    assert cache.put("k", replacement) is replacement


def test_none_values_are_stored_and_found():
    cache = Lru(2)
    cache.put("k", None)
    assert len(cache) == 1 and cache.get("k", "missing") is None


def test_clear_and_pickle_round_trip():
    cache = Lru(3)
    for k in range(3):
        cache.put(k, torch.tensor([k]))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.maxsize == 3 and [int(v) for v in copy.values()] == [0, 1, 2]
    copy.put(3, torch.tensor([3]))  # the restored copy has a working lock and bound
    assert len(copy) == 3 and copy.get(0) is None
    cache.clear()
    assert len(cache) == 0 and len(copy) == 3


def test_state_of_the_monitors_former_cache_class_loads():
    """Monitors pickled before ``lru.py`` hold ``monitor.binding.LruCache`` objects whose
    state is ``{"maxsize", "_data"}``; the name now resolves to :class:`Lru`."""
    from collections import OrderedDict

    from fastgradstats.monitor.binding import LruCache

    cache = LruCache.__new__(LruCache)
    cache.__setstate__({"maxsize": 2, "_data": OrderedDict([((0, 1), "index")])})
    assert cache.get((0, 1)) == "index"
    cache.put("x", 1)
    cache.put("y", 2)
    assert len(cache) == 2 and cache.get((0, 1)) is None


def test_is_thread_safe():
    cache = Lru(4)
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(3000):
                key = int(torch.randint(0, 8, (1,), generator=gen))
                if cache.get(key) is None:
                    cache.put(key, key + 1)
                assert len(cache) <= 4
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(cache.get(k) in (None, k + 1) for k in range(8))
