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
import zlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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


@dataclass
class _Entry:
    tokens: int
    expire_time: datetime
    # Settled: no longer held, remembered until it would have expired so that a retried
    # reserve of the same id holds nothing.
    settled: bool = False


class LocalLedger(QuotaLedger):
    """In-process holds over the usage store's counters: right for one metering process.

    A tenant's reserves, checks and settling records are serialised by its lock (a fixed set
    of striped locks, so memory stays bounded): a settle writes the event (the store counts
    it) and drops the hold before any reader of that tenant's quota runs again.
    """

    STRIPES = 64

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        self._entries: dict[str, dict[str, _Entry]] = {}
        self._locks = [asyncio.Lock() for _ in range(self.STRIPES)]

    def _lock(self, tenant_id: str) -> asyncio.Lock:
        return self._locks[zlib.crc32(tenant_id.encode()) % self.STRIPES]

    def _live(self, tenant_id: str, now: datetime) -> dict[str, _Entry]:
        entries = self._entries.get(tenant_id)
        if entries is None:
            return {}
        for rid in [rid for rid, e in entries.items() if e.expire_time <= now]:
            del entries[rid]
        if not entries:
            del self._entries[tenant_id]
        return entries

    async def _usage(self, tenant_id: str, now: datetime) -> QuotaUsage:
        recorded = await self._store.quota_usage(tenant_id, hour_window(now), month_window(now))
        held = [e for e in self._live(tenant_id, now).values() if not e.settled]
        return QuotaUsage(requests_in_hour=recorded.requests_in_hour + len(held),
                          tokens_in_month=recorded.tokens_in_month + sum(e.tokens for e in held))

    async def usage(self, tenant_id: str, now: datetime) -> QuotaUsage:
        async with self._lock(tenant_id):
            return await self._usage(tenant_id, now)

    async def reserve(self, tenant_id: str, limits: Limits, reservation_id: str, tokens: int, ttl: timedelta,
                      now: datetime) -> Hold:
        async with self._lock(tenant_id):
            usage = await self._usage(tenant_id, now)
            existing = self._live(tenant_id, now).get(reservation_id)
            if existing is not None:
                if not existing.settled:
                    usage = QuotaUsage(usage.requests_in_hour - 1, usage.tokens_in_month - existing.tokens)
                return Hold(usage, Reservation(reservation_id, existing.tokens, existing.expire_time), existing=True)
            if not fits(limits, usage, tokens):
                return Hold(usage, None)
            entry = _Entry(tokens, now + ttl)
            self._entries.setdefault(tenant_id, {})[reservation_id] = entry
            return Hold(usage, Reservation(reservation_id, tokens, entry.expire_time))

    async def release(self, tenant_id: str, reservation_id: str, now: datetime) -> bool:
        async with self._lock(tenant_id):
            entries = self._live(tenant_id, now)
            entry = entries.get(reservation_id)
            if entry is None or entry.settled:
                return False
            del entries[reservation_id]
            if not entries:
                self._entries.pop(tenant_id, None)
            return True

    async def record(self, events: Sequence[UsageEvent], write: Write, now: datetime) -> RecordResult:
        settling = [e for e in events if e.reservation_id]
        if not settling:
            return await write(events)
        tenant_id = settling[0].tenant_id
        async with self._lock(tenant_id):
            # If the write fails, the holds stay: the usage is not counted, so they must be.
            result = await write(events)
            entries = self._entries.setdefault(tenant_id, {})
            for e in settling:
                entry = entries.get(e.reservation_id)
                if entry is None:
                    # Expired (or never reserved): a late reserve of this id must not hold again.
                    entries[e.reservation_id] = _Entry(0, now + timedelta(seconds=TOMBSTONE_S), settled=True)
                else:
                    entry.settled = True
            return result

