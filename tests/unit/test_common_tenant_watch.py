"""The one tenant-watch follower (servers/common/tenant_watch.py) against the real
TenantService on a loopback grpc.aio server behind the identity interceptor, through a
channel built like the services' (`lifecycle.connect`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.lifecycle import connect
from servers.common.retry import Backoff
from servers.common.tenant_watch import TenantFollower, watch_as
from servers.metering.tenants.onboarding import TenantWatchers
from servers.metering.tenants.service import TenantServiceServicer
from servers.metering.tenants.store import CachedTenantStore, SqliteTenantStore

OPERATOR = (("x-tenant-id", "platform"), ("x-user-id", "ops"), ("x-roles", "operator"))
QUICK = Backoff(base_s=0.01, cap_s=0.05)


@dataclass
class Registry:
    tenants: tenant_pb2_grpc.TenantServiceAsyncStub
    watchers: TenantWatchers
    # The follower's view of the service: stub as generation and the edge make it.
    watched: tenant_pb2_grpc.TenantServiceAsyncStub

    async def create(self, tenant_id: str) -> None:
        await self.tenants.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id=tenant_id),
                                        metadata=OPERATOR)

    async def delete(self, tenant_id: str) -> None:
        await self.tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id=tenant_id),
                                        metadata=OPERATOR)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    store = CachedTenantStore(SqliteTenantStore(tmp_path / "tenants.sqlite"), ttl_s=0.0)
    await store.open()
    watchers = TenantWatchers()
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(TenantServiceServicer(store, watchers=watchers), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    service_channel = connect(f"127.0.0.1:{port}")
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Registry(tenant_pb2_grpc.TenantServiceStub(plain), watchers,
                       tenant_pb2_grpc.TenantServiceStub(service_channel))
    finally:
        for channel in (plain, service_channel):
            await channel.close(None)
        await server.stop(None)
        await store.close()


@dataclass
class Seen:
    """What the follower told its user, in order."""

    events: list[tuple[str, object]] = field(default_factory=list)

    def message(self, change: tenant_pb2.WatchTenantsResponse, snapshot: set[str] | None) -> None:
        self.events.append(("message", (sorted(t.tenant_id for t in change.tenants), list(change.deleted_tenant_ids),
                                        None if snapshot is None else sorted(snapshot), change.snapshot_done)))

    async def snapshot(self) -> bool:
        self.events.append(("snapshot", None))
        return True

    def down(self) -> None:
        self.events.append(("down", None))

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.events if k == kind)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


async def test_snapshot_then_changes_then_a_reconnect_with_a_fresh_snapshot(registry: Registry) -> None:
    await registry.create("acme-corp")
    await registry.create("globex-co")
    seen = Seen()
    follower = TenantFollower(watch_as(registry.watched, "test"), seen.message, reconnect=QUICK,
                              on_snapshot=seen.snapshot, on_down=seen.down)
    await follower.start()
    try:
        await eventually(lambda: follower.live)
        # The snapshot: every tenant, the ids collected so far handed along, then its end.
        done = [e for kind, e in seen.events if kind == "message" and e[3]]  # type: ignore[index]
        assert done and done[0][2] == ["acme-corp", "globex-co"]  # type: ignore[index]
        assert seen.events[-1] == ("snapshot", None)

        # Changes after the snapshot are not part of one.
        await registry.create("initech")
        await registry.delete("globex-co")
        await eventually(lambda: ("message", ([], ["globex-co"], None, False)) in seen.events)
        assert ("message", (["initech"], [], None, False)) in seen.events

        # The service resets the watch (as it does when stopping): down, then back with a new snapshot.
        registry.watchers.close()
        await eventually(lambda: seen.count("down") == 1 and seen.count("snapshot") == 2 and follower.live)
        last_done = [e for kind, e in seen.events if kind == "message" and e[3]][-1]  # type: ignore[index]
        assert last_done[2] == ["acme-corp", "initech"]  # type: ignore[index]
    finally:
        await follower.stop()
    assert not follower.live


async def test_a_snapshot_the_user_cannot_reconcile_leaves_the_follower_not_live(registry: Registry) -> None:
    await registry.create("acme-corp")
    attempts: list[int] = []

    async def not_yet() -> bool:
        attempts.append(1)
        return False

    follower = TenantFollower(watch_as(registry.watched, "test"), lambda _change, _snapshot: None,
                              reconnect=QUICK, on_snapshot=not_yet)
    await follower.start()
    try:
        await eventually(lambda: len(attempts) >= 1)
        assert not follower.live
    finally:
        await follower.stop()


async def test_a_refused_watch_is_retried_without_ever_going_live(registry: Registry) -> None:
    # A watch made with no identity at all is refused by the service every time.
    calls: list[int] = []

    async def refused() -> AsyncIterator[tenant_pb2.WatchTenantsResponse]:
        calls.append(1)
        async for message in registry.tenants.WatchTenants(tenant_pb2.WatchTenantsRequest()):
            yield message

    downs: list[int] = []
    follower = TenantFollower(refused, lambda _change, _snapshot: None, reconnect=QUICK,
                              on_down=lambda: downs.append(1))
    await follower.start()
    try:
        await eventually(lambda: len(calls) >= 3)
        assert not follower.live and len(downs) >= 2
    finally:
        await follower.stop()
