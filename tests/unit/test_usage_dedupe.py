"""A first delivery skips metering's ClickHouse lookup only where memory proves its ids new
(servers/metering/storage/flusher.py, `RecentKeys`), and every duplicate is still counted
once: the same id again unmarked (Envoy retrying an Answer on another generation replica),
marked as a redelivery, after an orderly restart and after a crash. Real chDB, real logs."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc

from copilot.v1 import common_pb2, metering_pb2, metering_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.lifecycle import connect
from servers.generation.clients import MeteringClient, usage_event
from servers.generation.models import Usage
from servers.metering.audit.chain import NewEvent
from servers.metering.audit.store import AUDIT_CODEC, AuditStore
from servers.metering.storage.clickhouse import ChdbBackend
from servers.metering.storage.flusher import RecentKeys
from servers.metering.storage.log import LocalLog
from servers.metering.tenants.service import TenantServiceServicer
from servers.metering.tenants.store import CachedTenantStore, SqliteTenantStore
from servers.metering.usage.clickhouse_store import ClickHouseUsageStore
from servers.metering.usage.domain import UsageEvent, UsageKind, hour_window, month_window
from servers.metering.usage.service import MeteringServiceServicer

NOW = datetime.now(UTC).replace(microsecond=0)
MONTH = month_window(NOW)


def usage(event_id: str, tenant: str = "acme") -> UsageEvent:
    return UsageEvent(tenant_id=tenant, event_id=event_id, kind=UsageKind.QUERY, model="m1", requests=1,
                      input_tokens=10, output_tokens=5, occur_time=NOW)


def usage_store(tmp_path: Path) -> ClickHouseUsageStore:
    # Flushed only when a test says so.
    return ClickHouseUsageStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "log"), flush_interval_s=3600)


async def opened(store: ClickHouseUsageStore) -> ClickHouseUsageStore:
    await store.open()
    await store.recent_ids_loaded()
    return store


async def counted_once(store: ClickHouseUsageStore, *ids: str) -> None:
    totals = await store.totals("acme", MONTH)
    assert totals.events == len(ids) and totals.requests == len(ids)
    quota = await store.quota_usage("acme", hour_window(NOW), MONTH)
    assert (quota.requests_in_hour, quota.tokens_in_month) == (len(ids), 15 * len(ids))
    assert (await store.current_totals("acme", MONTH, NOW) or totals).events == len(ids)
    assert await store.stored_count("acme") + store.pending_events == len(ids)


async def test_a_new_id_skips_clickhouse_and_the_same_id_again_is_still_a_duplicate(tmp_path: Path) -> None:
    store = await opened(usage_store(tmp_path))
    try:
        assert (await store.record([usage("a1"), usage("a2")], redelivery=False)).recorded == 2
        assert (store.lookups, store.lookups_skipped) == (0, 1)
        await store.flush()
        # Out of the log, in ClickHouse only: an unmarked repeat (another generation replica
        # answering the retried request) is found, and so is a marked one.
        again = await store.record([usage("a1"), usage("a3")], redelivery=False)
        assert (again.recorded, again.duplicates) == (1, 1)
        assert store.lookups == 1
        assert (await store.record([usage("a2")], redelivery=True)).duplicates == 1
        # A redelivery asks ClickHouse even about ids memory has never seen.
        assert (await store.record([usage("a4")], redelivery=True)).recorded == 1
        assert store.lookups == 3
        await counted_once(store, "a1", "a2", "a3", "a4")
    finally:
        await store.close()


async def test_after_a_restart_a_stored_id_delivered_again_unmarked_counts_once(tmp_path: Path) -> None:
    first = await opened(usage_store(tmp_path))
    await first.record([usage("b1"), usage("b2")], redelivery=False)
    await first.close()  # orderly: flushed into ClickHouse, the log empty
    second = await opened(usage_store(tmp_path))
    try:
        result = await second.record([usage("b1"), usage("b2"), usage("b3")], redelivery=False)
        assert (result.recorded, result.duplicates) == (1, 2)
        await counted_once(second, "b1", "b2", "b3")
    finally:
        await second.close()


async def test_after_a_crash_replayed_and_flushed_ids_delivered_again_unmarked_count_once(tmp_path: Path) -> None:
    first = await opened(usage_store(tmp_path))
    await first.record([usage("c1")], redelivery=False)
    await first.flush()
    await first.record([usage("c2")], redelivery=False)  # in the log only
    await first.abandon()  # as kill -9: nothing more flushed or committed
    await first.db.close()
    second = await opened(usage_store(tmp_path))  # replays c2 into ClickHouse before serving
    try:
        assert second.pending_events == 0
        result = await second.record([usage("c1"), usage("c2")], redelivery=False)
        assert (result.recorded, result.duplicates) == (0, 2)
        await counted_once(second, "c1", "c2")
    finally:
        await second.close()


async def test_before_the_recent_ids_are_loaded_every_first_delivery_is_looked_up(tmp_path: Path) -> None:
    first = await opened(usage_store(tmp_path))
    await first.record([usage("d1")], redelivery=False)
    await first.close()
    second = usage_store(tmp_path)
    await second.open()
    try:
        # Whatever the loader has done by now, the stored id is found.
        assert (await second.record([usage("d1")], redelivery=False)).duplicates == 1
        await second.recent_ids_loaded()
        assert (await second.record([usage("d2")], redelivery=False)).recorded == 1
        await counted_once(second, "d1", "d2")
    finally:
        await second.close()


def audit_event(n: int) -> NewEvent:
    return NewEvent(tenant_id="acme", event_id=f"e{n}", kind="question", actor="alice", actor_roles="member",
                    service="generation", occur_time=datetime.now(UTC), details=json.dumps({"n": n}),
                    retention_days=365)


def audit_store(tmp_path: Path) -> AuditStore:
    return AuditStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "audit-log", codec=AUDIT_CODEC),
                      owns_db=True, flush_interval_s=3600)


async def test_an_audit_event_retried_unmarked_after_a_restart_is_chained_once(tmp_path: Path) -> None:
    first = audit_store(tmp_path)
    await first.open()
    await first.recent_ids_loaded()
    assert await first.record([audit_event(1), audit_event(2)], check_stored=False) == (2, 0)
    await first.close()
    # gRPC's retry of the call whose first attempt the dead process had recorded: unmarked.
    second = audit_store(tmp_path)
    await second.open()
    try:
        assert await second.record([audit_event(2), audit_event(3)], check_stored=False) == (1, 1)
        await second.recent_ids_loaded()
        assert await second.record([audit_event(1), audit_event(4)], check_stored=False) == (1, 1)
        page = await second.list_page("acme", after=0, limit=10)
        assert [r.event_id for r in page.rows] == ["e1", "e2", "e3", "e4"]
        assert (await second.verify("acme")).ok
    finally:
        await second.close()


def test_recent_keys_vouch_only_for_the_span_they_cover() -> None:
    recent = RecentKeys(span_s=300)
    start = recent.since
    assert not recent.covers_span(start + 299)
    recent.add([("t", "x")], now=start + 1)
    assert recent.maybe_recorded(("t", "x")) and not recent.maybe_recorded(("t", "y"))
    assert recent.covers_span(start + 300)
    # Keys go a generation at a time once they are older than the span; memory stays
    # complete for the span.
    recent.add([("t", "z")], now=start + 301)
    assert recent.maybe_recorded(("t", "x")) and recent.maybe_recorded(("t", "z"))
    assert recent.covers_span(start + 400)
    recent.add([("t", "w")], now=start + 602)
    assert not recent.maybe_recorded(("t", "x")) and recent.maybe_recorded(("t", "z"))
    assert recent.covers_span(start + 602)


def test_recent_keys_loaded_from_before_the_start_cover_the_span_at_once() -> None:
    recent = RecentKeys(span_s=300)
    start = recent.since
    recent.loaded([("t", "old")], from_monotonic=start - 300)
    assert recent.covers_span(start) and recent.maybe_recorded(("t", "old"))


def test_recent_keys_beyond_their_capacity_stop_vouching_until_the_span_is_covered_again() -> None:
    recent = RecentKeys(span_s=60, capacity=100)
    start = recent.since
    recent.loaded([], from_monotonic=start - 60)
    assert recent.covers_span(start)
    keys = [(str(i), "e") for i in range(250)]
    recent.add(keys, now=start + 1)
    assert len(recent) <= 200
    assert not recent.covers_span(start + 2)
    assert all(recent.maybe_recorded(k) for k in keys[-100:])
    assert recent.covers_span(start + 62)


def test_recent_keys_rarely_mistake_a_new_key_for_a_recorded_one() -> None:
    recent = RecentKeys(span_s=60, capacity=10_000)
    recent.add((("t", f"seen-{i}") for i in range(10_000)), now=recent.since)
    mistaken = sum(recent.maybe_recorded(("t", f"new-{i}")) for i in range(10_000))
    assert mistaken < 300  # each one costs a lookup, never a wrong answer


class FirstCallSlow(MeteringServiceServicer):
    """The real MeteringService whose first RecordUsage answers only after the caller's
    timeout (it still records), keeping each call's `redelivery` flag."""

    def __init__(self, *args: object, delay_s: float, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.delay_s = delay_s
        self.flags: list[bool] = []

    async def RecordUsage(self, request: metering_pb2.RecordUsageRequest,
                          context: grpc.aio.ServicerContext[metering_pb2.RecordUsageRequest,
                                                            metering_pb2.RecordUsageResponse],
                          ) -> metering_pb2.RecordUsageResponse:
        self.flags.append(request.redelivery)
        if len(self.flags) == 1:
            await asyncio.sleep(self.delay_s)
        return await super().RecordUsage(request, context)


async def test_generations_retry_after_a_timeout_is_marked_a_redelivery_and_counted_once(tmp_path: Path) -> None:
    tenants = CachedTenantStore(SqliteTenantStore(tmp_path / "tenants.sqlite"), ttl_s=0.0)
    await tenants.open()
    store = await opened(usage_store(tmp_path))
    servicer = FirstCallSlow(tenants, store, delay_s=0.6)
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server)
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(TenantServiceServicer(tenants), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = connect(f"127.0.0.1:{port}")
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await tenant_pb2_grpc.TenantServiceStub(plain).CreateTenant(
            tenant_pb2.CreateTenantRequest(tenant_id="acme", plan=common_pb2.PLAN_FREE),
            metadata=(("x-tenant-id", "platform"), ("x-user-id", "ops"), ("x-roles", "operator")))
        event = usage_event(Usage(event_id="answer:r1", tenant_id="acme", user="alice", provider="extractive",
                                  model="m1", input_tokens=10, output_tokens=5, occurred_at_s=int(time.time())))
        await MeteringClient(channel, usage_timeout_s=0.3).record_usage("acme", [event])
        # The first attempt timed out at the caller but was recorded; the retry said it may
        # have been, and the event counts once.
        assert servicer.flags[0] is False and all(servicer.flags[1:]) and len(servicer.flags) >= 2
        await asyncio.sleep(servicer.delay_s)
        totals = await store.totals("acme", MONTH)
        assert (totals.events, totals.requests) == (1, 1)
    finally:
        await plain.close(None)
        await channel.close(None)
        await server.stop(None)
        await store.close()
        await tenants.close()
