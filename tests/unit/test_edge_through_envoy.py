"""The real Envoy with the rendered config, the real edge companion (python -m servers.edge)
and a tiny in-process backend standing in for the metering server, all on free loopback
ports. Proves the edge's own promises; the whole mesh is covered by tests/integration.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from jwt.algorithms import RSAAlgorithm

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common.settings import Settings
from servers.edge import envoy_config

ROOT = Path(__file__).resolve().parents[2]
ISSUER = "https://issuer.test"
AUDIENCE = "copilot-test"


def envoy_binary() -> str | None:
    candidate = Path(sys.executable).with_name("envoy")
    return str(candidate) if candidate.exists() else shutil.which("envoy")


pytestmark = pytest.mark.skipif(envoy_binary() is None, reason="envoy is not installed")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


REGISTERED = frozenset({"acme", "globex", "tiny", "frozen", "fresh"})


class Backend(tenant_pb2_grpc.TenantServiceServicer):
    """Lists tenants for the edge and echoes the identity headers each call arrives with."""

    async def ListTenants(self, request: tenant_pb2.ListTenantsRequest,
                          context: grpc.aio.ServicerContext) -> tenant_pb2.ListTenantsResponse:
        def make(tenant_id: str, rph: int, state: tenant_pb2.TenantState = tenant_pb2.TENANT_STATE_ACTIVE,
                 rps: int = 0) -> tenant_pb2.Tenant:
            return tenant_pb2.Tenant(tenant_id=tenant_id, state=state,
                                     limits=tenant_pb2.TenantLimits(requests_per_hour=rph, requests_per_second=rps))

        return tenant_pb2.ListTenantsResponse(tenants=[
            make("acme", 100_000), make("globex", 100_000), make("tiny", 3, rps=5),
            make("frozen", 100_000, tenant_pb2.TENANT_STATE_SUSPENDED)])

    async def GetTenant(self, request: tenant_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> tenant_pb2.GetTenantResponse:
        if request.tenant_id == "slow":
            await asyncio.sleep(0.3)
        elif request.tenant_id and request.tenant_id not in REGISTERED:
            # The edge confirming a tenant its listing does not have: "fresh" was created
            # after the listing, anything else never was.
            await context.abort(grpc.StatusCode.NOT_FOUND, f"tenant {request.tenant_id} not found")
        seen = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return tenant_pb2.GetTenantResponse(tenant=tenant_pb2.Tenant(
            tenant_id=seen.get("x-tenant-id", ""), display_name=json.dumps(seen)))

    async def CreateTenant(self, request: tenant_pb2.CreateTenantRequest,
                           context: grpc.aio.ServicerContext) -> tenant_pb2.CreateTenantResponse:
        return tenant_pb2.CreateTenantResponse(tenant=tenant_pb2.Tenant(tenant_id=request.tenant_id))


@dataclass
class Edge:
    address: str
    key: rsa.RSAPrivateKey
    channel: grpc.aio.Channel
    jwks_path: Path

    def token(self, tenant_id: str | None = "acme", roles: object = ("member",), **claims: object) -> str:
        now = int(time.time())
        body: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "nbf": now,
                                   "exp": now + 600, "roles": list(roles) if isinstance(roles, tuple) else roles}
        if tenant_id is not None:
            body["tenant_id"] = tenant_id
        body.update(claims)
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": "test"})

    @property
    def tenants(self) -> tenant_pb2_grpc.TenantServiceAsyncStub:
        return tenant_pb2_grpc.TenantServiceStub(self.channel)

    async def seen_by_backend(self, token: str | None, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
        metadata = [*extra, *([("authorization", f"Bearer {token}")] if token else [])]
        response = await self.tenants.GetTenant(tenant_pb2.GetTenantRequest(), metadata=metadata, timeout=5)
        seen: dict[str, str] = json.loads(response.tenant.display_name)
        return seen


async def _wait_serving(address: str, service: str, timeout_s: float = 20) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} at {address} not serving")
            await asyncio.sleep(0.1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "test", "alg": "RS256", "use": "sig"})
    # Served by the edge companion's HTTP side, which Envoy's jwt_authn fetches it from.
    (tmp / "keys").mkdir()
    (tmp / "keys" / "jwks.json").write_text(json.dumps({"keys": [jwk]}))

    settings = Settings.from_env()
    ports = {name: unused_port() for name in ("edge", "admin", "retrieval", "generation", "metering", "edge_services",
                                              "edge_http")}
    settings = dataclasses.replace(
        settings, host="127.0.0.1", data_dir=tmp, edge_port=ports["edge"], envoy_admin_port=ports["admin"],
        retrieval_port=ports["retrieval"], generation_port=ports["generation"], metering_port=ports["metering"],
        edge_services_port=ports["edge_services"], edge_http_port=ports["edge_http"], jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        ratelimit_fail_open=True, tenant_cache_ttl_s=1.0, redis_url=None)

    backend = grpc.aio.server()
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(Backend(), backend)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, backend)
    backend.add_insecure_port(settings.address("metering"))
    await backend.start()
    for name in ("copilot.v1.MeteringService", "copilot.v1.TenantService"):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen" / "python")]),
           "COPILOT_HOST": "127.0.0.1", "COPILOT_DATA_DIR": str(tmp),
           "COPILOT_METERING_PORT": str(ports["metering"]), "COPILOT_EDGE_SERVICES_PORT": str(ports["edge_services"]),
           "COPILOT_EDGE_HTTP_PORT": str(ports["edge_http"]), "COPILOT_JWT_ISSUER": ISSUER,
           "COPILOT_JWT_AUDIENCE": AUDIENCE,
           "COPILOT_RETRIEVAL_PORT": str(ports["retrieval"]), "COPILOT_GENERATION_PORT": str(ports["generation"]),
           "COPILOT_TENANT_CACHE_TTL_S": "1", "COPILOT_RATELIMIT_FAIL_OPEN": "1", "COPILOT_LOG_LEVEL": "WARNING"}
    env.pop("REDIS_URL", None)
    companion_log = (tmp / "edge.log").open("wb")
    companion = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "servers.edge", cwd=str(ROOT), env=env, stdout=companion_log, stderr=companion_log)
    config = envoy_config.write(settings, tmp / "envoy.yaml")
    envoy_log = (tmp / "envoy.log").open("wb")
    binary = envoy_binary()
    assert binary is not None
    envoy = await asyncio.create_subprocess_exec(
        binary, "-c", str(config), "--disable-hot-restart", "--log-level", "warn", "--concurrency", "2",
        stdout=envoy_log, stderr=envoy_log)
    address = f"127.0.0.1:{settings.edge_port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        await _wait_serving(settings.address("edge_services"), "")
        await _wait_serving(address, "copilot.v1.TenantService")
        yield Edge(address=address, key=key, channel=channel, jwks_path=tmp / "keys" / "jwks.json")
    finally:
        await channel.close(None)
        for proc in (envoy, companion):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        companion_log.close()
        envoy_log.close()
        await backend.stop(None)


# -- identity


async def test_a_valid_token_sets_the_identity_the_backend_sees(edge: Edge) -> None:
    seen = await edge.seen_by_backend(edge.token("acme", roles=("admin", "member")))
    assert seen["x-tenant-id"] == "acme"
    assert seen["x-user-id"] == "alice"
    assert "authorization" not in seen  # services never see the token


async def test_spoofed_identity_headers_never_reach_the_backend(edge: Edge) -> None:
    spoof = (("x-tenant-id", "globex"), ("x-user-id", "mallory"), ("x-roles", "operator"))
    # A token without a tenant claim cannot smuggle one in: it is refused at the edge.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.seen_by_backend(edge.token(None, roles=("member",)), spoof)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A token with one: the token wins.
    seen = await edge.seen_by_backend(edge.token("acme"), spoof)
    assert seen["x-tenant-id"] == "acme"
    assert seen["x-user-id"] == "alice"


async def test_list_claims_reach_services_as_base64_json(edge: Edge) -> None:
    # Envoy 1.40's claim_to_headers renders a list (or object) claim as the base64 of its
    # JSON, not comma-joined; a string claim passes as it is.
    seen = await edge.seen_by_backend(edge.token("acme", roles=("member", "admin")))
    assert json.loads(base64.b64decode(seen["x-roles"])) == ["member", "admin"]
    seen = await edge.seen_by_backend(edge.token("acme", roles="member admin"))
    assert seen["x-roles"] == "member admin"


@pytest.mark.parametrize("case", ["missing", "expired", "audience", "issuer", "signature"])
async def test_bad_tokens_are_unauthenticated(edge: Edge, case: str) -> None:
    if case == "missing":
        token = None
    elif case == "expired":
        token = edge.token(exp=int(time.time()) - 120)
    elif case == "audience":
        token = edge.token(aud="someone-else")
    elif case == "issuer":
        token = edge.token(iss="https://evil.test")
    else:
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "tenant_id": "acme",
                            "exp": int(time.time()) + 60}, other, algorithm="RS256", headers={"kid": "test"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.seen_by_backend(token, (("x-tenant-id", "acme"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- gRPC-Web and CORS (HTTP/1.1)


async def _http1(edge: Edge, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[
        int, dict[str, str], bytes]:
    host, port = edge.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = [f"{method} {path} HTTP/1.1", f"host: {edge.address}", "connection: close",
            f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    await writer.wait_closed()
    header_block, _, payload = raw.partition(b"\r\n\r\n")
    lines = header_block.decode().split("\r\n")
    status = int(lines[0].split()[1])
    response_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if response_headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while payload:
            size_line, _, rest = payload.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded += rest[:size]
            payload = rest[size + 2:]
        payload = decoded
    return status, response_headers, payload


async def test_grpc_web_over_http1_gets_the_token_identity_not_the_spoofed_one(edge: Edge) -> None:
    message = tenant_pb2.GetTenantRequest().SerializeToString()
    status, headers, body = await _http1(edge, "POST", "/copilot.v1.TenantService/GetTenant", {
        "content-type": "application/grpc-web+proto", "x-grpc-web": "1", "origin": "http://console.test",
        "authorization": f"Bearer {edge.token('acme')}", "x-tenant-id": "globex", "x-roles": "operator",
    }, b"\x00" + struct.pack(">I", len(message)) + message)
    assert status == 200
    assert headers["access-control-allow-origin"] == "http://console.test"
    assert "grpc-status" in headers["access-control-expose-headers"]
    frames: list[tuple[int, bytes]] = []
    while body:
        flag, length = body[0], struct.unpack(">I", body[1:5])[0]
        frames.append((flag, body[5:5 + length]))
        body = body[5 + length:]
    data = [payload for flag, payload in frames if flag == 0]
    trailers = b"".join(payload for flag, payload in frames if flag & 0x80).decode()
    assert "grpc-status:0" in trailers.replace(" ", "")
    seen = json.loads(tenant_pb2.GetTenantResponse.FromString(data[0]).tenant.display_name)
    assert seen["x-tenant-id"] == "acme" and json.loads(base64.b64decode(seen["x-roles"])) == ["member"]


async def test_cors_preflight_is_answered_without_a_token(edge: Edge) -> None:
    status, headers, _ = await _http1(edge, "OPTIONS", "/copilot.v1.TenantService/GetTenant", {
        "origin": "http://console.test", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web"})
    assert status == 200
    assert headers["access-control-allow-origin"] == "http://console.test"
    assert "authorization" in headers["access-control-allow-headers"]


# -- rate limits


async def test_over_the_limit_is_resource_exhausted_with_retry_info_and_others_unaffected(edge: Edge) -> None:
    if 3600 - time.time() % 3600 < 5:  # keep all the calls inside one hour window
        await asyncio.sleep(6)
    # CreateTenant counts against the hour (GetTenant of one's own tenant does not: below).
    tiny = (("authorization", f"Bearer {edge.token('tiny', roles=('operator',))}"),)

    async def counted() -> None:
        await edge.tenants.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id="x"), metadata=tiny, timeout=5)

    for _ in range(3):
        await counted()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await counted()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # grpc-stubs types the trailers of the synchronous API; an aio call's are a grpc.aio.Metadata.
    trailers: dict[str, Any] = {k: v for k, v in cast(grpc.aio.Metadata, err.value.trailing_metadata()) or ()}
    assert int(trailers["retry-after"]) > 0
    assert trailers["x-ratelimit-limit"].startswith("3")
    assert trailers["x-ratelimit-remaining"] == "0"
    status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.seconds == int(trailers["retry-after"])
    # Another tenant is unaffected.
    for _ in range(5):
        assert (await edge.seen_by_backend(edge.token("globex")))["x-tenant-id"] == "globex"
    # Its hourly quota spent, the tenant still reads its own record (usage, quota alike),
    # under a per-second limit of its own.
    async def inspect() -> str:
        try:
            return (await edge.seen_by_backend(edge.token("tiny")))["x-tenant-id"]
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    first = await inspect()
    # A burst: tiny's own limit of 5 a second holds its self-inspection too.
    burst = await asyncio.gather(*(inspect() for _ in range(12)))
    assert first == "tiny" and "tiny" in burst and "RESOURCE_EXHAUSTED" in burst


async def test_a_suspended_tenant_is_refused_as_permission_denied(edge: Edge) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.seen_by_backend(edge.token("frozen"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "suspended" in (err.value.details() or "")
    status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    assert info.reason == "TENANT_SUSPENDED"


async def test_a_token_for_a_tenant_that_does_not_exist_is_refused_and_a_new_one_admitted(edge: Edge) -> None:
    for _ in range(2):  # the second answer comes from the negative cache
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await edge.seen_by_backend(edge.token("ghost"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tenant ghost does not exist" in (err.value.details() or "")
        status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
        assert info.reason == "TENANT_UNKNOWN"
    # Not in the edge's listing yet, but the tenant service has it: admitted on its first call.
    assert (await edge.seen_by_backend(edge.token("fresh")))["x-tenant-id"] == "fresh"


# -- routing, health, reflection, limits on size


async def test_the_favicon_is_served_without_a_token(edge: Edge) -> None:
    status, headers, body = await _http1(edge, "GET", "/favicon.ico", {})
    assert status == 200 and headers["content-type"] == "image/svg+xml" and body.startswith(b"<svg")


async def test_unknown_services_are_unimplemented(edge: Edge) -> None:
    call = edge.channel.unary_unary("/copilot.v1.NoSuchService/Do", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"", metadata=[("authorization", f"Bearer {edge.token()}")], timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no such service" in (err.value.details() or "")


async def test_oversized_requests_are_resource_exhausted(edge: Edge) -> None:
    operator = edge.token(roles=("operator",))
    # Over the edge's default request limit (TenantService sets no larger one).
    limit = envoy_config.body_limit(Settings.from_env().bounds.default_request_bytes)
    big = tenant_pb2.CreateTenantRequest(tenant_id="big", display_name="x" * limit)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.tenants.CreateTenant(big, metadata=[("authorization", f"Bearer {operator}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"({limit} bytes with gRPC framing" in (err.value.details() or "")
    ok = await edge.tenants.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id="small"),
                                         metadata=[("authorization", f"Bearer {operator}")], timeout=5)
    assert ok.tenant.tenant_id == "small"


async def test_health_of_every_service_through_the_edge_without_a_token(edge: Edge) -> None:
    stub = health_pb2_grpc.HealthStub(edge.channel)

    async def status(name: str) -> int:
        return int((await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert await status("") == serving
    assert await status("copilot.v1.MeteringService") == serving
    assert await status("copilot.v1.TenantService") == serving
    # Nothing listens on the retrieval and generation ports in this test.
    assert await status("copilot.v1.RetrievalService") == not_serving
    assert await status("copilot.v1.GenerationService") == not_serving
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await status("no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_through_the_edge_lists_and_resolves_every_service(edge: Edge) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(edge.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="copilot.v1.GenerationService"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="copilot.v1.TenantService.ListTenants")]
    call = stub.ServerReflectionInfo(timeout=10)
    responses = []
    for req in requests:  # one at a time, as grpcurl does: proves the stream is not buffered
        await call.write(req)
        responses.append(await call.read())
    await call.done_writing()
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"copilot.v1.RetrievalService", "copilot.v1.GenerationService", "copilot.v1.MeteringService",
            "copilot.v1.TenantService", "grpc.health.v1.Health"} <= names
    assert "envoy.service.ratelimit.v3.RateLimitService" not in names
    for response in responses[1:]:
        assert response.file_descriptor_response.file_descriptor_proto


async def test_the_rate_limit_service_is_not_reachable_from_outside(edge: Edge) -> None:
    call = edge.channel.unary_unary("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"", metadata=[("authorization", f"Bearer {edge.token()}")], timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_client_sent_envoy_control_headers_are_not_trusted(edge: Edge) -> None:
    # Were these honoured, a client could shorten timeouts or force retries of calls
    # that are not idempotent.
    metadata = [("authorization", f"Bearer {edge.token('globex')}"), ("x-envoy-upstream-rq-timeout-ms", "50"),
                ("x-envoy-max-retries", "5"), ("x-envoy-retry-grpc-on", "cancelled,unavailable")]
    response = await edge.tenants.GetTenant(tenant_pb2.GetTenantRequest(tenant_id="slow"), metadata=metadata,
                                            timeout=5)
    seen = json.loads(response.tenant.display_name)
    # Envoy treats loopback clients as external: it strips their x-envoy-* headers (and
    # the 50 ms timeout did not cut the 300 ms call short).
    assert seen["x-tenant-id"] == "globex"
    for header in ("x-envoy-upstream-rq-timeout-ms", "x-envoy-max-retries", "x-envoy-retry-grpc-on"):
        assert header not in seen


# -- key rotation (last: it changes the JWKS the other tests verify against)


async def test_a_rotated_jwks_is_picked_up_without_a_restart(edge: Edge) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_path = edge.jwks_path
    old_jwks = json.loads(jwks_path.read_text())
    new_jwk = json.loads(RSAAlgorithm.to_jwk(new_key.public_key()))
    new_jwk.update({"kid": "rotated", "alg": "RS256", "use": "sig"})
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant_id": "acme", "roles": ["member"],
              "iat": now, "nbf": now, "exp": now + 600}
    new_token = jwt.encode(claims, new_key, algorithm="RS256", headers={"kid": "rotated"})
    old_token = edge.token("acme")
    with pytest.raises(grpc.aio.AioRpcError):
        await edge.seen_by_backend(new_token)
    # Rotation: the new key is added, the old one kept until its tokens expire.
    tmp = jwks_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [new_jwk, *old_jwks["keys"]]}))
    tmp.replace(jwks_path)
    deadline = time.monotonic() + 3 * envoy_config.DEV_JWKS_CACHE_S
    while True:
        try:
            assert (await edge.seen_by_backend(new_token))["x-tenant-id"] == "acme"
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() < deadline, "the new key was not picked up"
            await asyncio.sleep(0.25)
    assert (await edge.seen_by_backend(old_token))["x-tenant-id"] == "acme"
    # Retiring the old key: its tokens stop working, again without a restart.
    tmp.write_text(json.dumps({"keys": [new_jwk]}))
    tmp.replace(jwks_path)
    deadline = time.monotonic() + 3 * envoy_config.DEV_JWKS_CACHE_S
    while True:
        try:
            await edge.seen_by_backend(edge.token("acme"))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the retired key still verifies"
        await asyncio.sleep(0.25)
    tmp.write_text(json.dumps(old_jwks))
    tmp.replace(jwks_path)
