"""GetUsage for the current month from metering's in-memory counters: for every window the
counters answer, the same totals as a ClickHouse scan (+ the log) of that window, through
dedupe, hour boundaries, flushes, restarts, writes in flight and erased tenants."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from copilot.v1 import metering_pb2, metering_pb2_grpc
from servers.common.errors import Unavailable
from servers.common.interceptors import IdentityServerInterceptor
from servers.metering import convert
from servers.metering.storage.clickhouse import ChdbBackend
from servers.metering.storage.log import LocalLog
from servers.metering.tenants.store import SqliteTenantStore
from servers.metering.usage.clickhouse_store import ClickHouseUsageStore
from servers.metering.usage.domain import UsageEvent, UsageKind, UsageTotals, Window, month_window
from servers.metering.usage.pricing import PriceTable
from servers.metering.usage.service import MeteringServiceServicer

# The injected clock: mid-month, mid-hour, so windows ending "now" cut the current hour.
NOW = datetime(2026, 3, 14, 10, 20, 30, 250_000, tzinfo=UTC)
HOUR = NOW.replace(minute=0, second=0, microsecond=0)
MONTH = month_window(NOW)
KINDS = (UsageKind.QUERY, UsageKind.INGEST, UsageKind.SEARCH)


def event(event_id: str, at: datetime, tenant: str = "acme", *, model: str = "m1", kind: UsageKind = UsageKind.QUERY,
          requests: int = 1, input_tokens: int = 10, output_tokens: int = 5) -> UsageEvent:
    return UsageEvent(tenant_id=tenant, event_id=event_id, kind=kind, model=model, requests=requests,
                      input_tokens=input_tokens, output_tokens=output_tokens, occur_time=at,
                      attributes={"request_id": event_id})


def mix(prefix: str, tenant: str = "acme") -> list[UsageEvent]:
    """Several kinds and models, on both sides of the current hour's start (to the µs), in
    the previous month and earlier in this one."""
    at = [HOUR - timedelta(microseconds=1), HOUR, HOUR + timedelta(minutes=5), HOUR - timedelta(hours=3, minutes=1),
          MONTH.start, MONTH.start - timedelta(microseconds=1), NOW - timedelta(days=2)]
    return [event(f"{prefix}{i}", moment, tenant, model=f"m{i % 3}", kind=KINDS[i % 3], requests=1 + i % 2,
                  input_tokens=10 * i + 1, output_tokens=i)
            for i, moment in enumerate(at)]


# Windows inside the month: the default (month start .. now), the current hour so far,
# whole hours, the whole month, and windows whose cut hour holds events on one side only.
SERVED = [
    Window(MONTH.start, NOW),
    Window(HOUR, NOW),
    Window(HOUR - timedelta(hours=1), HOUR),
    Window(HOUR, HOUR + timedelta(hours=1)),
    Window(MONTH.start, HOUR),
    MONTH,
    Window(HOUR - timedelta(hours=3, minutes=30), HOUR + timedelta(minutes=10)),
    Window(HOUR - timedelta(hours=3, seconds=30), NOW),
]


def as_tuple(totals: UsageTotals) -> tuple[Any, ...]:
    return totals.tenant_id, totals.start, totals.end, totals.by_model


async def assert_counters_match(store: ClickHouseUsageStore, tenant: str = "acme",
                                windows: list[Window] = SERVED) -> None:
    for window in windows:
        counted = await store.current_totals(tenant, window, NOW)
        assert counted is not None, window
        assert as_tuple(counted) == as_tuple(await store.totals(tenant, window)), window


def make(tmp_path: Path) -> ClickHouseUsageStore:
    return ClickHouseUsageStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "log"),
                                flush_interval_s=3600)  # flushed only when a test says so


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ClickHouseUsageStore]:
    s = make(tmp_path)
    await s.open()
    yield s
    await s.close()


async def test_counters_equal_the_scan_loaded_cold_and_kept_current(store: ClickHouseUsageStore) -> None:
    # Part in ClickHouse, part only in the log, before anything is loaded.
    await store.record(mix("a"))
    await store.flush()
    first = await store.record([*mix("b"), event("a1", HOUR)])  # a1: a duplicate of a flushed event
    assert first.duplicates == 1
    await store.record(mix("x", tenant="globex"))
    await assert_counters_match(store)  # seeded from ClickHouse + the log

    # Kept current by the writes: duplicates in the log, in ClickHouse and within a batch.
    again = await store.record([*mix("c"), event("b2", HOUR), event("a0", HOUR), event("c9", HOUR),
                                event("c9", HOUR, model="other")])
    assert (again.recorded, again.duplicates) == (8, 3)
    await assert_counters_match(store)
    await store.flush()
    await assert_counters_match(store)
    counted = await store.current_totals("acme", Window(MONTH.start, NOW), NOW)
    assert counted is not None and {m.model for m in counted.by_model} == {"m0", "m1", "m2"}
    assert counted.events == 3 * 6 + 1  # three mixes of 6 events in the window, and c9
    await assert_counters_match(store, "globex")
    await assert_counters_match(store, "nobody")


async def test_counters_survive_a_restart_with_unflushed_events(tmp_path: Path) -> None:
    first = make(tmp_path)
    await first.open()
    await first.record(mix("a"))
    await first.flush()
    await first.record(mix("b"))
    await first.close()
    second = make(tmp_path)
    await second.open()
    try:
        await assert_counters_match(second)
        await second.record(mix("b") + mix("c"))  # b: all duplicates now
        await assert_counters_match(second)
    finally:
        await second.close()


async def test_a_window_that_splits_an_hour_of_events_is_left_to_clickhouse(store: ClickHouseUsageStore) -> None:
    await store.record([event("early", HOUR + timedelta(minutes=1)), event("late", HOUR + timedelta(minutes=50))])
    split = Window(MONTH.start, HOUR + timedelta(minutes=30))
    assert await store.current_totals("acme", split, NOW) is None
    assert (await store.totals("acme", split)).events == 1
    # A future-dated event in the current hour (clock skew) leaves "until now" to the scan too.
    assert await store.current_totals("acme", Window(MONTH.start, NOW), NOW) is None
    # Past months and windows leaving the month are always scanned.
    previous = Window(MONTH.start - timedelta(days=3), MONTH.start)
    assert await store.current_totals("acme", previous, NOW) is None
    assert await store.current_totals("acme", Window(previous.start, NOW), NOW) is None
    await assert_counters_match(store, windows=[Window(HOUR, HOUR + timedelta(hours=1)), MONTH])


async def test_hours_long_past_are_summed_and_still_exact(store: ClickHouseUsageStore) -> None:
    """Hours more than USAGE_HOURS_KEPT before the newest are summed per model: windows from
    the month's start still come from memory, others starting among them go to ClickHouse."""
    early = MONTH.start + timedelta(hours=2, minutes=10)
    await store.record([event("early", early, model="m1"), event("early2", early, model="m2")])
    await assert_counters_match(store)
    await store.record(mix("a"))  # reaches the current hour: the early hours are summed now
    await store.record([event("late", early + timedelta(minutes=5), model="m2")])  # into a summed hour
    await assert_counters_match(store, windows=[Window(MONTH.start, NOW), MONTH, Window(HOUR, NOW),
                                                Window(HOUR - timedelta(hours=3, minutes=30), NOW)])
    inside = Window(MONTH.start + timedelta(hours=1), NOW)
    assert await store.current_totals("acme", inside, NOW) is None
    assert (await store.totals("acme", inside)).events == 3 + 6 - 1  # a's event at the month start is out
    store.forget("acme")  # reseeded from ClickHouse + the log: the same answers
    await assert_counters_match(store, windows=[Window(MONTH.start, NOW), MONTH, Window(HOUR, NOW)])


