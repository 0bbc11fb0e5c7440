"""MeteringService and TenantService over a real grpc.aio server with the identity
interceptor, called with the identity headers Envoy sets after verifying a JWT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.v1 import (
    common_pb2,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from servers.common import identity
from servers.common.errors import from_rpc_error
from servers.common.health import Health
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.settings import Settings
from servers.metering.server import build
from servers.metering.storage.clickhouse import ChdbBackend
from servers.metering.storage.log import LocalLog
from servers.metering.tenants.service import TenantServiceServicer
from servers.metering.tenants.store import CachedTenantStore, SqliteTenantStore
from servers.metering.usage.clickhouse_store import ClickHouseUsageStore
from servers.metering.usage.quota import QuotaChecker
from servers.metering.usage.service import MeteringServiceServicer

Metadata = tuple[tuple[str, str], ...]

# A fixed clock, so that no test straddles the top of an hour.
NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)


def who(tenant: str, *roles: str, user: str = "alice") -> Metadata:
    return (("x-tenant-id", tenant), ("x-user-id", user), ("x-roles", ",".join(roles)))


OPERATOR = who("platform", "operator", user="ops")


def member(tenant: str) -> Metadata:
    return who(tenant, "member")


def service(tenant: str) -> Metadata:
    return who(tenant, "service", user="service:generation")


@dataclass
class Mesh:
    channel: grpc.aio.Channel
    metering: metering_pb2_grpc.MeteringServiceAsyncStub
    tenants: tenant_pb2_grpc.TenantServiceAsyncStub

    async def guarded(self, metadata: Metadata, estimated_tokens: int = 0) -> None:
        call = self.channel.unary_unary("/test.Guarded/Call",
                                        request_serializer=metering_pb2.CheckQuotaRequest.SerializeToString,
                                        response_deserializer=metering_pb2.CheckQuotaResponse.FromString)
        await call(metering_pb2.CheckQuotaRequest(estimated_tokens=estimated_tokens), metadata=metadata)

    async def create(self, tenant_id: str, plan: common_pb2.Plan = common_pb2.PLAN_FREE) -> tenant_pb2.Tenant:
        response = await self.tenants.CreateTenant(
            tenant_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name=tenant_id.title(), plan=plan),
            metadata=OPERATOR)
        return response.tenant

    async def record(self, tenant: str, *events: metering_pb2.UsageEvent) -> metering_pb2.RecordUsageResponse:
        return await self.metering.RecordUsage(metering_pb2.RecordUsageRequest(events=events),
                                               metadata=service(tenant))

    async def usage(self, tenant: str) -> metering_pb2.GetUsageResponse:
        return await self.metering.GetUsage(metering_pb2.GetUsageRequest(), metadata=member(tenant))


def event(event_id: str, requests: int = 1, input_tokens: int = 10, output_tokens: int = 5,
          **kw: Any) -> metering_pb2.UsageEvent:
    # A minute ago: the clock stands still, and a period ending "now" excludes "now" itself.
    kw.setdefault("occur_time", ts(NOW - timedelta(minutes=1)))
    return metering_pb2.UsageEvent(event_id=event_id, kind=metering_pb2.USAGE_KIND_QUERY, model="extractive-v1",
                                   requests=requests, input_tokens=input_tokens, output_tokens=output_tokens,
                                   **kw)


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


async def code_of(awaitable: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    tenant_store = CachedTenantStore(SqliteTenantStore(tmp_path / "tenants.sqlite"), ttl_s=5.0)
    # The default usage store: chDB behind the durable local log.
    usage_store = ClickHouseUsageStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "usage-log"))
    await tenant_store.open()
    await usage_store.open()
    checker = QuotaChecker(usage_store, clock=lambda: NOW)

    # Stands in for a caller such as the generation service: it turns a refused quota
    # check into RESOURCE_EXHAUSTED, so the test can read the status details a client gets.
    async def guarded_call(request: metering_pb2.CheckQuotaRequest,
                           context: grpc.aio.ServicerContext) -> metering_pb2.CheckQuotaResponse:
        tenant = await tenant_store.get(identity.tenant_id())
        refusal = (await checker.check(tenant, request.estimated_tokens)).refusal()
        if refusal is not None:
            raise refusal
        return metering_pb2.CheckQuotaResponse(allowed=True)

    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(
        MeteringServiceServicer(tenant_store, usage_store, clock=lambda: NOW), server)
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(TenantServiceServicer(tenant_store, clock=lambda: NOW),
                                                        server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Guarded", {
        "Call": grpc.unary_unary_rpc_method_handler(
            guarded_call, request_deserializer=metering_pb2.CheckQuotaRequest.FromString,
            response_serializer=metering_pb2.CheckQuotaResponse.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Mesh(channel, metering_pb2_grpc.MeteringServiceStub(channel),
                   tenant_pb2_grpc.TenantServiceStub(channel))
    finally:
        await channel.close(None)
        await server.stop(None)
        await usage_store.close()
        await tenant_store.close()


async def test_calls_without_identity_are_unauthenticated(mesh: Mesh) -> None:
    assert await code_of(mesh.metering.GetUsage(metering_pb2.GetUsageRequest())) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(mesh.tenants.GetTenant(tenant_pb2.GetTenantRequest())) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(mesh.metering.GetUsage(metering_pb2.GetUsageRequest(), metadata=member("Not Valid!"))) \
        == grpc.StatusCode.UNAUTHENTICATED


async def test_tenant_lifecycle_with_field_masks_and_paging(mesh: Mesh) -> None:
    created = await mesh.create("acme", common_pb2.PLAN_FREE)
    assert created.plan == common_pb2.PLAN_FREE
    assert created.state == tenant_pb2.TENANT_STATE_ACTIVE
    assert created.config.provider == "extractive"
    assert created.config_version == 1
    assert await code_of(mesh.create("acme")) == grpc.StatusCode.ALREADY_EXISTS
    assert await code_of(mesh.create("Bad_Id")) == grpc.StatusCode.INVALID_ARGUMENT

    # A member reads its own tenant with an empty id, never another.
    own = await mesh.tenants.GetTenant(tenant_pb2.GetTenantRequest(), metadata=member("acme"))
    assert own.tenant == created
    await mesh.create("globex")
    assert await code_of(mesh.tenants.GetTenant(tenant_pb2.GetTenantRequest(tenant_id="globex"),
                                                metadata=member("acme"))) == grpc.StatusCode.PERMISSION_DENIED

    # Update: only the masked fields change, whatever else the message carries.
    change = tenant_pb2.Tenant(tenant_id="acme", display_name="ignored", plan=common_pb2.PLAN_PRO,
                               config=tenant_pb2.TenantConfig(system_prompt="Cite the article.",
                                                              retrieval_mode=common_pb2.RETRIEVAL_MODE_HYBRID))
    updated = (await mesh.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=change, update_mask=field_mask_pb2.FieldMask(
            paths=["plan", "config.system_prompt", "config.retrieval_mode"])), metadata=OPERATOR)).tenant
    assert updated.display_name == "Acme"
    assert updated.plan == common_pb2.PLAN_PRO
    assert updated.limits.requests_per_hour > created.limits.requests_per_hour
    assert updated.config.system_prompt == "Cite the article."
    assert updated.config.retrieval_mode == common_pb2.RETRIEVAL_MODE_HYBRID
    assert updated.config.model == created.config.model
    assert updated.config_version == 2
    # The change is visible at once through this process's cache.
    seen = await mesh.tenants.GetTenant(tenant_pb2.GetTenantRequest(), metadata=member("acme"))
    assert seen.tenant.config_version == 2

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(tenant_id="acme"),
            update_mask=field_mask_pb2.FieldMask(paths=["config_version", "limits.requests_per_hour"])),
            metadata=OPERATOR)
    code, _, details = from_rpc_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = next(d for d in details if isinstance(d, error_details_pb2.BadRequest))
    assert {v.field for v in bad_request.field_violations} == {"update_mask", "tenant.limits.requests_per_hour"}
    missing = tenant_pb2.UpdateTenantRequest(tenant=tenant_pb2.Tenant(tenant_id="nobody", display_name="x"),
                                             update_mask=field_mask_pb2.FieldMask(paths=["display_name"]))
    assert await code_of(mesh.tenants.UpdateTenant(missing, metadata=OPERATOR)) == grpc.StatusCode.NOT_FOUND

    for i in range(3):
        await mesh.create(f"tenant-{i}")
    listed: list[str] = []
    token = ""
    while True:
        page = await mesh.tenants.ListTenants(tenant_pb2.ListTenantsRequest(page_size=2, page_token=token),
                                              metadata=OPERATOR)
        listed += [t.tenant_id for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert listed == ["acme", "globex", "tenant-0", "tenant-1", "tenant-2"]

    await mesh.tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id="acme"), metadata=OPERATOR)
    assert await code_of(mesh.tenants.GetTenant(tenant_pb2.GetTenantRequest(), metadata=member("acme"))) == \
        grpc.StatusCode.NOT_FOUND
    assert await code_of(mesh.tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id="acme"),
                                                   metadata=OPERATOR)) == grpc.StatusCode.NOT_FOUND


async def test_only_operators_manage_tenants(mesh: Mesh) -> None:
    await mesh.create("acme")
    admin = who("acme", "admin", "member")
    calls = [
        mesh.tenants.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id="mine"), metadata=admin),
        mesh.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(tenant_id="acme", plan=common_pb2.PLAN_ENTERPRISE),
            update_mask=field_mask_pb2.FieldMask(paths=["plan"])), metadata=admin),
        mesh.tenants.ListTenants(tenant_pb2.ListTenantsRequest(), metadata=admin),
        mesh.tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id="acme"), metadata=admin),
    ]
    for call in calls:
        assert await code_of(call) == grpc.StatusCode.PERMISSION_DENIED
    # Its own tenant stays readable.
    assert (await mesh.tenants.GetTenant(tenant_pb2.GetTenantRequest(tenant_id="acme"),
                                         metadata=admin)).tenant.plan == common_pb2.PLAN_FREE


async def test_record_usage_is_idempotent_per_tenant(mesh: Mesh) -> None:
    await mesh.create("acme")
    await mesh.create("globex")
    first = await mesh.record("acme", event("req-1"), event("req-2"))
    retry = await mesh.record("acme", event("req-1"), event("req-2"), event("req-3"))
    assert (first.recorded, first.duplicates) == (2, 0)
    assert (retry.recorded, retry.duplicates) == (1, 2)
    other = await mesh.record("globex", event("req-1"))
    assert (other.recorded, other.duplicates) == (1, 0)

    usage = await mesh.usage("acme")
    assert (usage.tenant_id, usage.requests, usage.input_tokens, usage.output_tokens, usage.total_tokens,
            usage.events) == ("acme", 3, 30, 15, 45, 3)
    assert [(m.model, m.requests) for m in usage.by_model] == [("extractive-v1", 3)]
    assert usage.start_time.ToDatetime(tzinfo=UTC) == NOW.replace(day=1, hour=0, minute=0)
    assert usage.end_time.ToDatetime(tzinfo=UTC) == NOW
    assert (await mesh.usage("globex")).requests == 1


async def test_record_usage_rules(mesh: Mesh) -> None:
    await mesh.create("acme")
    ok = event("good")
    # End users cannot write usage, even their tenant's admin.
    for roles in (("member",), ("admin", "member"), ()):
        assert await code_of(mesh.metering.RecordUsage(metering_pb2.RecordUsageRequest(events=[ok]),
                                                       metadata=who("acme", *roles))) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(mesh.record("nobody", ok)) == grpc.StatusCode.INVALID_ARGUMENT

    bad_batches = [
        [ok, event("")],
        [ok, event("x" * 129)],
        [ok, event("neg", input_tokens=-5)],
        [ok, event("old", occur_time=ts(datetime(2019, 6, 1, tzinfo=UTC)))],
        [ok, event("future", occur_time=ts(NOW + timedelta(days=2)))],
        [ok, metering_pb2.UsageEvent(event_id="kind", kind=42, requests=1)],  # type: ignore[arg-type]
        [event(f"e{i}") for i in range(1001)],
        [],
    ]
    for batch in bad_batches:
        assert await code_of(mesh.record("acme", *batch)) == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing of any rejected batch was written: "good" is still unclaimed.
    assert (await mesh.usage("acme")).events == 0
    assert (await mesh.record("acme", ok)).recorded == 1
    assert (await mesh.record("acme", *[event(f"e{i}") for i in range(1000)])).recorded == 1000

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.record("acme", event("fine"), event("", requests=-1))
    _, _, details = from_rpc_error(info.value)
    bad_request = next(d for d in details if isinstance(d, error_details_pb2.BadRequest))
    assert [v.field for v in bad_request.field_violations] == ["events[1].event_id", "events[1].requests"]


async def test_usage_of_another_tenant_needs_an_operator(mesh: Mesh) -> None:
    await mesh.create("acme")
    await mesh.create("globex")
    await mesh.record("globex", event("g1", requests=4))
    request = metering_pb2.GetUsageRequest(tenant_id="globex")
    for roles in (("member",), ("admin",), ("service",)):
        assert await code_of(mesh.metering.GetUsage(request, metadata=who("acme", *roles))) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert (await mesh.metering.GetUsage(request, metadata=OPERATOR)).requests == 4
    # Naming one's own tenant is fine; an inverted period is not.
    assert (await mesh.metering.GetUsage(metering_pb2.GetUsageRequest(tenant_id="acme"),
                                         metadata=member("acme"))).requests == 0
    inverted = metering_pb2.GetUsageRequest(start_time=ts(NOW), end_time=ts(NOW - timedelta(hours=1)))
    assert await code_of(mesh.metering.GetUsage(inverted, metadata=member("acme"))) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_check_quota_refuses_the_request_that_crosses_the_limit(mesh: Mesh) -> None:
    await mesh.create("acme")
    await mesh.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id="acme", limits=tenant_pb2.TenantLimits(requests_per_hour=2)),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.requests_per_hour"])), metadata=OPERATOR)

    allowed = []
    for i in range(4):
        check = await mesh.metering.CheckQuota(metering_pb2.CheckQuotaRequest(estimated_tokens=10),
                                               metadata=member("acme"))
        allowed.append(check.allowed)
        if check.allowed:
            await mesh.record("acme", event(f"answer-{i}"))
    assert allowed == [True, True, False, False]
    quotas = {q.name: q for q in check.quotas}
    assert (quotas["requests_per_hour"].limit, quotas["requests_per_hour"].used) == (2, 2)
    assert quotas["tokens_per_month"].used == 30
    assert quotas["requests_per_hour"].reset_time.ToDatetime(tzinfo=UTC) == \
        NOW.replace(minute=0) + timedelta(hours=1)
    assert check.retry_after.ToTimedelta() == timedelta(minutes=30)

    # What a caller that enforces the quota returns: RESOURCE_EXHAUSTED with readable details.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.guarded(member("acme"))
    code, message, details = from_rpc_error(info.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests_per_hour" in message
    failure = next(d for d in details if isinstance(d, error_details_pb2.QuotaFailure))
    retry = next(d for d in details if isinstance(d, error_details_pb2.RetryInfo))
    assert failure.violations[0].subject == "tenant:acme:requests_per_hour"
    assert retry.retry_delay.ToTimedelta() == timedelta(minutes=30)


async def test_check_quota_of_unknown_or_suspended_tenants(mesh: Mesh) -> None:
    check = metering_pb2.CheckQuotaRequest()
    assert await code_of(mesh.metering.CheckQuota(check, metadata=member("nobody"))) == grpc.StatusCode.NOT_FOUND
    await mesh.create("acme")
    assert (await mesh.metering.CheckQuota(check, metadata=member("acme"))).allowed
    await mesh.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id="acme", state=tenant_pb2.TENANT_STATE_SUSPENDED),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])), metadata=OPERATOR)
    assert await code_of(mesh.metering.CheckQuota(check, metadata=member("acme"))) == \
        grpc.StatusCode.PERMISSION_DENIED
    negative = metering_pb2.CheckQuotaRequest(estimated_tokens=-1)
    await mesh.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id="acme", state=tenant_pb2.TENANT_STATE_ACTIVE),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])), metadata=OPERATOR)
    assert await code_of(mesh.metering.CheckQuota(negative, metadata=member("acme"))) == \
        grpc.StatusCode.INVALID_ARGUMENT


def _settings(data_dir: Path) -> Settings:
    return replace(Settings.from_env(), data_dir=data_dir, host="127.0.0.1", metering_port=0,
                   tenant_cache_ttl_s=1.0)


async def _serve(settings: Settings) -> tuple[grpc.aio.Server, Any, Health, int]:
    built = build(settings)
    assert built.name == "metering"
    assert built.service_names == ["copilot.v1.MeteringService", "copilot.v1.TenantService",
                                  "copilot.v1.AuditService"]
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    health = Health(built.service_names)
    for name, check in built.dependencies.items():
        health.add_dependency(name, check)
    health.add_to_server(server)
    built.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    for hook in built.on_start:
        await hook()
    await server.start()
    await health.start()
    return server, built, health, port


async def _stop(server: grpc.aio.Server, built: Any, health: Health) -> None:
    await health.shutdown()
    await server.stop(None)
    for hook in reversed(built.on_stop):
        await hook()


async def test_built_server_is_healthy_and_usage_survives_a_restart(tmp_path: Path) -> None:
    from tests.unit.test_tenants_lifecycle import RetrievalStub

    # Onboarding provisions the tenant in retrieval: a stand-in answers for it.
    retrieval = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(RetrievalStub(), retrieval)
    retrieval_port = retrieval.add_insecure_port("127.0.0.1:0")
    await retrieval.start()
    try:
        await _built_server_round_trip(replace(_settings(tmp_path), retrieval_port=retrieval_port), tmp_path)
    finally:
        await retrieval.stop(None)


async def _built_server_round_trip(settings: Settings, tmp_path: Path) -> None:
    # This server runs on the real clock.
    e1 = event("e1", occur_time=ts(datetime.now(UTC) - timedelta(seconds=1)))
    server, built, health, port = await _serve(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            for name in ("", "copilot.v1.MeteringService", "copilot.v1.TenantService"):
                reply = await probe.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await tenant_pb2_grpc.TenantServiceStub(channel).CreateTenant(
                tenant_pb2.CreateTenantRequest(tenant_id="acme", plan=common_pb2.PLAN_PRO), metadata=OPERATOR)
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            await stub.RecordUsage(metering_pb2.RecordUsageRequest(events=[e1]), metadata=service("acme"))
    finally:
        await _stop(server, built, health)
    assert (tmp_path / "metering" / "chdb").is_dir()
    assert (tmp_path / "metering" / "usage-log").is_dir()
    assert (tmp_path / "metering" / "tenants.sqlite").exists()

    server, built, health, port = await _serve(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = metering_pb2_grpc.MeteringServiceStub(channel)
            usage = await stub.GetUsage(metering_pb2.GetUsageRequest(), metadata=member("acme"))
            assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 10, 5)
            again = await stub.RecordUsage(metering_pb2.RecordUsageRequest(events=[e1]),
                                           metadata=service("acme"))
            assert (again.recorded, again.duplicates) == (0, 1)
            tenant = await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(
                tenant_pb2.GetTenantRequest(), metadata=member("acme"))
            assert tenant.tenant.plan == common_pb2.PLAN_PRO
    finally:
        await _stop(server, built, health)
