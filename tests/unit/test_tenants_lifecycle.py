"""Tenant lifecycle through the built metering server: onboarding provisions the tenant in
retrieval (as the tenant's service account) and in Stripe; suspension; deletion erases it
everywhere and anonymises its usage; every change is pushed to WatchTenants streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import timestamp_pb2

from copilot.v1 import (
    common_pb2,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from servers.common import identity
from servers.common.errors import Unavailable
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.settings import Settings
from servers.metering.storage import clickhouse
from tests.fakes.stripe_server import FakeStripe
from tests.unit.test_metering_grpc import OPERATOR, _serve, _stop, member, service

Metadata = tuple[tuple[str, str], ...]


@dataclass
class RetrievalStub(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Stands in for the retrieval service's lifecycle RPCs and records who called them."""

    calls: list[tuple[str, str, str, frozenset[str]]] = field(default_factory=list)
    fail: bool = False

    def _record(self, method: str) -> None:
        caller = identity.require_role(identity.SERVICE)
        self.calls.append((method, caller.tenant_id, caller.subject, caller.roles))
        if self.fail:
            raise Unavailable("retrieval is down")

    async def ProvisionTenant(self, request: Any, context: Any) -> retrieval_pb2.ProvisionTenantResponse:
        self._record("provision")
        return retrieval_pb2.ProvisionTenantResponse()

    async def EraseTenant(self, request: Any, context: Any) -> retrieval_pb2.EraseTenantResponse:
        self._record("erase")
        return retrieval_pb2.EraseTenantResponse()


@pytest.fixture
async def retrieval() -> AsyncIterator[tuple[RetrievalStub, int]]:
    stub = RetrievalStub()
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield stub, port
    await server.stop(None)


@pytest.fixture
def stripe_fake() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


async def test_onboarding_suspension_deletion_and_watch(tmp_path: Path, retrieval: tuple[RetrievalStub, int],
                                                        stripe_fake: FakeStripe) -> None:
    stub, retrieval_port = retrieval
    settings = replace(Settings.from_env(), data_dir=tmp_path, host="127.0.0.1", metering_port=0,
                       retrieval_port=retrieval_port, tenant_cache_ttl_s=0.0, stripe_api_key="sk_test_fake",
                       stripe_api_base=stripe_fake.url, usage_on_delete="anonymise")
    server, built, health, port = await _serve(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            tenants = tenant_pb2_grpc.TenantServiceStub(channel)
            metering = metering_pb2_grpc.MeteringServiceStub(channel)
            watch = tenants.WatchTenants(tenant_pb2.WatchTenantsRequest(), metadata=service("platform"))
            first = cast(tenant_pb2.WatchTenantsResponse, await watch.read())
            assert list(first.tenants) == []
            assert cast(tenant_pb2.WatchTenantsResponse, await watch.read()).snapshot_done

            created = await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
                tenant_id="acme", plan=common_pb2.PLAN_PRO), metadata=OPERATOR)
            assert stub.calls == [("provision", "acme", "service:metering", frozenset({"service"}))]
            assert [c["metadata"]["tenant_id"] for c in stripe_fake.state.customers.values()] == ["acme"]
            pushed = cast(tenant_pb2.WatchTenantsResponse, await asyncio.wait_for(watch.read(), 5))
            assert [t.tenant_id for t in pushed.tenants] == ["acme"]
            assert pushed.tenants[0].config_version == created.tenant.config_version

            event = metering_pb2.UsageEvent(event_id="e1", kind=metering_pb2.USAGE_KIND_QUERY, model="gpt-4o-mini",
                                            requests=2, input_tokens=1000, output_tokens=1000,
                                            occur_time=ts(datetime.now(UTC) - timedelta(seconds=1)))
            await metering.RecordUsage(metering_pb2.RecordUsageRequest(events=[event]), metadata=service("acme"))
            usage = await metering.GetUsage(metering_pb2.GetUsageRequest(), metadata=member("acme"))
            # Price table: 1,000 micros a request, 150 / 600 micros per 1,000 tokens in / out.
            assert (usage.cost_micros, usage.currency) == (2 * 1000 + 150 + 600, "usd")
            assert usage.by_model[0].cost_micros == usage.cost_micros

            suspended = await tenants.SuspendTenant(tenant_pb2.SuspendTenantRequest(
                tenant_id="acme", suspended=True), metadata=OPERATOR)
            assert suspended.tenant.state == tenant_pb2.TENANT_STATE_SUSPENDED
            pushed = cast(tenant_pb2.WatchTenantsResponse, await asyncio.wait_for(watch.read(), 5))
            assert pushed.tenants[0].state == tenant_pb2.TENANT_STATE_SUSPENDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await metering.CheckQuota(metering_pb2.CheckQuotaRequest(), metadata=member("acme"))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tenants.SuspendTenant(tenant_pb2.SuspendTenantRequest(tenant_id="acme"),
                                            metadata=member("acme"))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

            await tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id="acme"), metadata=OPERATOR)
            assert stub.calls[-1] == ("erase", "acme", "service:metering", frozenset({"service"}))
            assert stripe_fake.state.customers == {}
            pushed = cast(tenant_pb2.WatchTenantsResponse, await asyncio.wait_for(watch.read(), 5))
            assert list(pushed.deleted_tenant_ids) == ["acme"]
            gone = await metering.GetUsage(metering_pb2.GetUsageRequest(tenant_id="acme"), metadata=OPERATOR)
            assert gone.events == 0
            watch.cancel()
        # The usage rows are kept, under an anonymous id and without their attributes.
        usage_store = built_usage(built)
        rows = await usage_store.db.query(
            f"SELECT tenant_id, requests, attributes FROM {clickhouse.TABLE} FINAL WHERE event_id = 'e1'")
        assert len(rows) == 1 and rows[0][0].startswith("deleted-") and rows[0][1] == 2 and rows[0][2] == {}
    finally:
        await _stop(server, built, health)


