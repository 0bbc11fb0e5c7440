"""Exact admission across replicas: two metering processes sharing one real redis-server
(started by the test on a free loopback port; skipped without one) admit exactly what the
budget has room for under a concurrent burst split across them, and settle, release and
read each other's reservations."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from copilot.v1 import metering_pb2, metering_pb2_grpc
from copilot_cli.supervisor import free_port
from tests.integration.test_metering_crash import MeteringProcess, metering_env
from tests.integration.test_metering_redis import RedisServer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]

TENANT = "admitted"
SERVICE = (("x-tenant-id", TENANT), ("x-user-id", "service:generation"), ("x-roles", "service"))
MEMBER = (("x-tenant-id", TENANT), ("x-user-id", "alice"), ("x-roles", "member"))
BUDGET, ANSWER = 1000, 100


def seed_tenant(data_dir: Path) -> None:
    """The same tenant, with a small token budget, in a replica's own tenant store."""
    from servers.metering.tenants.domain import new_tenant
    from servers.metering.tenants.plans import Plan
    from servers.metering.tenants.store import SqliteTenantStore

    async def seed() -> None:
        store = SqliteTenantStore(data_dir / "metering" / "tenants.sqlite")
        await store.open()
        try:
            tenant = new_tenant(TENANT, TENANT, Plan.ENTERPRISE, datetime.now(UTC))
            limits = dataclasses.replace(tenant.limits, tokens_per_month=BUDGET, requests_per_hour=1000)
            await store.create(dataclasses.replace(tenant, limits=limits))
        finally:
            await store.close()

    asyncio.run(seed())


async def test_two_replicas_sharing_redis_admit_exactly_the_budget(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    replicas: list[MeteringProcess] = []
    try:
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            await asyncio.to_thread(seed_tenant, directory)
            port = free_port()
            replicas.append(MeteringProcess(directory, metering_env(
                directory, port, REDIS_URL=redis_server.url, COPILOT_USAGE_BACKEND="sqlite"), port))
        await asyncio.gather(*[asyncio.to_thread(r.start) for r in replicas])
        channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
        stubs = [metering_pb2_grpc.MeteringServiceStub(c) for c in channels]
        try:
            async def reserve(i: int) -> bool:
                try:
                    await stubs[i % 2].ReserveQuota(metering_pb2.ReserveQuotaRequest(
                        reservation_id=f"q{i}", tokens=ANSWER), metadata=SERVICE, timeout=20)
                    return True
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    return False

            admitted = [i for i, ok in enumerate(await asyncio.gather(*[reserve(i) for i in range(40)])) if ok]
            assert len(admitted) == BUDGET // ANSWER

            async def tokens_used(stub: metering_pb2_grpc.MeteringServiceAsyncStub) -> int:
                check = await stub.CheckQuota(metering_pb2.CheckQuotaRequest(),
                                              metadata=MEMBER, timeout=10)
                return next(q.used for q in check.quotas if q.name == "tokens_per_month")

            assert [await tokens_used(s) for s in stubs] == [BUDGET, BUDGET]
            # Settled on one replica (and retried on the other): the hold becomes the actual usage, once.
            settle = metering_pb2.RecordUsageRequest(events=[metering_pb2.UsageEvent(
                event_id=f"answer-{admitted[0]}", kind=metering_pb2.USAGE_KIND_QUERY, model="m", requests=1,
                input_tokens=10, output_tokens=30, reservation_id=f"q{admitted[0]}")])
            await stubs[0].RecordUsage(settle, metadata=SERVICE, timeout=10)
            await stubs[1].RecordUsage(settle, metadata=SERVICE, timeout=10)
            assert [await tokens_used(s) for s in stubs] == [BUDGET - ANSWER + 40] * 2
            # Released on one replica, the room is reserved through the other.
            released = await stubs[1].ReleaseQuota(
                metering_pb2.ReleaseQuotaRequest(reservation_id=f"q{admitted[1]}"), metadata=SERVICE, timeout=10)
            assert released.released
            room = BUDGET - (BUDGET - 2 * ANSWER + 40)
            assert await stubs[0].ReserveQuota(metering_pb2.ReserveQuotaRequest(
                reservation_id="the-rest", tokens=room), metadata=SERVICE, timeout=10)
            assert await reserve(41) is False
            assert [await tokens_used(s) for s in stubs] == [BUDGET] * 2
        finally:
            for channel in channels:
                await channel.close(None)
    finally:
        for replica in replicas:
            await asyncio.to_thread(replica.stop)
        redis_server.stop()
