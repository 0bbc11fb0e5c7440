"""Usage in ClickHouse (embedded chDB) behind the durable local log: idempotency, replays,
restarts, torn log tails, failed writes, and quota counters that agree with ClickHouse."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from servers.common.errors import Unavailable
from servers.metering.storage import clickhouse
from servers.metering.storage.clickhouse import ChdbBackend, param_text
from servers.metering.storage.log import LocalLog
from servers.metering.usage.clickhouse_store import ClickHouseUsageStore
from servers.metering.usage.domain import UsageEvent, UsageKind, Window, hour_window, month_window

NOW = datetime.now(UTC).replace(microsecond=123456)
MONTH = month_window(NOW)


def event(event_id: str, tenant: str = "acme", *, requests: int = 1, input_tokens: int = 10,
          output_tokens: int = 5, model: str = "m1", at: datetime = NOW) -> UsageEvent:
    return UsageEvent(tenant_id=tenant, event_id=event_id, kind=UsageKind.QUERY, model=model,
                      requests=requests, input_tokens=input_tokens, output_tokens=output_tokens,
                      occur_time=at, attributes={"request_id": event_id, "quote": "it's \\ fine"})


def make(tmp_path: Path, **kw: object) -> ClickHouseUsageStore:
    return ClickHouseUsageStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "log"),
                                **kw)  # type: ignore[arg-type]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ClickHouseUsageStore]:
    s = make(tmp_path, flush_interval_s=3600)  # flushed only when a test says so
    await s.open()
    yield s
    await s.close()


async def test_ids_are_claimed_once_per_tenant_before_and_after_the_flush(store: ClickHouseUsageStore) -> None:
    first = await store.record([event("e1"), event("e2"), event("e1")])
    assert (first.recorded, first.duplicates) == (2, 1)
    assert (await store.record([event("e1", requests=7)])).duplicates == 1  # in the log only
    await store.flush()
    assert store.pending_events == 0
    again = await store.record([event("e1"), event("e2"), event("e3")])  # in ClickHouse only
    assert (again.recorded, again.duplicates) == (1, 2)
    other = await store.record([event("e1", "globex", requests=3)])
    assert other.recorded == 1
    totals = await store.totals("acme", MONTH)  # e3 is still in the log: counted once
    assert (totals.requests, totals.input_tokens, totals.output_tokens, totals.events) == (3, 30, 15, 3)
    assert (await store.totals("globex", MONTH)).requests == 3


async def test_a_replay_into_clickhouse_is_never_double_counted(store: ClickHouseUsageStore) -> None:
    await store.record([event(f"e{i}") for i in range(100)])
    await store.flush()
    # What a crash between the insert and the log's checkpoint leads to: the same rows again.
    rows = [(e.tenant_id, e.event_id, e.kind.value, e.model, e.requests, e.input_tokens, e.output_tokens,
             e.occur_time, NOW, dict(e.attributes)) for e in (event(f"e{i}") for i in range(100))]
    await store.db.insert(rows)
    assert (await store.totals("acme", MONTH)).events == 100
    assert await store.stored_count("acme") == 100
    quota = await store.quota_usage("acme", hour_window(NOW), MONTH)
    assert (quota.requests_in_hour, quota.tokens_in_month) == (100, 1500)


async def test_acknowledged_events_survive_a_restart_without_a_flush(tmp_path: Path) -> None:
    first = make(tmp_path, flush_interval_s=3600)
    await first.open()
    await first.record([event(f"e{i}") for i in range(30)])
    await first.flush()
    await first.record([event(f"f{i}") for i in range(20)])
    assert first.pending_events == 20
    # As after kill -9: the flusher never ran again and nothing was closed.
    await first.abandon()
    await first.db.close()
    await first.log.close()

    second = make(tmp_path, flush_interval_s=3600)
    await second.open()
    try:
        # Replayed from the log into ClickHouse before serving.
        assert second.pending_events == 0
        assert await second.stored_count("acme") == 50
        assert (await second.totals("acme", MONTH)).events == 50
        replay = await second.record([event(f"e{i}") for i in range(30)] + [event(f"f{i}") for i in range(20)])
        assert (replay.recorded, replay.duplicates) == (0, 50)
        await second.flush()
        assert await second.stored_count("acme") == 50
    finally:
        await second.close()


async def test_a_torn_log_tail_is_cut_off(tmp_path: Path) -> None:
    first = make(tmp_path, flush_interval_s=3600)
    await first.open()
    await first.record([event("a")])
    await first.close()
    segment = sorted((tmp_path / "log").glob("*.log"))[-1]
    # A record header promising more than was written: a crash mid-append.
    segment.write_bytes(segment.read_bytes() + b"\x00\x00\x01\x00garbage")

    second = make(tmp_path, flush_interval_s=3600)
    await second.open()
    try:
        assert (await second.totals("acme", MONTH)).events == 1
        assert (await second.record([event("b")])).recorded == 1
    finally:
        await second.close()
    third = make(tmp_path, flush_interval_s=3600)
    await third.open()
    try:
        assert (await third.totals("acme", MONTH)).events == 2
    finally:
        await third.close()


async def test_a_failed_append_claims_no_ids_and_the_retry_counts(store: ClickHouseUsageStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(5, "disk on fire")

    monkeypatch.setattr(os, "fdatasync", fail)
    with pytest.raises(Unavailable):
        await store.record([event("e1"), event("e2")])
    monkeypatch.undo()
    assert (await store.totals("acme", MONTH)).events == 0
    retry = await store.record([event("e1"), event("e2")])
    assert (retry.recorded, retry.duplicates) == (2, 0)
    assert (await store.quota_usage("acme", hour_window(NOW), MONTH)).requests_in_hour == 2


async def test_quota_counters_follow_every_acknowledged_event(store: ClickHouseUsageStore) -> None:
    hour = hour_window(NOW)
    await store.record([event("old", requests=4, at=hour.start - timedelta(seconds=1))])
    await store.flush()
    old_in_month = hour.start - timedelta(seconds=1) >= MONTH.start
    usage = await store.quota_usage("acme", hour, MONTH)  # loaded from ClickHouse
    assert usage.requests_in_hour == 0
    assert usage.tokens_in_month == (15 if old_in_month else 0)
    for i in range(5):
        await store.record([event(f"n{i}", requests=1, input_tokens=1, output_tokens=1, at=hour.start)])
        assert (await store.quota_usage("acme", hour, MONTH)).requests_in_hour == i + 1
    store.forget("acme")  # reloaded from ClickHouse + the log: the same answer
    reloaded = await store.quota_usage("acme", hour, MONTH)
    assert reloaded.requests_in_hour == 5
    assert reloaded.tokens_in_month == (15 if old_in_month else 0) + 10


async def test_totals_by_model_and_half_open_period(store: ClickHouseUsageStore) -> None:
    await store.record([
        event("a", model="m1", requests=1, input_tokens=100, output_tokens=10),
        event("b", model="m2", requests=2, input_tokens=200, output_tokens=20),
    ])
    await store.flush()
    await store.record([event("c", model="m1", requests=1, input_tokens=1, output_tokens=1),
                        event("other", "globex")])
    totals = await store.totals("acme", MONTH)
    assert [(m.model, m.requests, m.input_tokens, m.output_tokens) for m in totals.by_model] == [
        ("m1", 2, 101, 11), ("m2", 2, 200, 20)]
    assert (await store.totals("acme", Window(MONTH.start, NOW))).events == 0


async def test_interval_totals_per_tenant(store: ClickHouseUsageStore) -> None:
    await store.record([event("a"), event("b", "globex", requests=2, input_tokens=1, output_tokens=1)])
    totals = await store.interval_totals(MONTH)
    assert totals == {"acme": (1, 15), "globex": (2, 2)}


def test_parameters_render_as_clickhouse_text() -> None:
    assert param_text(["a", "it's", "b\\c"]) == "['a','it\\'s','b\\\\c']"
    assert param_text(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == "2026-01-02 03:04:05.000006"
    assert "FINAL" in clickhouse.TOTALS_SQL and "FINAL" in clickhouse.HOURLY_SQL


async def test_quota_counts_usage_while_it_is_being_made_durable(store: ClickHouseUsageStore,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hour = hour_window(NOW)
    await store.record([event("seen", at=hour.start)])
    assert (await store.quota_usage("acme", hour, MONTH)).requests_in_hour == 1  # counters loaded
    release = asyncio.Event()
    fail = False
    real_append = store.log.append

    async def slow_append(events: Any, record_time: datetime) -> Any:
        await release.wait()
        if fail:
            raise Unavailable("disk gone")
        return await real_append(events, record_time)

    monkeypatch.setattr(store.log, "append", slow_append)
    # A new event and a retry of a recorded one: both counted at once, the retry taken back.
    pending = asyncio.ensure_future(store.record([event("new", at=hour.start), event("seen", at=hour.start)]))
    await asyncio.sleep(0.05)
    assert (await store.quota_usage("acme", hour, MONTH)).requests_in_hour >= 2
    release.set()
    assert (await pending).recorded == 1
    assert (await store.quota_usage("acme", hour, MONTH)).requests_in_hour == 2
    # A failed write takes its provisional count back.
    release.clear()
    fail = True
    pending = asyncio.ensure_future(store.record([event("lost", at=hour.start)]))
    await asyncio.sleep(0.05)
    assert (await store.quota_usage("acme", hour, MONTH)).requests_in_hour == 3
    release.set()
    with pytest.raises(Unavailable):
        await pending
    assert (await store.quota_usage("acme", hour, MONTH)).requests_in_hour == 2
    store.forget("acme")
    assert (await store.quota_usage("acme", hour, MONTH)).requests_in_hour == 2