def built_usage(built: Any) -> Any:
    # The usage store is the one whose close hook the built service registered.
    for hook in built.on_stop:
        owner = getattr(hook, "__self__", None)
        if owner is not None and hasattr(owner, "db"):
            return owner
    raise AssertionError("no ClickHouse usage store in the built server")


async def test_a_failed_provisioning_creates_nothing(tmp_path: Path, retrieval: tuple[RetrievalStub, int]) -> None:
    stub, retrieval_port = retrieval
    stub.fail = True
    settings = replace(Settings.from_env(), data_dir=tmp_path, host="127.0.0.1", metering_port=0,
                       retrieval_port=retrieval_port, tenant_cache_ttl_s=0.0)
    server, built, health, port = await _serve(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            tenants = tenant_pb2_grpc.TenantServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id="acme"), metadata=OPERATOR)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tenants.GetTenant(tenant_pb2.GetTenantRequest(tenant_id="acme"), metadata=OPERATOR)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # Provisioned things were rolled back (erase is idempotent, so it is always called).
            assert [c[0] for c in stub.calls] == ["provision", "erase"]
            stub.fail = False
            await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id="acme"), metadata=OPERATOR)
    finally:
        await _stop(server, built, health)


def test_a_watcher_that_falls_behind_is_told_to_start_over() -> None:
    from servers.metering.tenants.onboarding import TenantChange, TenantWatchers

    watchers = TenantWatchers(max_queue=3)
    slow, fast = watchers.subscribe(), watchers.subscribe()
    for i in range(3):
        watchers.publish(TenantChange(deleted=(f"t{i}",)))
    fast.get_nowait(), fast.get_nowait(), fast.get_nowait()
    watchers.publish(TenantChange(deleted=("t3",)))
    assert slow.get_nowait() is None and slow.empty()  # dropped: its stream ends with WATCH_RESET
    assert fast.get_nowait() == TenantChange(deleted=("t3",))
    assert watchers.watchers == 1
