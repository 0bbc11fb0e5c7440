"""The quota ledger (reserve, settle, release, expire), both backends: in process over the
SQLite usage store, and Redis (a real redis-server on a free loopback port; skipped without
one) over the same store."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from servers.metering.tenants.plans import Limits
from servers.metering.usage.domain import QuotaUsage, UsageEvent, UsageKind
from servers.metering.usage.ledger import LocalLedger, QuotaLedger
from servers.metering.usage.redis_ledger import RedisLedger
from servers.metering.usage.store import SqliteUsageStore
from tests.integration.test_metering_redis import RedisServer

# Mid-hour, so no test straddles a window.
NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
TTL = timedelta(seconds=120)
TENANT = "acme"


def limits(requests_per_hour: int = 1000, tokens_per_month: int = 1_000_000) -> Limits:
    return Limits(requests_per_second=0, requests_per_minute=0, requests_per_hour=requests_per_hour,
                  tokens_per_month=tokens_per_month, max_documents=0)


def usage_event(event_id: str, reservation_id: str = "", tokens: int = 30, requests: int = 1) -> UsageEvent:
    return UsageEvent(tenant_id=TENANT, event_id=event_id, kind=UsageKind.QUERY, model="m", requests=requests,
                      input_tokens=tokens // 2, output_tokens=tokens - tokens // 2,
                      occur_time=NOW - timedelta(minutes=1), reservation_id=reservation_id)


class Bench:
    def __init__(self, ledger: QuotaLedger, store: SqliteUsageStore) -> None:
        self.ledger = ledger
        self.store = store

    async def record(self, *events: UsageEvent, now: datetime = NOW) -> int:
        result = await self.ledger.record(list(events), self.store.record, now)
        return result.recorded

    async def usage(self, now: datetime = NOW) -> QuotaUsage:
        return await self.ledger.usage(TENANT, now)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """A redis-server on a free loopback port for the module; None without one."""
    if shutil.which("redis-server") is None:
        yield None
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest_asyncio.fixture(params=["local", "redis"])
async def bench(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str | None) -> AsyncIterator[Bench]:
    if request.param == "redis" and redis_url is None:
        pytest.skip("redis-server is not installed")
    store = SqliteUsageStore(tmp_path / "usage.sqlite")
    await store.open()
    ledger: QuotaLedger
    if redis_url is not None and request.param == "redis":
        ledger = RedisLedger.from_url(redis_url, store, max_ttl=timedelta(minutes=15),
                                      prefix=f"test:{time.monotonic_ns()}")
    else:
        ledger = LocalLedger(store)
    await ledger.open()
    try:
        yield Bench(ledger, store)
    finally:
        await ledger.close()
        await store.close()


async def test_a_burst_admits_exactly_what_the_token_budget_has_room_for(bench: Bench) -> None:
    # Room for 3 answers of 100 tokens (and 50 to spare, not enough for a fourth).
    await bench.record(usage_event("earlier", tokens=650))
    budget = limits(tokens_per_month=1000)
    holds = await asyncio.gather(*[bench.ledger.reserve(TENANT, budget, f"r{i}", 100, TTL, NOW) for i in range(40)])
    admitted = [h for h in holds if h.reservation is not None]
    assert len(admitted) == 3
    assert await bench.usage() == QuotaUsage(requests_in_hour=1 + 3, tokens_in_month=950)
    # Every refused one saw the budget with the admitted holds in it.
    assert all(h.usage.tokens_in_month + 100 > 1000 for h in holds if h.reservation is None)


async def test_a_burst_admits_exactly_what_the_hourly_request_quota_has_room_for(bench: Bench) -> None:
    await bench.record(usage_event("earlier"))
    holds = await asyncio.gather(*[bench.ledger.reserve(TENANT, limits(requests_per_hour=6), f"r{i}", 10, TTL, NOW)
                                   for i in range(30)])
    assert sum(h.reservation is not None for h in holds) == 5


async def test_settling_replaces_the_hold_by_the_actual_usage(bench: Bench) -> None:
    hold = await bench.ledger.reserve(TENANT, limits(), "q1", 500, TTL, NOW)
    assert hold.reservation is not None and hold.reservation.expire_time == NOW + TTL
    assert hold.usage == QuotaUsage(0, 0)
    assert await bench.usage() == QuotaUsage(requests_in_hour=1, tokens_in_month=500)
    assert await bench.record(usage_event("answer-q1", reservation_id="q1", tokens=120)) == 1
    assert await bench.usage() == QuotaUsage(requests_in_hour=1, tokens_in_month=120)
    # Settled: releasing it changes nothing, and a retried reserve holds nothing more.
    assert not await bench.ledger.release(TENANT, "q1", NOW)
    again = await bench.ledger.reserve(TENANT, limits(), "q1", 500, TTL, NOW)
    assert again.existing and again.reservation == hold.reservation
    assert await bench.usage() == QuotaUsage(requests_in_hour=1, tokens_in_month=120)


async def test_a_settling_event_recorded_twice_counts_once(bench: Bench) -> None:
    await bench.ledger.reserve(TENANT, limits(), "q1", 500, TTL, NOW)
    settle = usage_event("answer-q1", reservation_id="q1", tokens=120)
    assert await bench.record(settle) == 1
    assert await bench.record(settle) == 0
    assert await bench.usage() == QuotaUsage(requests_in_hour=1, tokens_in_month=120)


async def test_release_frees_the_hold(bench: Bench) -> None:
    budget = limits(tokens_per_month=100)
    assert (await bench.ledger.reserve(TENANT, budget, "q1", 100, TTL, NOW)).reservation is not None
    assert (await bench.ledger.reserve(TENANT, budget, "q2", 100, TTL, NOW)).reservation is None
    assert await bench.ledger.release(TENANT, "q1", NOW)
    assert not await bench.ledger.release(TENANT, "q1", NOW)
    assert not await bench.ledger.release(TENANT, "never-reserved", NOW)
    assert await bench.usage() == QuotaUsage(0, 0)
    assert (await bench.ledger.reserve(TENANT, budget, "q2", 100, TTL, NOW)).reservation is not None


async def test_an_expired_hold_frees_its_share(bench: Bench) -> None:
    budget = limits(tokens_per_month=100)
    await bench.ledger.reserve(TENANT, budget, "dead-holder", 100, timedelta(seconds=5), NOW)
    later = NOW + timedelta(seconds=4)
    assert (await bench.ledger.reserve(TENANT, budget, "q2", 100, TTL, later)).reservation is None
    later = NOW + timedelta(seconds=5)
    assert await bench.usage(later) == QuotaUsage(0, 0)
    assert (await bench.ledger.reserve(TENANT, budget, "q2", 100, TTL, later)).reservation is not None
    # The late holder's usage still counts (it happened), once, and holds nothing again.
    assert await bench.record(usage_event("late", reservation_id="dead-holder", tokens=40), now=later) == 1
    assert await bench.usage(later) == QuotaUsage(requests_in_hour=2, tokens_in_month=140)
    retried = await bench.ledger.reserve(TENANT, budget, "dead-holder", 100, TTL, later)
    assert retried.existing
    assert await bench.usage(later) == QuotaUsage(requests_in_hour=2, tokens_in_month=140)


async def test_reserve_is_idempotent_even_when_retries_race(bench: Bench) -> None:
    holds = await asyncio.gather(*[bench.ledger.reserve(TENANT, limits(), "same", 100, TTL, NOW) for _ in range(10)])
    assert {h.reservation for h in holds} == {holds[0].reservation}
    assert sum(not h.existing for h in holds) == 1
    assert await bench.usage() == QuotaUsage(requests_in_hour=1, tokens_in_month=100)
    # Tenants are apart: the same id elsewhere is another reservation.
    other = await bench.ledger.reserve("globex", limits(), "same", 7, TTL, NOW)
    assert not other.existing and other.reservation is not None and other.reservation.tokens == 7


async def test_usage_recorded_without_a_reservation_counts_too(bench: Bench) -> None:
    await bench.ledger.reserve(TENANT, limits(), "q1", 100, TTL, NOW)
    assert await bench.record(usage_event("ingest-1", tokens=300, requests=0)) == 1
    assert await bench.usage() == QuotaUsage(requests_in_hour=1, tokens_in_month=400)
    assert (await bench.ledger.reserve(TENANT, limits(tokens_per_month=500), "q2", 101, TTL, NOW)).reservation \
        is None


async def test_holds_lapse_one_by_one_in_expiry_order_whatever_order_they_were_made_in(bench: Bench) -> None:
    for rid, ttl_s, tokens in [("late", 30, 300), ("early", 10, 100), ("middle", 20, 200)]:
        assert (await bench.ledger.reserve(TENANT, limits(), rid, tokens, timedelta(seconds=ttl_s), NOW)
                ).reservation is not None
    assert await bench.usage() == QuotaUsage(requests_in_hour=3, tokens_in_month=600)
    assert await bench.usage(NOW + timedelta(seconds=9)) == QuotaUsage(requests_in_hour=3, tokens_in_month=600)
    assert await bench.usage(NOW + timedelta(seconds=10)) == QuotaUsage(requests_in_hour=2, tokens_in_month=500)
    assert await bench.usage(NOW + timedelta(seconds=20)) == QuotaUsage(requests_in_hour=1, tokens_in_month=300)
    assert await bench.usage(NOW + timedelta(seconds=30)) == QuotaUsage(0, 0)


async def test_an_id_released_and_reserved_again_keeps_its_new_hold_past_the_first_ones_expiry(bench: Bench) -> None:
    await bench.ledger.reserve(TENANT, limits(), "q1", 100, timedelta(seconds=10), NOW)
    assert await bench.ledger.release(TENANT, "q1", NOW)
    again = await bench.ledger.reserve(TENANT, limits(), "q1", 70, timedelta(seconds=60), NOW + timedelta(seconds=5))
    assert not again.existing and again.reservation is not None
    # The first reservation's expiry passes: the second hold is untouched.
    assert await bench.usage(NOW + timedelta(seconds=11)) == QuotaUsage(requests_in_hour=1, tokens_in_month=70)
    assert await bench.usage(NOW + timedelta(seconds=65)) == QuotaUsage(0, 0)


async def test_a_settled_id_is_remembered_until_its_expiry_then_free(bench: Bench) -> None:
    hold = await bench.ledger.reserve(TENANT, limits(), "q1", 500, timedelta(seconds=10), NOW)
    assert await bench.record(usage_event("answer-q1", reservation_id="q1", tokens=120)) == 1
    before = NOW + timedelta(seconds=9)
    retried = await bench.ledger.reserve(TENANT, limits(), "q1", 500, TTL, before)
    assert retried.existing and retried.reservation == hold.reservation
    assert await bench.usage(before) == QuotaUsage(requests_in_hour=1, tokens_in_month=120)
    after = NOW + timedelta(seconds=10)
    fresh = await bench.ledger.reserve(TENANT, limits(), "q1", 500, TTL, after)
    assert not fresh.existing
    assert await bench.usage(after) == QuotaUsage(requests_in_hour=2, tokens_in_month=620)
