"""With no span exporter (the mesh's default) OpenTelemetry's gRPC interceptors are not
installed: the identity interceptors carry the W3C trace context, so every hop still runs
in the caller's trace (its log lines carry the trace id) over real gRPC."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import trace

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common import telemetry
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.lifecycle import connect

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT = "00f067aa0ba902b7"


def _here() -> str:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}/{ctx.span_id:016x}/{int(ctx.is_valid)}/{int(trace.get_current_span().is_recording())}"


class Downstream(tenant_pb2_grpc.TenantServiceServicer):
    async def GetTenant(self, request: tenant_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> tenant_pb2.GetTenantResponse:
        return tenant_pb2.GetTenantResponse(tenant=tenant_pb2.Tenant(display_name=_here()))


class Upstream(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, target: str) -> None:
        self._stub = tenant_pb2_grpc.TenantServiceStub(connect(target))

    async def GetTenant(self, request: tenant_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> tenant_pb2.GetTenantResponse:
        here = _here()
        below = await self._stub.GetTenant(request, timeout=10)
        hops = f"{here} {below.tenant.display_name}"
        return tenant_pb2.GetTenantResponse(tenant=tenant_pb2.Tenant(display_name=hops))


async def _serve(servicer: tenant_pb2_grpc.TenantServiceServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[*telemetry.server_interceptors(), IdentityServerInterceptor()])
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def chain(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(telemetry, "_exporting", False)
    assert telemetry.server_interceptors() == [] and telemetry.client_interceptors() == []
    down, down_addr = await _serve(Downstream())
    up, up_addr = await _serve(Upstream(down_addr))
    yield up_addr
    await up.stop(None)
    await down.stop(None)


ACME = (("x-tenant-id", "acme-corp"), ("x-user-id", "alice"), ("x-roles", "member"))


async def _hops(address: str, metadata: tuple[tuple[str, str], ...]) -> list[list[str]]:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(
            tenant_pb2.GetTenantRequest(), metadata=metadata, timeout=10)
    return [hop.split("/") for hop in response.tenant.display_name.split(" ")]


async def test_the_callers_trace_continues_through_every_hop(chain: str) -> None:
    incoming = (*ACME, ("traceparent", f"00-{TRACE_ID:032x}-{PARENT}-01"))
    up, down = await _hops(chain, incoming)
    assert up[0] == down[0] == f"{TRACE_ID:032x}"
    assert len({up[1], down[1], PARENT}) == 3  # a span of its own on each hop
    assert up[2:] == down[2:] == ["1", "0"]  # valid, not recorded (nothing exports it)


async def test_a_call_without_trace_context_starts_one_shared_downstream(chain: str) -> None:
    first_up, first_down = await _hops(chain, ACME)
    second_up, _ = await _hops(chain, (*ACME, ("traceparent", "not a traceparent")))
    assert first_up[0] == first_down[0] and int(first_up[0], 16)
    assert second_up[0] != first_up[0] and int(second_up[0], 16)
    assert first_up[2] == first_down[2] == "1"


class _TraceOfAccessLines(logging.Handler):
    """Notes the trace id current when each access line is written (as the JSON formatter does)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        ctx = trace.get_current_span().get_span_context()
        self.lines.append((getattr(record, "status", ""), f"{ctx.trace_id:032x}" if ctx.is_valid else ""))


async def test_access_lines_and_refusals_are_written_in_the_callers_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_exporting", False)
    handler = _TraceOfAccessLines()
    access = logging.getLogger("copilot.access")
    access.addHandler(handler)
    saved_level = access.level
    access.setLevel(logging.INFO)  # setLevel, not an attribute: it clears the loggers' level caches
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=True)])
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(Downstream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    traceparent = ("traceparent", f"00-{TRACE_ID:032x}-{PARENT}-01")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tenant_pb2_grpc.TenantServiceStub(channel)
            await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=(*ACME, traceparent), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=(traceparent,), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)
        access.removeHandler(handler)
        access.setLevel(saved_level)
    assert handler.lines == [("OK", f"{TRACE_ID:032x}"), ("UNAUTHENTICATED", f"{TRACE_ID:032x}")]
