"""Malformed requests over real gRPC: INVALID_ARGUMENT with a plain message and rich details,
valid requests unchanged, one log line per tenant per interval, a metric for every one."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from copilot.v1 import retrieval_pb2, retrieval_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from servers.common import identity
from servers.common.decoding import LogLimiter, request_type, tolerant_deserializer
from servers.common.errors import MalformedRequest, from_rpc_error
from servers.common.interceptors import DecodingServerInterceptor, IdentityServerInterceptor
from servers.common.reflection import add_reflection

ACME = (("x-tenant-id", "acme-corp"), ("x-user-id", "alice"), ("x-roles", "member,admin"))
GLOBEX = (("x-tenant-id", "globex-bank"), ("x-user-id", "bob"), ("x-roles", "member"))
GET_TENANT = "/copilot.v1.TenantService/GetTenant"
WATCH = "/copilot.v1.TenantService/WatchTenants"
STREAM_INGEST = "/copilot.v1.RetrievalService/StreamIngestDocuments"
# Not a protobuf message: field 15, wire type 7 (no such wire type).
GARBAGE = b"\xff" * 16
# A valid GetTenantRequest cut inside its tenant_id string.
TRUNCATED = tenant_pb2.GetTenantRequest(tenant_id="acme-corp").SerializeToString()[:5]


class Tenants(tenant_pb2_grpc.TenantServiceServicer):
    async def GetTenant(self, request: tenant_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> tenant_pb2.GetTenantResponse:
        return tenant_pb2.GetTenantResponse(tenant=tenant_pb2.Tenant(
            tenant_id=identity.tenant_id(), display_name=f"asked for {request.tenant_id!r}"))

    async def WatchTenants(self, request: tenant_pb2.WatchTenantsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[tenant_pb2.WatchTenantsResponse]:
        yield tenant_pb2.WatchTenantsResponse(deleted_tenant_ids=["gone"])


class Ingest(retrieval_pb2_grpc.RetrievalServiceServicer):
    async def StreamIngestDocuments(
            self, request_iterator: AsyncIterator[retrieval_pb2.StreamIngestDocumentsRequest],
            context: grpc.aio.ServicerContext) -> AsyncIterator[retrieval_pb2.StreamIngestDocumentsResponse]:
        done = 0
        async for request in request_iterator:
            done += len(request.documents)
            yield retrieval_pb2.StreamIngestDocumentsResponse(documents_done=done)


async def _serve(interceptor: grpc.aio.ServerInterceptor,
                 register: Callable[[grpc.aio.Server], None]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[interceptor])
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _register_services(server: grpc.aio.Server) -> None:
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(Tenants(), server)
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(Ingest(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)


@pytest.fixture
async def services() -> AsyncIterator[str]:
    server, address = await _serve(IdentityServerInterceptor(access_log=False, malformed_log_interval_s=60),
                                   _register_services)
    yield address
    await server.stop(None)


def _malformed_count(method: str) -> float:
    service, _, rpc = method.lstrip("/").rpartition("/")
    return REGISTRY.get_sample_value("copilot_malformed_requests_total", {"service": service, "rpc": rpc}) or 0.0


def _assert_malformed(exc: grpc.aio.AioRpcError, type_name: str) -> None:
    code, message, details = from_rpc_error(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == f"request is not a valid {type_name}"
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    assert {d.type_url.rsplit("/", 1)[-1] for d in status.details} == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
    info = next(d for d in details if type(d).__name__ == "ErrorInfo")
    assert info.reason == "MALFORMED_REQUEST"  # type: ignore[attr-defined]
    assert info.metadata["message_type"] == type_name  # type: ignore[attr-defined]


async def test_malformed_unary_request_is_invalid_argument(services: str) -> None:
    async with grpc.aio.insecure_channel(services) as channel:
        call = channel.unary_unary(GET_TENANT, None, None)  # bytes go out as they are
        for raw in (GARBAGE, TRUNCATED, b"\x0a\xff\xff\xff\xff\x0f"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(raw, metadata=ACME, timeout=5)
            _assert_malformed(info.value, "copilot.v1.GetTenantRequest")


async def test_valid_requests_are_unchanged(services: str) -> None:
    async with grpc.aio.insecure_channel(services) as channel:
        got = await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(
            tenant_pb2.GetTenantRequest(tenant_id="acme-corp"), metadata=ACME, timeout=5)
        assert (got.tenant.tenant_id, got.tenant.display_name) == ("acme-corp", "asked for 'acme-corp'")
        # Zero bytes are a valid (empty) message, not a malformed one.
        raw = await channel.unary_unary(GET_TENANT, None, None)(b"", metadata=ACME, timeout=5)
        assert tenant_pb2.GetTenantResponse.FromString(raw).tenant.display_name == "asked for ''"


async def test_malformed_request_of_a_server_stream(services: str) -> None:
    async with grpc.aio.insecure_channel(services) as channel:
        call = channel.unary_stream(WATCH, None, None)(GARBAGE, metadata=ACME, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [m async for m in call]
        _assert_malformed(info.value, "copilot.v1.WatchTenantsRequest")


async def test_malformed_message_in_a_client_stream(services: str) -> None:
    good = retrieval_pb2.StreamIngestDocumentsRequest(
        documents=[retrieval_pb2.Document(document_id="d1", text="hello")]).SerializeToString()

    async def messages() -> AsyncIterator[bytes]:
        yield good
        yield GARBAGE
        yield good

    async with grpc.aio.insecure_channel(services) as channel:
        call = channel.stream_stream(STREAM_INGEST, None, None)(messages(), metadata=ACME, timeout=5)
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for raw in call:
                answers.append(retrieval_pb2.StreamIngestDocumentsResponse.FromString(raw).documents_done)
        # The batch before the bad message was served; nothing after it.
        assert answers == [1]
        _assert_malformed(info.value, "copilot.v1.StreamIngestDocumentsRequest")


async def test_no_identity_is_still_unauthenticated_not_malformed(services: str) -> None:
    async with grpc.aio.insecure_channel(services) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(GET_TENANT, None, None)(GARBAGE, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_public_rpcs_without_identity_refuse_malformed_requests_too(services: str) -> None:
    async with grpc.aio.insecure_channel(services) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/grpc.health.v1.Health/Check", None, None)(GARBAGE, timeout=5)
    _assert_malformed(info.value, "grpc.health.v1.HealthCheckRequest")


async def test_health_watch_answers_behind_either_interceptor(caplog: pytest.LogCaptureFixture) -> None:
    # grpc_health's Watch writes with context.write() (a coroutine, not an async generator):
    # the wrapped handlers must run both kinds of streaming handler.
    caplog.set_level(logging.DEBUG)
    for interceptor in (IdentityServerInterceptor(access_log=False), DecodingServerInterceptor()):
        server, address = await _serve(interceptor, _register_public)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
                first = await watch.read()
                watch.cancel()
            assert first.status == health_pb2.HealthCheckResponse.SERVING, type(interceptor).__name__
        finally:
            await server.stop(None)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_counted_every_time_logged_once_per_tenant_without_traceback(
        services: str, caplog: pytest.LogCaptureFixture) -> None:
    before = _malformed_count(GET_TENANT)
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(services) as channel:
        call = channel.unary_unary(GET_TENANT, None, None)
        for metadata in (ACME,) * 5 + (GLOBEX,) * 3:
            with pytest.raises(grpc.aio.AioRpcError):
                await call(GARBAGE, metadata=metadata, timeout=5)
    assert _malformed_count(GET_TENANT) - before == 8
    lines = [r for r in caplog.records if r.name == "copilot.malformed"]
    assert sorted(r.tenant for r in lines) == ["acme-corp", "globex-bank"]  # type: ignore[attr-defined]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in lines)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Neither the bytes nor the decoder's own words reach the log.
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert "DecodeError" not in text and repr(GARBAGE)[2:10] not in text


def _register_public(server: grpc.aio.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    add_reflection(server, ["grpc.health.v1.Health"])


async def test_server_without_identity_refuses_malformed_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server, address = await _serve(DecodingServerInterceptor(malformed_log_interval_s=60), _register_public)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            # Valid calls pass as before.
            ok = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/grpc.health.v1.Health/Check", None, None)(GARBAGE, timeout=5)
            _assert_malformed(info.value, "grpc.health.v1.HealthCheckRequest")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                watch = channel.unary_stream("/grpc.health.v1.Health/Watch", None, None)
                _ = [m async for m in watch(GARBAGE, timeout=5)]
            _assert_malformed(info.value, "grpc.health.v1.HealthCheckRequest")
            for name in ("v1alpha", "v1"):
                bidi = channel.stream_stream(f"/grpc.reflection.{name}.ServerReflection/ServerReflectionInfo",
                                             None, None)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    _ = [m async for m in bidi(iter([GARBAGE]), timeout=5)]
                _assert_malformed(info.value, "grpc.reflection.v1alpha.ServerReflectionRequest")
    finally:
        await server.stop(None)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # No tenant is known here: all of them share one log allowance.
    assert len([r for r in caplog.records if r.name == "copilot.malformed"]) == 1


def test_tolerant_deserializer() -> None:
    decode = tenant_pb2.GetTenantRequest.FromString
    unary = tolerant_deserializer(GET_TENANT, decode, streaming=False)
    message = tenant_pb2.GetTenantRequest(tenant_id="acme-corp")
    assert unary(message.SerializeToString()) == message
    refusal = unary(GARBAGE)
    assert isinstance(refusal, MalformedRequest)
    assert (refusal.message, refusal.size) == ("request is not a valid copilot.v1.GetTenantRequest", len(GARBAGE))
    streaming = tolerant_deserializer(GET_TENANT, decode, streaming=True)
    assert streaming(message.SerializeToString()) == message
    with pytest.raises(MalformedRequest):
        streaming(TRUNCATED)


def test_request_type_from_the_deserializer_or_the_method() -> None:
    assert request_type(GET_TENANT, tenant_pb2.GetTenantRequest.FromString) == "copilot.v1.GetTenantRequest"
    # A plain function: the method's input type from the descriptor pool.
    assert request_type(STREAM_INGEST, lambda raw: raw) == "copilot.v1.StreamIngestDocumentsRequest"
    assert request_type("/no.Such/Method", lambda raw: raw) == "request message"


def test_log_limiter_one_line_per_key_per_interval() -> None:
    now = [100.0]
    limiter = LogLimiter(interval_s=10, clock=lambda: now[0])
    assert limiter.admit("acme") == 0
    assert limiter.admit("acme") is None
    assert limiter.admit("globex") == 0  # another tenant has its own allowance
    now[0] += 9.9
    assert limiter.admit("acme") is None
    now[0] += 0.1
    assert limiter.admit("acme") == 2  # what was left out since the last line
    assert limiter.admit("acme") is None
    now[0] += 10
    assert limiter.admit("acme") == 1


def test_log_limiter_memory_is_bounded() -> None:
    limiter = LogLimiter(interval_s=60, max_keys=3, clock=lambda: 0.0)
    for key in ("a", "b", "c", "d"):
        assert limiter.admit(key) == 0
    # "a" was forgotten (least recently logged), so it may log again; "d" may not.
    assert limiter.admit("a") == 0
    assert limiter.admit("d") is None
