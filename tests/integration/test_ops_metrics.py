"""Every service exposes Prometheus metrics; RPCs are counted by method and status."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_metrics_count_rpcs_by_method_and_status(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=mesh.auth(tenant), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetTenant(tenant_pb2.GetTenantRequest(tenant_id="someone-else"), metadata=mesh.auth(tenant),
                             timeout=5)
    settings = mesh.settings
    text = await asyncio.to_thread(_scrape, settings.host, settings.metrics_port("metering"))
    ok = [line for line in text.splitlines() if line.startswith("copilot_rpc_requests_total{")
          and 'method="GetTenant"' in line and 'code="OK"' in line]
    denied = [line for line in text.splitlines() if line.startswith("copilot_rpc_requests_total{")
              and 'method="GetTenant"' in line and 'code="PERMISSION_DENIED"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
    assert denied and float(denied[0].rsplit(" ", 1)[1]) >= 1
    assert "copilot_rpc_latency_seconds_bucket" in text
    assert tenant not in text  # no tenant ids in labels: cardinality stays bounded
    for service in ("retrieval", "generation", "edge"):
        assert "process_cpu_seconds_total" in await asyncio.to_thread(
            _scrape, settings.host, settings.metrics_port(service))
