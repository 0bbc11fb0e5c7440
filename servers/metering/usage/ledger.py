"""The quota ledger: recorded usage plus the holds of admitted requests (reservations).

A reservation holds 1 request of the tenant's hourly request quota and `tokens` of its
monthly token quota, from `reserve` until a usage event carrying its id settles it, it is
released, or its TTL passes. Admission counts both: a request fits when

    recorded + held + new <= limit        (for both quotas)

and the check and the hold are one atomic step, so a burst of concurrent reserves against
room for k admits exactly k. Settling replaces the hold by the event's actual usage in one
step as far as any quota reader can tell (never both counted, never neither).

`QuotaLedger` is the interface (like envoyproxy/ratelimit's cache interface), with two
backends: `LocalLedger` below (the embedded default: one metering process; recorded usage
is the usage store's counters, holds are in memory) and `redis_ledger.RedisLedger`
(REDIS_URL: recorded counters and holds in Redis, shared by every metering replica).
docs/admission.md has the reasoning.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import zlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from servers.metering.tenants.plans import Limits
from servers.metering.usage.domain import QuotaUsage, RecordResult, UsageEvent, hour_window, month_window
from servers.metering.usage.store import UsageStore

# How long a reservation id settled without a live reservation (it expired first) is
# remembered, so that a reserve retried that late holds nothing.
TOMBSTONE_S = 600

Write = Callable[[Sequence[UsageEvent]], Awaitable[RecordResult]]


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    tokens: int
    expire_time: datetime


@dataclass(frozen=True)
class Hold:
    """The outcome of a reserve: the usage it was judged against (recorded and the other
    reservations' holds, before this one) and the reservation, None when refused."""

    usage: QuotaUsage
    reservation: Reservation | None
    # A retried reserve: the reservation existed already and nothing more was held.
    existing: bool = False


def fits(limits: Limits, usage: QuotaUsage, tokens: int) -> bool:
    """The admission rule (RedisLedger's script applies the same one)."""
    return (usage.requests_in_hour + 1 <= limits.requests_per_hour
            and usage.tokens_in_month + tokens <= limits.tokens_per_month)


class QuotaLedger(ABC):
    """Recorded usage and holds of every tenant. Implementations are safe to call concurrently."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquires resources; called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases resources."""

    async def ping(self) -> bool:
        return True

    @abstractmethod
    async def usage(self, tenant_id: str, now: datetime) -> QuotaUsage:
        """Requests in the current hour and tokens in the current month, recorded and held."""

    @abstractmethod
    async def reserve(self, tenant_id: str, limits: Limits, reservation_id: str, tokens: int, ttl: timedelta,
                      now: datetime) -> Hold:
        """Holds 1 request and `tokens` if they fit under `limits`, atomically with the check.
        The same id again (while the reservation lives, held or settled) returns it unchanged."""

    @abstractmethod
    async def release(self, tenant_id: str, reservation_id: str, now: datetime) -> bool:
        """Drops a hold; whether there was one. Unknown, expired or settled ids are fine."""

    @abstractmethod
    async def record(self, events: Sequence[UsageEvent], write: Write, now: datetime) -> RecordResult:
        """Records a batch of one tenant's usage through `write` (the usage store) and settles
        the reservations its events name, each counted once however often it is recorded."""


@dataclass(eq=False)
class _Entry:
    tokens: int
    expire_time: datetime
    # Settled: no longer held, remembered until it would have expired so that a retried
    # reserve of the same id holds nothing.
    settled: bool = False


@dataclass
class _Holds:
    """One tenant's reservations, their expiries in a heap, and the sums of the live holds,
    so a check costs O(expired) instead of a pass over every reservation of the TTL."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    # (expire_time, tie-break, id, entry): an item whose entry is no longer the id's
    # (released, or replaced after a release) is dropped when it comes up.
    expiry: list[tuple[datetime, int, str, _Entry]] = field(default_factory=list)
    # Held = not settled: what `usage` adds to the recorded counters.
    requests: int = 0
    tokens: int = 0

    def add(self, reservation_id: str, entry: _Entry) -> None:
        self.entries[reservation_id] = entry
        heapq.heappush(self.expiry, (entry.expire_time, next(_ORDER), reservation_id, entry))
        if not entry.settled:
            self.requests += 1
            self.tokens += entry.tokens

    def settle(self, entry: _Entry) -> None:
        if not entry.settled:
            entry.settled = True
            self.requests -= 1
            self.tokens -= entry.tokens

    def remove(self, reservation_id: str) -> None:
        entry = self.entries.pop(reservation_id)
        if not entry.settled:
            self.requests -= 1
            self.tokens -= entry.tokens

    def expire(self, now: datetime) -> None:
        while self.expiry and self.expiry[0][0] <= now:
            _, _, reservation_id, entry = heapq.heappop(self.expiry)
            if self.entries.get(reservation_id) is entry:
                self.remove(reservation_id)


# Ties between equal expiry times are broken by insertion order (entries never compare).
_ORDER = itertools.count()


class LocalLedger(QuotaLedger):
    """In-process holds over the usage store's counters: right for one metering process.

    A tenant's reserves, checks and settling records are serialised by its lock (a fixed set
    of striped locks, so memory stays bounded): a settle writes the event (the store counts
    it) and drops the hold before any reader of that tenant's quota runs again.
    """

    STRIPES = 64

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        self._tenants: dict[str, _Holds] = {}
        self._locks = [asyncio.Lock() for _ in range(self.STRIPES)]

    def _lock(self, tenant_id: str) -> asyncio.Lock:
        return self._locks[zlib.crc32(tenant_id.encode()) % self.STRIPES]

    def _live(self, tenant_id: str, now: datetime) -> _Holds | None:
        """The tenant's reservations with the lapsed ones dropped (None: it has none)."""
        holds = self._tenants.get(tenant_id)
        if holds is None:
            return None
        holds.expire(now)
        if not holds.entries:
            del self._tenants[tenant_id]
            return None
        return holds

    async def _usage(self, tenant_id: str, now: datetime) -> QuotaUsage:
        recorded = await self._store.quota_usage(tenant_id, hour_window(now), month_window(now))
        holds = self._live(tenant_id, now)
        if holds is None:
            return recorded
        return QuotaUsage(requests_in_hour=recorded.requests_in_hour + holds.requests,
                          tokens_in_month=recorded.tokens_in_month + holds.tokens)

    async def usage(self, tenant_id: str, now: datetime) -> QuotaUsage:
        async with self._lock(tenant_id):
            return await self._usage(tenant_id, now)

    async def reserve(self, tenant_id: str, limits: Limits, reservation_id: str, tokens: int, ttl: timedelta,
                      now: datetime) -> Hold:
        async with self._lock(tenant_id):
            usage = await self._usage(tenant_id, now)
            holds = self._live(tenant_id, now)
            existing = holds.entries.get(reservation_id) if holds is not None else None
            if existing is not None:
                if not existing.settled:
                    usage = QuotaUsage(usage.requests_in_hour - 1, usage.tokens_in_month - existing.tokens)
                return Hold(usage, Reservation(reservation_id, existing.tokens, existing.expire_time), existing=True)
            if not fits(limits, usage, tokens):
                return Hold(usage, None)
            entry = _Entry(tokens, now + ttl)
            self._tenants.setdefault(tenant_id, _Holds()).add(reservation_id, entry)
            return Hold(usage, Reservation(reservation_id, tokens, entry.expire_time))

    async def release(self, tenant_id: str, reservation_id: str, now: datetime) -> bool:
        async with self._lock(tenant_id):
            holds = self._live(tenant_id, now)
            entry = holds.entries.get(reservation_id) if holds is not None else None
            if holds is None or entry is None or entry.settled:
                return False
            holds.remove(reservation_id)
            if not holds.entries:
                del self._tenants[tenant_id]
            return True

    async def record(self, events: Sequence[UsageEvent], write: Write, now: datetime) -> RecordResult:
        settling = [e for e in events if e.reservation_id]
        if not settling:
            return await write(events)
        tenant_id = settling[0].tenant_id
        async with self._lock(tenant_id):
            # If the write fails, the holds stay: the usage is not counted, so they must be.
            result = await write(events)
            holds = self._tenants.setdefault(tenant_id, _Holds())
            for e in settling:
                entry = holds.entries.get(e.reservation_id)
                if entry is None:
                    # Expired (or never reserved): a late reserve of this id must not hold again.
                    holds.add(e.reservation_id, _Entry(0, now + timedelta(seconds=TOMBSTONE_S), settled=True))
                else:
                    holds.settle(entry)
            return result

