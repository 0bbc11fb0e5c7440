"""Fixed-window request counters per tenant: the limiter interface and the in-process one.

A tenant has up to one window per unit (second, minute, hour). A hit is admitted only
when every window still has room, and only admitted hits are counted, so "requests per
hour" means requests served: a client hammering through a per-second limit does not
also burn its hour. Windows are aligned to wall-clock time so that several edge
instances sharing Redis agree on where a window starts.

The in-process limiter answers synchronously (`hit_now`): it sits on every request's
path, and not awaiting saves a task switch per call.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from envoy.service.ratelimit.v3 import rls_pb2

Unit = rls_pb2.RateLimitResponse.RateLimit.Unit
SECOND: int = Unit.SECOND
MINUTE: int = Unit.MINUTE
HOUR: int = Unit.HOUR
UNIT_SECONDS = {SECOND: 1, MINUTE: 60, HOUR: 3600}
UNIT_NAMES = {SECOND: "second", MINUTE: "minute", HOUR: "hour"}


@dataclass(frozen=True, slots=True)
class Window:
    unit: int  # RateLimitResponse.RateLimit.Unit
    seconds: int
    limit: int

    @classmethod
    def of(cls, unit: int, limit: int) -> Window:
        return cls(unit=unit, seconds=UNIT_SECONDS[unit], limit=max(0, limit))


# A tenant's windows, shortest first. Empty: not limited at all.
Limits = tuple[Window, ...]


class Decision(NamedTuple):
    over_limit: bool
    # The window that decided: the one over its limit (the one that resets last when
    # several are), else the one with the least room left. None when nothing limits.
    window: Window | None
    remaining: int
    reset_s: float


UNLIMITED = Decision(False, None, 0, 0.0)


class LimiterError(Exception):
    """The limiter could not decide (e.g. its store is unreachable)."""


class Limiter(abc.ABC):
    @abc.abstractmethod
    async def hit(self, key: str, limits: Limits, hits: int = 1) -> Decision:
        """Counts `hits` for `key` if every window of `limits` has room for them."""

    def prune(self, now: float | None = None) -> int:
        """Forgets state of windows that have ended; returns how many keys it dropped."""
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections; the in-process limiter holds none."""


def decide(limits: Limits, counts: list[int], hits: int, now: float) -> Decision:
    """The decision for `hits` given each window's count *before* them (shared by limiters)."""
    over: Window | None = None
    over_reset = 0.0
    tight: Window | None = None
    tight_remaining = 0
    tight_reset = 0.0
    for window, count in zip(limits, counts, strict=True):
        reset = window.seconds - now % window.seconds
        remaining = window.limit - count - hits
        if remaining < 0:
            # Every exhausted window must roll over before a retry can succeed.
            if over is None or reset > over_reset:
                over, over_reset = window, reset
        elif tight is None or remaining < tight_remaining:
            tight, tight_remaining, tight_reset = window, remaining, reset
    if over is not None:
        return Decision(True, over, 0, over_reset)
    return Decision(False, tight, tight_remaining, tight_reset)


class _Counter:
    __slots__ = ("count", "index")

    def __init__(self) -> None:
        self.index = -1
        self.count = 0


class InProcessLimiter(Limiter):
    """Counters in this process's memory: exact for one edge instance, lost on restart."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # key -> window length in seconds -> counter
        self._counters: dict[str, dict[int, _Counter]] = {}

    def hit_now(self, key: str, limits: Limits, hits: int = 1, now: float | None = None) -> Decision:
        if not limits:
            return UNLIMITED
        if now is None:
            now = self._clock()
        counters = self._counters.get(key)
        if counters is None:
            counters = self._counters[key] = {}
        window_counters = []
        for window in limits:
            index = int(now // window.seconds)
            counter = counters.get(window.seconds)
            if counter is None:
                counter = counters[window.seconds] = _Counter()
            if counter.index != index:
                counter.index, counter.count = index, 0
            window_counters.append(counter)
        decision = decide(limits, [c.count for c in window_counters], hits, now)
        if not decision.over_limit:
            for counter in window_counters:
                counter.count += hits
        return decision

    async def hit(self, key: str, limits: Limits, hits: int = 1) -> Decision:
        return self.hit_now(key, limits, hits)

    def prune(self, now: float | None = None) -> int:
        """Drops keys whose windows have all rolled over; returns how many were dropped."""
        if now is None:
            now = self._clock()
        stale = [key for key, counters in self._counters.items()
                 if all(c.index != int(now // seconds) for seconds, c in counters.items())]
        for key in stale:
            del self._counters[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self._counters)
