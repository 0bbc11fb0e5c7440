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
