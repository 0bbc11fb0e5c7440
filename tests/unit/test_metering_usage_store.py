"""The embedded usage store: idempotency per tenant, atomic batches, durability."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from servers.common.errors import InvalidArgument, Unavailable
from servers.metering.usage.domain import (
    MAX_BATCH,
    UsageEvent,
    UsageKind,
    Window,
    hour_window,
    month_window,
    validate_batch,
)
from servers.metering.usage.store import SqliteUsageStore

NOW = datetime(2026, 3, 15, 10, 30, tzinfo=UTC)
MONTH = month_window(NOW)


def event(event_id: str, tenant: str = "acme", *, requests: int = 1, input_tokens: int = 10,
          output_tokens: int = 5, model: str = "m1", at: datetime = NOW) -> UsageEvent:
    return UsageEvent(tenant_id=tenant, event_id=event_id, kind=UsageKind.QUERY, model=model,
                      requests=requests, input_tokens=input_tokens, output_tokens=output_tokens,
                      occur_time=at, attributes={"request_id": event_id})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteUsageStore]:
    s = SqliteUsageStore(tmp_path / "usage.sqlite")
    await s.open()
    yield s
    await s.close()


async def test_same_id_twice_counts_once(store: SqliteUsageStore) -> None:
    first = await store.record([event("e1")])
    again = await store.record([event("e1", requests=7)])  # a retry; its content does not count
    assert (first.recorded, first.duplicates) == (1, 0)
    assert (again.recorded, again.duplicates) == (0, 1)
    totals = await store.totals("acme", MONTH)
    assert (totals.requests, totals.input_tokens, totals.output_tokens, totals.events) == (1, 10, 5, 1)
    quota = await store.quota_usage("acme", hour_window(NOW), MONTH)
    assert (quota.requests_in_hour, quota.tokens_in_month) == (1, 15)


async def test_duplicate_within_one_batch_counts_once(store: SqliteUsageStore) -> None:
    result = await store.record([event("e1"), event("e2"), event("e1")])
    assert (result.recorded, result.duplicates) == (2, 1)


async def test_same_id_in_two_tenants_counts_in_each(store: SqliteUsageStore) -> None:
    a = await store.record([event("shared", "acme")])
    b = await store.record([event("shared", "globex", requests=3)])
    assert a.recorded == b.recorded == 1
    assert (await store.totals("acme", MONTH)).requests == 1
    assert (await store.totals("globex", MONTH)).requests == 3


async def test_usage_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    first = SqliteUsageStore(path)
    await first.open()
    await first.record([event(f"e{i}") for i in range(50)])
    await first.close()

    reopened = SqliteUsageStore(path)
    await reopened.open()
    try:
        totals = await reopened.totals("acme", MONTH)
        assert (totals.requests, totals.events) == (50, 50)
        # The ids are still claimed after the restart: a replay changes nothing.
        replay = await reopened.record([event(f"e{i}") for i in range(50)])
        assert (replay.recorded, replay.duplicates) == (0, 50)
    finally:
        await reopened.close()


async def test_a_failed_write_claims_no_ids_and_the_retry_counts(store: SqliteUsageStore) -> None:
    # A real failure half-way through the batch: a trigger aborts on the third row.
    with closing(sqlite3.connect(store.path)) as conn:
        conn.execute("CREATE TRIGGER poison BEFORE INSERT ON usage_events WHEN NEW.event_id = 'e3' "
                     "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    batch = [event(f"e{i}") for i in range(1, 6)]
    with pytest.raises(Unavailable):
        await store.record(batch)
    assert (await store.totals("acme", MONTH)).events == 0

    with closing(sqlite3.connect(store.path)) as conn:
        conn.execute("DROP TRIGGER poison")
    assert (await store.quota_usage("acme", hour_window(NOW), MONTH)).requests_in_hour == 0
    retry = await store.record(batch)
    assert (retry.recorded, retry.duplicates) == (5, 0)
    assert (await store.totals("acme", MONTH)).events == 5
    # The quota rollup rolled back and forward with the events.
    assert (await store.quota_usage("acme", hour_window(NOW), MONTH)).requests_in_hour == 5


async def test_totals_by_model_and_period(store: SqliteUsageStore) -> None:
    await store.record([
        event("a", model="m1", requests=1, input_tokens=100, output_tokens=10),
        event("b", model="m2", requests=2, input_tokens=200, output_tokens=20),
        event("c", model="m1", requests=1, input_tokens=1, output_tokens=1),
        event("last-month", at=MONTH.start - timedelta(microseconds=1)),
        event("other-tenant", "globex"),
    ])
    totals = await store.totals("acme", MONTH)
    assert [(m.model, m.requests, m.input_tokens, m.output_tokens) for m in totals.by_model] == [
        ("m1", 2, 101, 11), ("m2", 2, 200, 20)]
    assert (totals.requests, totals.total_tokens, totals.events) == (4, 332, 3)
    # Half-open: an event exactly at the end is not in the window.
    at_end = await store.totals("acme", Window(MONTH.start, NOW))
    assert at_end.events == 0


async def test_quota_usage_counts_the_current_hour_and_month(store: SqliteUsageStore) -> None:
    hour = hour_window(NOW)
    await store.record([
        event("this-hour", requests=2, input_tokens=10, output_tokens=0, at=hour.start),
        event("earlier-today", requests=5, input_tokens=20, output_tokens=0, at=hour.start - timedelta(seconds=1)),
        event("next-hour", requests=3, input_tokens=40, output_tokens=0, at=hour.end),
        event("last-month", requests=9, input_tokens=80, output_tokens=0, at=MONTH.start - timedelta(seconds=1)),
    ])
    usage = await store.quota_usage("acme", hour, MONTH)
    assert usage.requests_in_hour == 2
    assert usage.tokens_in_month == 70
    with pytest.raises(ValueError):
        await store.quota_usage("acme", Window(NOW, NOW + timedelta(hours=1)), MONTH)


def test_validation_rejects_the_whole_batch_with_every_violation() -> None:
    bad = [
        event("ok"),
        event(""),
        event("x" * 129),
        event("neg", requests=-1),
        event("old", at=datetime(2019, 12, 31, tzinfo=UTC)),
        event("future", at=NOW + timedelta(days=1, seconds=1)),
    ]
    with pytest.raises(InvalidArgument) as info:
        validate_batch(bad, NOW)
    fields = [v.field for v in info.value.violations]
    assert fields == ["events[1].event_id", "events[2].event_id", "events[3].requests",
                      "events[4].occur_time", "events[5].occur_time"]
    validate_batch([event("ok"), event("tomorrow", at=NOW + timedelta(days=1))], NOW)


def test_validation_limits_the_batch_size() -> None:
    with pytest.raises(InvalidArgument):
        validate_batch([event(f"e{i}") for i in range(MAX_BATCH + 1)], NOW)
    with pytest.raises(InvalidArgument):
        validate_batch([], NOW)
    validate_batch([event(f"e{i}") for i in range(MAX_BATCH)], NOW)


async def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    s = SqliteUsageStore(tmp_path / "usage.sqlite")
    assert not await s.ping()
    with pytest.raises(Unavailable):
        await s.record([event("e1")])
    await s.open()
    assert await s.ping()
    await s.close()
    assert not await s.ping()
