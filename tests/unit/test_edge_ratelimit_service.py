"""The rate limit service over real gRPC, as Envoy calls it."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import pytest_asyncio
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from copilot.v1 import tenant_pb2
from servers.edge.config import TenantLimits, TenantLookup
from servers.edge.limiter import HOUR, SECOND, Decision, InProcessLimiter, Limiter, LimiterError, Limits
from servers.edge.service import RateLimitServicer

Response = rls_pb2.RateLimitResponse
T0 = 1_700_000_040.25


def tenant(tenant_id: str, rps: int = 0, rpm: int = 0, rph: int = 0,
           state: tenant_pb2.TenantState = tenant_pb2.TENANT_STATE_ACTIVE) -> tenant_pb2.Tenant:
    return tenant_pb2.Tenant(tenant_id=tenant_id, state=state, limits=tenant_pb2.TenantLimits(
        requests_per_second=rps, requests_per_minute=rpm, requests_per_hour=rph))


TENANTS = [
    tenant("acme", rps=3, rpm=100),
    tenant("globex", rps=3, rpm=100),
    tenant("initech", rph=2),
    tenant("umbrella", rps=100, state=tenant_pb2.TENANT_STATE_SUSPENDED),
]


def request(*tenants: str, domain: str = "copilot", hits: int = 0) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits, descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant_id", value=t)] if t else [])
        for t in tenants
    ])


class BrokenLimiter(Limiter):
    async def hit(self, key: str, limits: Limits, hits: int = 1) -> Decision:
        raise LimiterError("store unreachable")


Start = Callable[..., Awaitable[rls_pb2_grpc.RateLimitServiceStub]]


@pytest_asyncio.fixture
async def start_rls() -> AsyncIterator[Start]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(limiter: Limiter | None = None, fail_open: bool = True,
                    lookup: TenantLookup | None = None) -> rls_pb2_grpc.RateLimitServiceStub:
        async def source() -> list[tenant_pb2.Tenant]:
            return list(TENANTS)

        limits = TenantLimits(source, refresh_s=60, lookup=lookup)
        assert await limits.refresh()
        servicer = RateLimitServicer(limits, limiter or InProcessLimiter(clock=lambda: T0), fail_open=fail_open)
        server = grpc.aio.server()
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return rls_pb2_grpc.RateLimitServiceStub(channel)

    yield start
    for channel in channels:
        await channel.close(None)
    for server in servers:
        await server.stop(None)


async def test_over_limit_after_the_limit_and_other_tenants_unaffected(start_rls: Start) -> None:
    rls = await start_rls()
    codes = [(await rls.ShouldRateLimit(request("acme"))).overall_code for _ in range(5)]
    assert codes == [Response.OK] * 3 + [Response.OVER_LIMIT] * 2
    for _ in range(3):
        assert (await rls.ShouldRateLimit(request("globex"))).overall_code == Response.OK


async def test_over_limit_response_says_which_limit_and_when_to_retry(start_rls: Start) -> None:
    rls = await start_rls()
    for _ in range(3):
        await rls.ShouldRateLimit(request("acme"))
    response = await rls.ShouldRateLimit(request("acme"))
    assert response.overall_code == Response.OVER_LIMIT
    [status] = response.statuses
    assert status.code == Response.OVER_LIMIT
    assert status.current_limit.requests_per_unit == 3
    assert status.current_limit.unit == SECOND
    assert status.limit_remaining == 0
    assert status.duration_until_reset.seconds == 1  # 0.75 s, rounded up
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert headers["retry-after"] == "1"
    details = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "acme" in details.message and "3 requests per second" in details.message
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in details.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.seconds == 1


async def test_admitted_responses_carry_nothing_extra(start_rls: Start) -> None:
    rls = await start_rls()
    response = await rls.ShouldRateLimit(request("acme"))
    assert response == Response(overall_code=Response.OK)


async def test_hour_limits_and_hits_addend(start_rls: Start) -> None:
    rls = await start_rls()
    assert (await rls.ShouldRateLimit(request("initech", hits=2))).overall_code == Response.OK
    over = await rls.ShouldRateLimit(request("initech"))
    assert over.overall_code == Response.OVER_LIMIT
    assert over.statuses[0].current_limit.unit == HOUR
    assert over.statuses[0].duration_until_reset.seconds > 60


async def test_unknown_tenants_get_the_free_plan_and_suspended_ones_are_refused(start_rls: Start) -> None:
    rls = await start_rls()
    codes = [(await rls.ShouldRateLimit(request("newco"))).overall_code for _ in range(6)]
    assert codes == [Response.OK] * 5 + [Response.OVER_LIMIT]  # free: 5 per second
    suspended = await rls.ShouldRateLimit(request("umbrella"))
    assert suspended.overall_code == Response.OVER_LIMIT
    # Marked for Envoy's local-reply mapper: PERMISSION_DENIED, not a rate limit.
    headers = {h.key: h.value for h in suspended.response_headers_to_add}
    assert headers["x-copilot-denied"] == "suspended"
    assert "retry-after" not in headers


async def test_a_tenant_the_tenant_service_does_not_know_is_refused_after_one_lookup(start_rls: Start) -> None:
    # "newco" was created after the last listing; "ghost" was never created.
    looked_up: list[str] = []

    async def lookup(tenant_id: str) -> tenant_pb2.Tenant | None:
        looked_up.append(tenant_id)
        return tenant("newco", rps=2) if tenant_id == "newco" else None

    rls = await start_rls(lookup=lookup)
    for _ in range(3):
        ghost = await rls.ShouldRateLimit(request("ghost"))
        assert ghost.overall_code == Response.OVER_LIMIT
        headers = {h.key: h.value for h in ghost.response_headers_to_add}
        assert headers["x-copilot-denied"] == "unknown"
        assert "does not exist" in headers["grpc-message"]
        status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info) and info.reason == "TENANT_UNKNOWN"
    codes = [(await rls.ShouldRateLimit(request("newco"))).overall_code for _ in range(3)]
    assert codes == [Response.OK, Response.OK, Response.OVER_LIMIT]  # its own limits, not the free plan's
    # Known tenants and the platform's own are never looked up; each unknown one once.
    for known in ("acme", "platform"):
        assert (await rls.ShouldRateLimit(request(known))).overall_code == Response.OK
    assert sorted(looked_up) == ["ghost", "newco"]


async def test_an_unreachable_tenant_service_leaves_unknown_tenants_to_the_failure_mode(start_rls: Start) -> None:
    async def lookup(tenant_id: str) -> tenant_pb2.Tenant | None:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), None, None)

    assert (await (await start_rls(lookup=lookup)).ShouldRateLimit(request("ghost"))).overall_code == Response.OK
    closed = await start_rls(lookup=lookup, fail_open=False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await closed.ShouldRateLimit(request("ghost"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await closed.ShouldRateLimit(request("acme"))).overall_code == Response.OK


def inspect(tenant_id: str) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain="copilot", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[
        ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant_id", value=tenant_id),
        ratelimit_pb2.RateLimitDescriptor.Entry(key="kind", value="inspect")])])


async def test_self_inspection_is_outside_the_hourly_quota_but_still_rate_limited(start_rls: Start) -> None:
    rls = await start_rls()
    # initech may make 2 requests an hour: reading its usage neither spends nor needs them.
    assert [(await rls.ShouldRateLimit(inspect("initech"))).overall_code for _ in range(3)] == [Response.OK] * 3
    codes = [(await rls.ShouldRateLimit(request("initech"))).overall_code for _ in range(3)]
    assert codes == [Response.OK, Response.OK, Response.OVER_LIMIT]
    assert (await rls.ShouldRateLimit(inspect("initech"))).overall_code == Response.OK
    # acme's 3 a second hold for inspection too (on a counter of its own).
    codes = [(await rls.ShouldRateLimit(inspect("acme"))).overall_code for _ in range(4)]
    assert codes == [Response.OK] * 3 + [Response.OVER_LIMIT]
    assert (await rls.ShouldRateLimit(inspect("umbrella"))).overall_code == Response.OVER_LIMIT  # suspended


async def test_requests_without_a_tenant_or_for_another_domain_pass(start_rls: Start) -> None:
    rls = await start_rls(limiter=BrokenLimiter(), fail_open=False)
    assert (await rls.ShouldRateLimit(request(""))).overall_code == Response.OK
    assert (await rls.ShouldRateLimit(request("acme", domain="other"))).overall_code == Response.OK


async def test_several_descriptors_get_a_status_each(start_rls: Start) -> None:
    rls = await start_rls()
    for _ in range(3):
        await rls.ShouldRateLimit(request("acme"))
    response = await rls.ShouldRateLimit(request("globex", "acme"))
    assert response.overall_code == Response.OVER_LIMIT
    assert [s.code for s in response.statuses] == [Response.OK, Response.OVER_LIMIT]


async def test_broken_limiter_fails_open(start_rls: Start) -> None:
    rls = await start_rls(limiter=BrokenLimiter(), fail_open=True)
    assert (await rls.ShouldRateLimit(request("acme"))).overall_code == Response.OK


async def test_broken_limiter_fails_closed(start_rls: Start) -> None:
    rls = await start_rls(limiter=BrokenLimiter(), fail_open=False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rls.ShouldRateLimit(request("acme"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # grpc-stubs wants a grpc.Call; an AioRpcError has the code, details and trailers it reads.
    assert rpc_status.from_call(err.value) is None  # type: ignore[arg-type]  # a plain status: Envoy reads the code
