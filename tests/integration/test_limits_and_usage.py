"""Per-tenant rate limits at the edge, and idempotent, durable usage."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from tests.integration.conftest import RunningMesh, create_tenant, settled_usage

pytestmark = pytest.mark.integration


async def _burst(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], n: int) -> list[grpc.StatusCode]:
    stub = tenant_pb2_grpc.TenantServiceStub(channel)

    async def one() -> grpc.StatusCode:
        try:
            await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=metadata, timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_over_rate_is_resource_exhausted_and_others_unaffected(mesh: RunningMesh,
                                                                      channel: grpc.aio.Channel) -> None:
    noisy = await create_tenant(mesh, channel, plan=common_pb2.PLAN_FREE, prefix="noisy")
    quiet = await create_tenant(mesh, channel, plan=common_pb2.PLAN_FREE, prefix="quiet")
    tenant = await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(
        tenant_pb2.GetTenantRequest(tenant_id=noisy), metadata=mesh.operator(), timeout=5)
    per_second = tenant.tenant.limits.requests_per_second
    assert 0 < per_second < 50, "the free plan's per-second limit should be small"
    # The edge refreshes plan limits in the background; wait until it knows the new tenants.
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)

    codes = await _burst(channel, mesh.auth(noisy), per_second * 4)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) <= per_second * 2  # a window boundary may split the burst
    # The quiet tenant, on the same plan, at the same moment, is not limited.
    assert set(await _burst(channel, mesh.auth(quiet), max(1, per_second // 2))) == {grpc.StatusCode.OK}


async def test_record_usage_is_idempotent_and_durable(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    stub = metering_pb2_grpc.MeteringServiceStub(channel)
    writer = mesh.auth(tenant, ("service",), user="service:test")
    event = metering_pb2.UsageEvent(event_id=f"evt-{uuid.uuid4().hex}", kind=metering_pb2.USAGE_KIND_QUERY,
                                    model="m1", requests=1, input_tokens=100, output_tokens=20)
    first = await stub.RecordUsage(metering_pb2.RecordUsageRequest(events=[event]), metadata=writer, timeout=5)
    again = await stub.RecordUsage(metering_pb2.RecordUsageRequest(events=[event]), metadata=writer, timeout=5)
    assert (first.recorded, first.duplicates) == (1, 0)
    assert (again.recorded, again.duplicates) == (0, 1)

    usage = await stub.GetUsage(metering_pb2.GetUsageRequest(), metadata=mesh.auth(tenant), timeout=5)
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 100, 20)

    await asyncio.to_thread(mesh.mesh.restart, "metering")
    usage = await stub.GetUsage(metering_pb2.GetUsageRequest(), metadata=mesh.auth(tenant), timeout=5)
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 100, 20)
    again = await stub.RecordUsage(metering_pb2.RecordUsageRequest(events=[event]), metadata=writer, timeout=5)
    assert again.duplicates == 1


async def test_end_users_cannot_write_usage(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    stub = metering_pb2_grpc.MeteringServiceStub(channel)
    event = metering_pb2.UsageEvent(event_id="x", kind=metering_pb2.USAGE_KIND_QUERY, requests=1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RecordUsage(metering_pb2.RecordUsageRequest(events=[event]),
                               metadata=mesh.auth(tenant, ("member", "admin")), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_every_answer_is_recorded_once(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    answers = generation_pb2_grpc.GenerationServiceStub(channel)
    # The same client request id twice: two answers were given, so two are billed (the
    # billing key is the server's, so a client cannot make answers free by reusing an id).
    request = generation_pb2.AnswerRequest(question="What is the retention period?", request_id="req-1")
    first = await answers.Answer(request, metadata=mesh.auth(tenant), timeout=10)
    second = await answers.Answer(request, metadata=mesh.auth(tenant), timeout=10)
    assert first.details.request_id == second.details.request_id == "req-1"
    # Billed by the time the outbox has delivered (an answer may return before metering has it).
    usage = await settled_usage(mesh, channel, tenant, 2)
    assert usage.requests == 2
    assert usage.output_tokens == first.details.usage.output_tokens + second.details.usage.output_tokens
    assert usage.input_tokens == first.details.usage.input_tokens + second.details.usage.input_tokens


async def test_token_quota_refusal_comes_from_metering_with_details(mesh: RunningMesh,
                                                                   channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, plan=common_pb2.PLAN_FREE)
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    current = (await tenants.GetTenant(tenant_pb2.GetTenantRequest(tenant_id=tenant),
                                       metadata=mesh.operator(), timeout=5)).tenant
    # Room for exactly one answer's estimate; the edge does not count tokens, only metering does.
    current.limits.tokens_per_month = current.config.max_tokens + 1
    await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=current, update_mask={"paths": ["limits.tokens_per_month"]}), metadata=mesh.operator(), timeout=5)
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s + 0.2)
    answers = generation_pb2_grpc.GenerationServiceStub(channel)
    await answers.Answer(generation_pb2.AnswerRequest(question="first"), metadata=mesh.auth(tenant), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await answers.Answer(generation_pb2.AnswerRequest(question="second"), metadata=mesh.auth(tenant), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    details = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
    assert {"google.rpc.ErrorInfo", "google.rpc.QuotaFailure", "google.rpc.RetryInfo"} <= set(details)
    info_msg = error_details_pb2.ErrorInfo()
    details["google.rpc.ErrorInfo"].Unpack(info_msg)
    assert info_msg.reason == "QUOTA_EXCEEDED"
    quota = error_details_pb2.QuotaFailure()
    details["google.rpc.QuotaFailure"].Unpack(quota)
    assert [v.subject for v in quota.violations] == [f"tenant:{tenant}:tokens_per_month"]
