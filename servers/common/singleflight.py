"""Concurrent requests for one key share one run of the work (a cache miss fetched once).

The work runs as its own task: a caller that gives up (its call cancelled, e.g. Envoy timing
out one request) does not cancel it for the others waiting on the same key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """The result of `work()`, or of the run already in flight for `key`."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(work())
            self._inflight[key] = pending
            pending.add_done_callback(lambda _done: self._inflight.pop(key, None))
        return await asyncio.shield(pending)

    def __len__(self) -> int:
        """How many keys have a run in flight."""
        return len(self._inflight)
