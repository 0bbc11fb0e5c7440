"""The generation server's tenant config cache: served from memory until its TTL, fetched
again (once for concurrent callers) when expired."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from copilot.v1 import tenant_pb2
from servers.common import identity
from servers.generation import tenant_config
from servers.generation.tenant_config import TenantConfigCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Stub:
    def __init__(self) -> None:
        self.calls = 0
        self.version = 1
        self.gate: asyncio.Event | None = None

    async def GetTenant(self, request: Any, **kwargs: Any) -> tenant_pb2.GetTenantResponse:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return tenant_pb2.GetTenantResponse(tenant=tenant_pb2.Tenant(
            tenant_id=identity.tenant_id(), config_version=self.version))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(tenant_config, "time", fake)
    return fake


def _as(tenant: str) -> Any:
    return identity.acting_as(identity.Identity(tenant_id=tenant, subject="u", roles=frozenset({"member"})))


async def test_an_expired_entry_is_never_served(clock: Clock) -> None:
    stub = Stub()
    cache = TenantConfigCache(stub, ttl_s=4.0)  # type: ignore[arg-type]
    with _as("acme-corp"):
        await cache.get()
        clock.now += 3.9  # fresh: from memory
        assert (await cache.get()).version == 1 and stub.calls == 1
        stub.version = 3
        clock.now += 0.2  # past the TTL: the caller waits for the new config
        assert (await cache.get()).version == 3 and stub.calls == 2


async def test_concurrent_misses_share_one_fetch(clock: Clock) -> None:
    stub = Stub()
    stub.gate = asyncio.Event()
    cache = TenantConfigCache(stub, ttl_s=4.0)  # type: ignore[arg-type]
    with _as("acme-corp"):
        waiting = [asyncio.ensure_future(cache.get()) for _ in range(5)]
        await asyncio.sleep(0)
        stub.gate.set()
        configs = await asyncio.gather(*waiting)
    assert stub.calls == 1 and {c.tenant_id for c in configs} == {"acme-corp"}


def _tenant(tenant_id: str, version: int, top_k: int = 5) -> tenant_pb2.Tenant:
    return tenant_pb2.Tenant(tenant_id=tenant_id, config_version=version, config=tenant_pb2.TenantConfig(top_k=top_k))


async def test_pushed_changes_are_served_without_expiry_while_the_watch_is_live(clock: Clock) -> None:
    stub = Stub()
    cache = TenantConfigCache(stub, ttl_s=4.0)  # type: ignore[arg-type]
    snapshot: set[str] = set()
    cache.apply(tenant_pb2.WatchTenantsResponse(tenants=[_tenant("acme-corp", 2, top_k=3)]), snapshot)
    cache.apply(tenant_pb2.WatchTenantsResponse(snapshot_done=True), snapshot)
    cache.live = True
    with _as("acme-corp"):
        clock.now += 3600  # far past the TTL: the watch keeps the entry current
        assert (await cache.get()).top_k == 3 and stub.calls == 0
        cache.apply(tenant_pb2.WatchTenantsResponse(tenants=[_tenant("acme-corp", 3, top_k=7)]))
        assert (await cache.get()).top_k == 7
        # A change that arrives twice, the older copy last, does not win.
        cache.apply(tenant_pb2.WatchTenantsResponse(tenants=[_tenant("acme-corp", 2, top_k=3)]))
        assert (await cache.get()).top_k == 7 and stub.calls == 0
        # Without the watch the TTL applies again.
        cache.live = False
        stub.version = 4
        assert (await cache.get()).version == 3 and stub.calls == 0
        clock.now += 4.1
        assert (await cache.get()).version == 4 and stub.calls == 1


async def test_a_fetch_that_answers_after_a_push_does_not_undo_it(clock: Clock) -> None:
    stub = Stub()
    stub.gate = asyncio.Event()
    cache = TenantConfigCache(stub, ttl_s=4.0)  # type: ignore[arg-type]
    with _as("acme-corp"):
        fetching = asyncio.ensure_future(cache.get())
        await asyncio.sleep(0)
        cache.apply(tenant_pb2.WatchTenantsResponse(tenants=[_tenant("acme-corp", 9, top_k=9)]))
        stub.gate.set()  # the fetch answers with version 1, older than the push
        await fetching
        assert (await cache.get()).version == 9


async def test_a_new_snapshot_replaces_the_cache_and_drops_tenants_deleted_meanwhile(clock: Clock) -> None:
    cache = TenantConfigCache(Stub(), ttl_s=4.0)  # type: ignore[arg-type]
    cache.apply(tenant_pb2.WatchTenantsResponse(tenants=[_tenant("old-corp", 5), _tenant("gone-corp", 2)]))
    snapshot: set[str] = set()
    # old-corp was deleted and created again (version 1) while the watch was down.
    cache.apply(tenant_pb2.WatchTenantsResponse(tenants=[_tenant("old-corp", 1, top_k=4)]), snapshot)
    cache.apply(tenant_pb2.WatchTenantsResponse(snapshot_done=True), snapshot)
    cache.live = True
    with _as("old-corp"):
        assert (await cache.get()).top_k == 4
    cache.apply(tenant_pb2.WatchTenantsResponse(deleted_tenant_ids=["old-corp"]))
    stub_calls_before = cache.fetches
    with _as("gone-corp"):
        await cache.get()  # dropped by the snapshot: fetched again
    assert cache.fetches == stub_calls_before + 1


class WatchStub(Stub):
    """GetTenant as Stub, and a watch that sends a snapshot, then ends as a restarting server would."""

    def __init__(self, tenants: list[tenant_pb2.Tenant]) -> None:
        super().__init__()
        self.tenants = tenants
        self.dropped = asyncio.Event()
        self.hold = asyncio.Event()

    def WatchTenants(self, request: Any, **kwargs: Any) -> Any:
        async def stream() -> Any:
            yield tenant_pb2.WatchTenantsResponse(tenants=self.tenants)
            yield tenant_pb2.WatchTenantsResponse(snapshot_done=True)
            await self.hold.wait()
            self.dropped.set()
            raise ConnectionError("metering restarting")
        return stream()


async def test_when_the_watch_drops_entries_stay_valid_for_a_ttl_from_then(clock: Clock) -> None:
    stub = WatchStub([_tenant("acme-corp", 4, top_k=6)])
    cache = TenantConfigCache(stub, ttl_s=4.0)  # type: ignore[arg-type]
    await cache.start()
    try:
        for _ in range(100):
            if cache.live:
                break
            await asyncio.sleep(0.01)
        assert cache.live
        clock.now += 3600  # an hour on the live watch: the entry is current
        stub.hold.set()  # the watch breaks now
        await stub.dropped.wait()
        for _ in range(100):
            if not cache.live:
                break
            await asyncio.sleep(0.01)
        assert not cache.live
        with _as("acme-corp"):
            clock.now += 3.9  # within a TTL of the drop: served, no fetch
            assert (await cache.get()).top_k == 6 and stub.calls == 0
            clock.now += 0.2  # past it: fetched again
            await cache.get()
            assert stub.calls == 1
    finally:
        await cache.stop()