async def test_reads_never_see_a_write_in_flight_or_one_that_failed(store: ClickHouseUsageStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await store.record(mix("a"))
    await assert_counters_match(store)
    release = asyncio.Event()
    fail = False
    real_append = store.log.append

    async def slow_append(events: Any, record_time: datetime) -> Any:
        await release.wait()
        if fail:
            raise Unavailable("disk gone")
        return await real_append(events, record_time)

    monkeypatch.setattr(store.log, "append", slow_append)
    pending = asyncio.ensure_future(store.record([*mix("b"), event("a3", HOUR)]))
    await asyncio.sleep(0.05)
    await assert_counters_match(store)  # neither has it yet
    release.set()
    assert (await pending).duplicates == 1
    await assert_counters_match(store)
    release.clear()
    fail = True
    pending = asyncio.ensure_future(store.record(mix("lost")))
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(Unavailable):
        await pending
    await assert_counters_match(store)


@pytest.mark.parametrize("anonymise", [False, True])
async def test_an_erased_tenant_reads_zero_then_only_what_came_after(store: ClickHouseUsageStore,
                                                                     anonymise: bool) -> None:
    await store.record(mix("a"))
    await store.flush()
    await store.record(mix("b"))
    await store.record(mix("x", tenant="globex"))
    await assert_counters_match(store)
    await store.forget_tenant("acme", anonymise=anonymise)
    await assert_counters_match(store)
    counted = await store.current_totals("acme", MONTH, NOW)
    assert counted is not None and counted.events == 0
    await store.record(mix("c") + mix("a"))  # the old ids are free again
    await assert_counters_match(store)
    await assert_counters_match(store, "globex")


async def test_get_usage_answers_as_the_scan_with_costs(tmp_path: Path) -> None:
    """Through the servicer (identity interceptor, the clock injected): the default window
    and an explicit one are served from the counters and equal the scan's response, costs
    from the price table included; a past period is still answered (by the scan)."""
    tenants = SqliteTenantStore(tmp_path / "tenants.sqlite")
    usage = make(tmp_path)
    await tenants.open()
    await usage.open()
    prices = PriceTable.load()
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(
        MeteringServiceServicer(tenants, usage, clock=lambda: NOW, prices=prices), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = metering_pb2_grpc.MeteringServiceStub(channel)
    member = (("x-tenant-id", "acme"), ("x-user-id", "alice"), ("x-roles", "member"))
    try:
        await usage.record([*mix("a", tenant="acme"), event("extractive", HOUR, model="extractive-v1",
                                                             input_tokens=1234, output_tokens=567)])
        await usage.flush()
        await usage.record(mix("b", tenant="acme"))
        default = await stub.GetUsage(metering_pb2.GetUsageRequest(), metadata=member)
        assert default == convert.usage_response(await usage.totals("acme", Window(MONTH.start, NOW)), prices)
        assert default.cost_micros > 0 and default.events == 13
        hour = Window(HOUR - timedelta(hours=1), HOUR + timedelta(hours=1))
        explicit = await stub.GetUsage(metering_pb2.GetUsageRequest(
            start_time=convert.timestamp(hour.start), end_time=convert.timestamp(hour.end)), metadata=member)
        assert explicit == convert.usage_response(await usage.totals("acme", hour), prices)
        assert await usage.current_totals("acme", hour, NOW) is not None
        previous = Window(MONTH.start - timedelta(days=1), MONTH.start)
        past = await stub.GetUsage(metering_pb2.GetUsageRequest(
            start_time=convert.timestamp(previous.start), end_time=convert.timestamp(previous.end)), metadata=member)
        assert past.events == 2
    finally:
        await channel.close(None)
        await server.stop(None)
        await usage.close()
        await tenants.close()
