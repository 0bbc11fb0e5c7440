"""Aggregated grpc.health.v1: every public service's health, asked of its owner."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.edge.health_proxy import NOT_SERVING, SERVICE_UNKNOWN, SERVING, HealthProxy

RETRIEVAL = "copilot.v1.RetrievalService"
GENERATION = "copilot.v1.GenerationService"
METERING = "copilot.v1.MeteringService"
RLS = "envoy.service.ratelimit.v3.RateLimitService"


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CountingHealth(health_aio.HealthServicer):
    """The owners' Health, counting the Check calls that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> health_pb2.HealthCheckResponse:
        self.checks += 1
        return await super().Check(request, context)


class Mesh:
    def __init__(self) -> None:
        self.backend_health = CountingHealth()
        self.backend: grpc.aio.Server | None = None
        self.edge: grpc.aio.Server | None = None
        self.proxy: HealthProxy | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> health_pb2_grpc.HealthStub:
        self.backend = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.backend_health, self.backend)
        port = self.backend.add_insecure_port("127.0.0.1:0")
        await self.backend.start()
        await self.backend_health.set(RETRIEVAL, SERVING)
        # Generation's owner is down; Metering's owner does not know the name.
        self.proxy = HealthProxy({RETRIEVAL: f"127.0.0.1:{port}", GENERATION: f"127.0.0.1:{unused_port()}",
                                  METERING: f"127.0.0.1:{port}"}, local_names=(RLS,), cache_ttl_s=0.1)
        self.edge = grpc.aio.server()
        self.proxy.add_to_server(self.edge)
        edge_port = self.edge.add_insecure_port("127.0.0.1:0")
        await self.edge.start()
        await self.proxy.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{edge_port}")
        return health_pb2_grpc.HealthStub(self.channel)

    async def stop(self) -> None:
        if self.proxy:
            await self.proxy.shutdown()
        if self.channel:
            await self.channel.close(None)
        for server in (self.edge, self.backend):
            if server:
                await server.stop(None)


@pytest_asyncio.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = Mesh()
    yield m
    await m.stop()


async def check(stub: health_pb2_grpc.HealthStub, name: str) -> int:
    response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    return int(response.status)


async def test_check_answers_for_every_name(mesh: Mesh) -> None:
    stub = await mesh.start()
    assert await check(stub, "") == SERVING
    assert await check(stub, RLS) == SERVING
    assert await check(stub, RETRIEVAL) == SERVING
    assert await check(stub, GENERATION) == NOT_SERVING  # unreachable
    assert await check(stub, METERING) == NOT_SERVING  # its owner says NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(stub, "copilot.v1.NoSuchService")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_status_is_cached_briefly_then_follows_the_owner(mesh: Mesh) -> None:
    stub = await mesh.start()
    assert await check(stub, RETRIEVAL) == SERVING
    await mesh.backend_health.set(RETRIEVAL, NOT_SERVING)
    assert await check(stub, RETRIEVAL) == SERVING  # within the cache's TTL
    await asyncio.sleep(0.15)
    assert await check(stub, RETRIEVAL) == NOT_SERVING


async def test_concurrent_probes_share_one_call(mesh: Mesh) -> None:
    await mesh.start()
    assert mesh.proxy is not None
    before = mesh.backend_health.checks
    results = await asyncio.gather(*(mesh.proxy.status(RETRIEVAL) for _ in range(20)))
    assert set(results) == {SERVING} and mesh.backend_health.checks - before == 1


async def test_watch_reports_changes_and_unknown_names(mesh: Mesh) -> None:
    stub = await mesh.start()
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=RETRIEVAL), timeout=10)
    assert (await watch.read()).status == SERVING
    await mesh.backend_health.set(RETRIEVAL, NOT_SERVING)
    assert (await watch.read()).status == NOT_SERVING
    watch.cancel()
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert (await unknown.read()).status == SERVICE_UNKNOWN
    unknown.cancel()


async def test_shutdown_turns_everything_not_serving(mesh: Mesh) -> None:
    stub = await mesh.start()
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert (await watch.read()).status == SERVING
    assert mesh.proxy is not None
    await mesh.proxy.shutdown()
    assert (await watch.read()).status == NOT_SERVING
    assert await check(stub, "") == NOT_SERVING
    assert await check(stub, RETRIEVAL) == NOT_SERVING


async def test_overall_health_waits_for_the_mesh_to_be_ready(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    proxy = HealthProxy({}, local_names=(RLS,), ready=marker.exists)
    await proxy.start()
    # Still starting (`copilot up` provisioning the demo tenants): the edge's own services
    # serve, the mesh as a whole does not yet.
    assert await proxy.status("") == NOT_SERVING and await proxy.status(RLS) == SERVING
    marker.write_text("ready\n")
    assert await proxy.status("") == SERVING
    await proxy.shutdown()
    assert await proxy.status("") == NOT_SERVING
