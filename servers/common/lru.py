"""The one bounded least-recently-used mapping of the tree.

Not thread-safe: each user keeps one on its event loop or on its own worker thread.
`functools.lru_cache` on a pure function is still the way to cache that function.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A bounded mapping; reads refresh an entry, inserts evict the least recent.

    `on_evict(key, value)` is told about each entry pushed out by the bound (e.g. to close
    an evicted connection); entries taken out by `pop`, `drop` or `clear` are the caller's
    to dispose of. A capacity of 0 or less keeps nothing."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], object] | None = None) -> None:
        self.capacity = capacity
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The value, refreshed as the most recent, or None (counted as a hit or a miss)."""
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value without refreshing or counting it."""
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            evicted, old = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(evicted, old)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def drop(self, predicate: Callable[[K], bool]) -> int:
        """Removes the entries whose key `predicate` accepts; how many there were."""
        doomed = [key for key in self._items if predicate(key)]
        for key in doomed:
            del self._items[key]
        return len(doomed)

    def clear(self) -> list[V]:
        """Removes every entry; their values, least recent first."""
        values = list(self._items.values())
        self._items.clear()
        return values

    def snapshot(self) -> list[K]:
        """The keys, least recent first."""
        return list(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
