"""Tenant limits: loaded from TenantService as the edge's service account, cached, refreshed."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common import identity
from servers.common.settings import Settings
from servers.edge import config
from servers.edge.config import FREE_LIMITS, SUSPENDED_LIMITS, TenantLimits, limits_of, tenant_limits


def tenant(tenant_id: str, rps: int = 0, rpm: int = 0, rph: int = 0,
           state: tenant_pb2.TenantState = tenant_pb2.TENANT_STATE_ACTIVE) -> tenant_pb2.Tenant:
    return tenant_pb2.Tenant(tenant_id=tenant_id, state=state, limits=tenant_pb2.TenantLimits(
        requests_per_second=rps, requests_per_minute=rpm, requests_per_hour=rph))


def test_tenant_limits_follow_state_and_record() -> None:
    assert tenant_limits(tenant("acme", 50, 2000, 50_000)) == limits_of(50, 2000, 50_000)
    assert tenant_limits(tenant("acme", 50, 0, 0)) == limits_of(50, 0, 0)
    assert tenant_limits(tenant("acme")) == FREE_LIMITS  # no limits recorded: not unlimited
    assert tenant_limits(tenant("acme", 50, state=tenant_pb2.TENANT_STATE_SUSPENDED)) == SUSPENDED_LIMITS


async def test_refresh_swaps_the_table_and_keeps_it_when_the_source_fails() -> None:
    tenants = [tenant("acme", 50, 100, 1000)]
    failing = False

    async def source() -> list[tenant_pb2.Tenant]:
        if failing:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       None, None)
        return list(tenants)

    limits = TenantLimits(source, refresh_s=0.05)
    assert limits.get("acme") == FREE_LIMITS and not limits.loaded
    assert limits.get(identity.PLATFORM_TENANT) == config.PLATFORM_LIMITS
    await limits.start()
    try:
        assert limits.loaded and limits.get("acme") == limits_of(50, 100, 1000)
        assert limits.get("newco") == FREE_LIMITS
        assert limits.get(identity.PLATFORM_TENANT) == config.PLATFORM_LIMITS
        tenants.append(tenant("acme", 1, 1, 1, state=tenant_pb2.TENANT_STATE_SUSPENDED))
        tenants.pop(0)
        for _ in range(100):  # the background refresh picks the change up
            if limits.get("acme") == SUSPENDED_LIMITS:
                break
            await asyncio.sleep(0.02)
        assert limits.get("acme") == SUSPENDED_LIMITS
        failing = True
        assert not await limits.refresh()
        assert limits.get("acme") == SUSPENDED_LIMITS
    finally:
        await limits.stop()


class FakeTenants(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, count: int, page_tokens_loop: bool = False) -> None:
        self.tenants = [tenant(f"t{i:04d}", rps=i + 1) for i in range(count)]
        self.callers: list[dict[str, str]] = []
        self.page_sizes: list[int] = []
        self._loop = page_tokens_loop

    async def ListTenants(self, request: tenant_pb2.ListTenantsRequest,
                          context: grpc.aio.ServicerContext) -> tenant_pb2.ListTenantsResponse:
        self.callers.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        self.page_sizes.append(request.page_size)
        start = int(request.page_token or 0)
        size = 7  # smaller than asked: the client must follow the tokens
        page = self.tenants[start:start + size]
        more = start + size < len(self.tenants)
        token = "0" if self._loop else (str(start + size) if more else "")
        return tenant_pb2.ListTenantsResponse(tenants=page, next_page_token=token)


async def serve(servicer: FakeTenants) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_loads_every_page_as_the_edge_service_account() -> None:
    fake = FakeTenants(count=30)
    server, port = await serve(fake)
    settings = dataclasses.replace(Settings.from_env(), host="127.0.0.1", metering_port=port)
    limits = TenantLimits.from_settings(settings)
    try:
        assert await limits.refresh()
        assert len(limits) == 30
        assert limits.get("t0029") == limits_of(30, 0, 0)
        assert len(fake.callers) == 5  # 30 tenants, 7 per page
        caller = fake.callers[0]
        assert caller["x-tenant-id"] == identity.PLATFORM_TENANT
        assert caller["x-user-id"] == "service:edge"
        assert identity.OPERATOR in identity.parse_roles(caller["x-roles"])
        assert fake.page_sizes[0] == config.PAGE_SIZE
    finally:
        await limits.stop()
        await server.stop(None)


async def test_a_server_that_keeps_returning_the_same_page_token_does_not_loop_forever() -> None:
    fake = FakeTenants(count=3, page_tokens_loop=True)
    server, port = await serve(fake)
    settings = dataclasses.replace(Settings.from_env(), host="127.0.0.1", metering_port=port)
    limits = TenantLimits.from_settings(settings)
    try:
        assert await limits.refresh()
        assert len(fake.callers) == 2
    finally:
        await limits.stop()
        await server.stop(None)


async def test_unreachable_metering_leaves_the_free_plan_in_force() -> None:
    settings = dataclasses.replace(Settings.from_env(), host="127.0.0.1", metering_port=1)
    limits = TenantLimits.from_settings(settings)
    try:
        assert not await limits.refresh()
        assert limits.get("acme") == FREE_LIMITS
    finally:
        await limits.stop()


async def test_start_does_not_wait_long_for_a_hanging_tenant_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "STARTUP_WAIT_S", 0.1)

    async def hanging() -> list[tenant_pb2.Tenant]:
        await asyncio.sleep(30)
        return []

    limits = TenantLimits(hanging, refresh_s=60)
    started = asyncio.get_running_loop().time()
    await limits.start()
    try:
        assert asyncio.get_running_loop().time() - started < 1
        assert limits.get("acme") == FREE_LIMITS and not limits.loaded
    finally:
        await limits.stop()


def test_pushed_changes_apply_at_once() -> None:
    from servers.edge.config import DELETED, SUSPENDED

    async def nothing() -> list[tenant_pb2.Tenant]:
        return []

    table = TenantLimits(nothing, 60.0)
    created = tenant_pb2.Tenant(tenant_id="fresh-co", display_name="Fresh",
                                limits=tenant_pb2.TenantLimits(requests_per_second=77))
    table.apply(tenant_pb2.WatchTenantsResponse(tenants=[created]))
    assert table.get("fresh-co") != table.get("never-heard-of")
    assert ("fresh-co", "Fresh") in table.active_tenants()
    created.state = tenant_pb2.TENANT_STATE_SUSPENDED
    table.apply(tenant_pb2.WatchTenantsResponse(tenants=[created]))
    assert table.refused["fresh-co"] == SUSPENDED
    table.apply(tenant_pb2.WatchTenantsResponse(deleted_tenant_ids=["fresh-co"]))
    assert table.refused["fresh-co"] == DELETED and ("fresh-co", "Fresh") not in table.active_tenants()


async def test_a_live_watch_replaces_the_periodic_listing_and_its_loss_brings_it_back() -> None:
    listings = 0
    tenants = [tenant("acme", 50, 100, 1000)]
    pushes: asyncio.Queue[tenant_pb2.WatchTenantsResponse | None] = asyncio.Queue()

    async def source() -> list[tenant_pb2.Tenant]:
        nonlocal listings
        listings += 1
        return list(tenants)

    dropped = False

    async def watch() -> AsyncIterator[tenant_pb2.WatchTenantsResponse]:
        if dropped:  # metering is restarting: every reconnect fails until the test ends
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       None, None)
        yield tenant_pb2.WatchTenantsResponse(tenants=list(tenants))
        yield tenant_pb2.WatchTenantsResponse(snapshot_done=True)
        while (change := await pushes.get()) is not None:
            yield change
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), None, None)

    limits = TenantLimits(source, refresh_s=0.05, watch=watch)
    await limits.start()
    try:
        for _ in range(100):
            if limits.watch_live:
                break
            await asyncio.sleep(0.01)
        assert limits.watch_live
        quiet_from = listings
        await asyncio.sleep(0.3)  # six refresh periods
        assert listings == quiet_from  # nothing listed while the watch is live
        pushes.put_nowait(tenant_pb2.WatchTenantsResponse(tenants=[tenant("acme", 7, 7, 7)]))
        for _ in range(100):
            if limits.get("acme") == limits_of(7, 7, 7):
                break
            await asyncio.sleep(0.01)
        assert limits.get("acme") == limits_of(7, 7, 7)
        dropped = True
        pushes.put_nowait(None)  # the watch drops: the periodic listing resumes
        for _ in range(100):
            if listings > quiet_from + 1:
                break
            await asyncio.sleep(0.01)
        assert listings > quiet_from + 1
    finally:
        await limits.stop()


async def test_a_missing_tenant_is_remembered_until_it_is_created() -> None:
    created: set[str] = set()
    lookups: list[str] = []

    async def source() -> list[tenant_pb2.Tenant]:
        return []

    async def lookup(tenant_id: str) -> tenant_pb2.Tenant | None:
        lookups.append(tenant_id)
        await asyncio.sleep(0.01)
        return tenant(tenant_id, rps=7) if tenant_id in created else None

    limits = TenantLimits(source, refresh_s=60, lookup=lookup)
    assert limits.known("ghost") is None
    assert limits.known(identity.PLATFORM_TENANT) == config.PLATFORM_LIMITS
    # Concurrent first calls share one lookup; later ones hit the negative cache.
    assert await asyncio.gather(*(limits.confirm("ghost") for _ in range(5))) == [config.UNKNOWN] * 5
    assert await limits.confirm("ghost") == config.UNKNOWN
    assert lookups == ["ghost"]
    # Created (and pushed by the watch): admitted at once, with its own limits.
    created.add("ghost")
    limits.apply(tenant_pb2.WatchTenantsResponse(tenants=[tenant("ghost", rps=7)]))
    assert limits.known("ghost") == limits_of(7, 0, 0)
    # Created with no push yet (the watch is down): the negative answer expires with the
    # refresh period, and a lookup then finds it.
    limits = TenantLimits(source, refresh_s=0.1, lookup=lookup)
    assert await limits.confirm("late") == config.UNKNOWN
    created.add("late")
    assert await limits.confirm("late") == config.UNKNOWN
    await asyncio.sleep(0.15)
    assert await limits.confirm("late") is None and limits.known("late") == limits_of(7, 0, 0)
    suspended = tenant("frozen", state=tenant_pb2.TENANT_STATE_SUSPENDED)

    async def frozen(tenant_id: str) -> tenant_pb2.Tenant | None:
        return suspended

    limits = TenantLimits(source, refresh_s=60, lookup=frozen)
    assert await limits.confirm("frozen") == config.SUSPENDED and limits.refused["frozen"] == config.SUSPENDED


def test_without_a_lookup_unknown_tenants_get_the_free_plan() -> None:
    async def source() -> list[tenant_pb2.Tenant]:
        return []

    assert TenantLimits(source, refresh_s=60).known("newco") == FREE_LIMITS
