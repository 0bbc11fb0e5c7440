"""The common plumbing over real gRPC: identity in, identity and deadline out, errors as
rich statuses, tenant on the span."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_status import rpc_status
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common import identity, telemetry
from servers.common.errors import InvalidArgument
from servers.common.interceptors import IdentityServerInterceptor, _outgoing, remaining_deadline
from servers.common.lifecycle import connect

EXPORTER = InMemorySpanExporter()
telemetry.setup("test", None, SimpleSpanProcessor(EXPORTER))


class Downstream(tenant_pb2_grpc.TenantServiceServicer):
    """Reports what it received: the forwarded identity and deadline."""

    async def GetTenant(self, request: tenant_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> tenant_pb2.GetTenantResponse:
        caller = identity.current()
        remaining = remaining_deadline()
        return tenant_pb2.GetTenantResponse(tenant=tenant_pb2.Tenant(
            tenant_id=caller.tenant_id, display_name=f"{caller.subject}|{','.join(sorted(caller.roles))}",
            config_version=int((remaining or 0) * 1000)))


class Upstream(tenant_pb2_grpc.TenantServiceServicer):
    """Calls Downstream without passing any identity by hand."""

    def __init__(self, target: str) -> None:
        self._stub = tenant_pb2_grpc.TenantServiceStub(connect(target))

    async def GetTenant(self, request: tenant_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> tenant_pb2.GetTenantResponse:
        if request.tenant_id == "bad":
            raise InvalidArgument.field("tenant_id", "is bad")
        return await self._stub.GetTenant(request, timeout=30)


async def _serve(servicer: tenant_pb2_grpc.TenantServiceServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[*telemetry.server_interceptors(), IdentityServerInterceptor()])
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def chain() -> AsyncIterator[str]:
    down, down_addr = await _serve(Downstream())
    up, up_addr = await _serve(Upstream(down_addr))
    yield up_addr
    await up.stop(None)
    await down.stop(None)


ACME = (("x-tenant-id", "acme-corp"), ("x-user-id", "alice"), ("x-roles", "member,admin"))


async def test_identity_and_deadline_are_forwarded(chain: str) -> None:
    EXPORTER.clear()
    async with grpc.aio.insecure_channel(chain) as channel:
        response = await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(
            tenant_pb2.GetTenantRequest(), metadata=ACME, timeout=2)
    assert response.tenant.tenant_id == "acme-corp"
    assert response.tenant.display_name == "alice|admin,member"
    # The downstream call got what was left of the caller's 2 s, not its own 30 s.
    assert 0 < response.tenant.config_version <= 2500  # not 30,000: it was capped by the caller's deadline
    server_spans = [s for s in EXPORTER.get_finished_spans() if s.kind.name == "SERVER"]
    assert len(server_spans) == 2
    assert {s.attributes.get("tenant.id") for s in server_spans} == {"acme-corp"}  # type: ignore[union-attr]
    assert len({s.context.trace_id for s in server_spans}) == 1


async def test_missing_or_malformed_identity_is_unauthenticated(chain: str) -> None:
    async with grpc.aio.insecure_channel(chain) as channel:
        stub = tenant_pb2_grpc.TenantServiceStub(channel)
        for metadata in ((), (("x-tenant-id", "../../etc"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=metadata, timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_domain_errors_become_rich_statuses(chain: str) -> None:
    async with grpc.aio.insecure_channel(chain) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(
                tenant_pb2.GetTenantRequest(tenant_id="bad"), metadata=ACME, timeout=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    assert {d.type_url.rsplit("/", 1)[-1] for d in status.details} == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}


def test_outgoing_call_without_identity_fails_loudly() -> None:
    details = grpc.aio.ClientCallDetails(method="/copilot.v1.TenantService/GetTenant", timeout=None,
                                         metadata=None, credentials=None, wait_for_ready=None)
    with pytest.raises(RuntimeError, match="without a tenant identity"):
        _outgoing(details)
    with identity.acting_as(identity.service_account("test")):
        forwarded = dict(list(_outgoing(details).metadata or ()))
    assert forwarded["x-tenant-id"] == identity.PLATFORM_TENANT


def test_roles_from_envoy_list_claim() -> None:
    # Envoy renders a JSON list claim as base64 of the JSON.
    assert identity.parse_roles("WyJtZW1iZXIiLCJhZG1pbiJd") == {"member", "admin"}
    assert identity.parse_roles("member, admin") == {"member", "admin"}
    assert identity.parse_roles("admin") == {"admin"}


class _Watcher(tenant_pb2_grpc.TenantServiceServicer):
    async def WatchTenants(self, request: tenant_pb2.WatchTenantsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[tenant_pb2.WatchTenantsResponse]:
        yield tenant_pb2.WatchTenantsResponse(deleted_tenant_ids=[identity.tenant_id()])


async def test_identity_is_forwarded_on_streaming_calls_too() -> None:
    # grpc.aio registers a multi-type interceptor for one call type only; streams must not
    # silently go out without the caller's identity.
    server, addr = await _serve(_Watcher())
    try:
        stub = tenant_pb2_grpc.TenantServiceStub(connect(addr))
        with identity.acting_as(identity.service_account("test")):
            got = [m async for m in stub.WatchTenants(tenant_pb2.WatchTenantsRequest(), timeout=5)]
        assert [list(m.deleted_tenant_ids) for m in got] == [[identity.PLATFORM_TENANT]]
    finally:
        await server.stop(None)
