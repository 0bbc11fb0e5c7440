"""Two edges (Envoy + edge companion each) in front of the same services, sharing one real
redis-server: a tenant's limit holds across both; then, with Redis and then the limiter itself
gone, the fail-open edge lets calls through and the fail-closed one refuses them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from copilot_cli.supervisor import envoy_binary, free_port, settings_env
from servers.common.settings import Settings
from servers.edge import envoy_config
from tests.integration.conftest import RunningMesh, create_tenant

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")]
ROOT = Path(__file__).resolve().parents[2]
HOURLY_LIMIT = 20


@dataclass
class Edge:
    settings: Settings
    companion: asyncio.subprocess.Process
    envoy: asyncio.subprocess.Process
    channel: grpc.aio.Channel


async def _serving(address: str, service: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, f"{address} {service} not serving"
            await asyncio.sleep(0.1)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def redis(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    assert REDIS_SERVER is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        cwd=str(tmp_path_factory.mktemp("redis")), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            await asyncio.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        await _stop(proc)


async def _start_edge(mesh: RunningMesh, redis_url: str, fail_open: bool, name: str) -> Edge:
    settings = dataclasses.replace(
        mesh.settings, edge_port=free_port(), envoy_admin_port=free_port(), edge_services_port=free_port(),
        edge_http_port=free_port(), redis_url=redis_url, ratelimit_fail_open=fail_open)
    if hasattr(settings, "metrics_port_base"):
        settings = dataclasses.replace(settings, metrics_port_base=0)
    env = {**os.environ, **settings_env(settings), "COPILOT_ACCESS_LOG": "0"}
    logs = mesh.mesh.log_dir
    with (logs / f"{name}-edge.log").open("ab") as log:
        companion = await asyncio.create_subprocess_exec(sys.executable, "-m", "servers.edge", env=env, cwd=str(ROOT),
                                                         stdout=log, stderr=log)
    config = envoy_config.write(settings, settings.data_dir / f"{name}-envoy.yaml")
    with (logs / f"{name}-envoy.log").open("ab") as log:
        envoy = await asyncio.create_subprocess_exec(envoy_binary(), "-c", str(config), "--disable-hot-restart",
                                                     "--log-level", "warn", "--base-id", str(free_port()),
                                                     stdout=log, stderr=log)
    edge = Edge(settings, companion, envoy, grpc.aio.insecure_channel(f"{settings.host}:{settings.edge_port}"))
    await _serving(settings.address("edge_services"), "")
    await _serving(f"{settings.host}:{settings.edge_port}", "copilot.v1.TenantService")
    return edge


async def test_two_edges_share_limits_in_redis_and_fail_open_or_closed(
        mesh: RunningMesh, channel: grpc.aio.Channel, redis: tuple[str, asyncio.subprocess.Process]) -> None:
    redis_url, redis_proc = redis
    tenant = await create_tenant(mesh, channel, plan=common_pb2.PLAN_FREE, prefix="shared")
    await tenant_pb2_grpc.TenantServiceStub(channel).UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, limits=tenant_pb2.TenantLimits(
            requests_per_second=1000, requests_per_minute=1000, requests_per_hour=HOURLY_LIMIT)),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.requests_per_second", "limits.requests_per_minute",
                                                    "limits.requests_per_hour"])),
        metadata=mesh.operator(), timeout=5)
    edges = [await _start_edge(mesh, redis_url, fail_open=True, name="edge-a"),
             await _start_edge(mesh, redis_url, fail_open=False, name="edge-b")]
    try:
        # Both companions load the tenant's new limits (1 s refresh in the tests).
        await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)
        if 3600 - time.time() % 3600 < 15:  # all calls inside one hour window
            await asyncio.sleep(16)
        metadata = mesh.auth(tenant)
        codes: list[grpc.StatusCode] = []
        for i in range(HOURLY_LIMIT + 10):
            # A search counts against the hour (a tenant reading its own record does not).
            stub = retrieval_pb2_grpc.RetrievalServiceStub(edges[i % 2].channel)
            try:
                await stub.Search(retrieval_pb2.SearchRequest(query="limits"), metadata=metadata, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        # Exactly the hourly limit across the two edges, the rest refused by either.
        assert codes.count(grpc.StatusCode.OK) == HOURLY_LIMIT, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 10, codes
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[HOURLY_LIMIT::2]  # edge a refuses ...
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[HOURLY_LIMIT + 1::2]  # ... and so does edge b

        other = await create_tenant(mesh, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="other")
        await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)

        async def call(edge: Edge) -> grpc.StatusCode:
            try:
                await tenant_pb2_grpc.TenantServiceStub(edge.channel).GetTenant(
                    tenant_pb2.GetTenantRequest(), metadata=mesh.auth(other), timeout=5)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        assert [await call(e) for e in edges] == [grpc.StatusCode.OK, grpc.StatusCode.OK]
        # Redis down: the fail-open edge admits, the fail-closed one refuses with UNAVAILABLE.
        await _stop(redis_proc)
        assert [await call(e) for e in edges] == [grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE]
        # The limiter itself down: the same, decided by Envoy's failure mode.
        for edge in edges:
            await _stop(edge.companion)
        assert [await call(e) for e in edges] == [grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE]
    finally:
        for edge in edges:
            await edge.channel.close(None)
            await _stop(edge.envoy)
            await _stop(edge.companion)
