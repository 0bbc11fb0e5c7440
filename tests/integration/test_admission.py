"""Exact admission through the real mesh: a burst of questions against a token budget with room
for one answer admits one; an answer's hold is settled by its usage; every attempt of one edge
call is billed once, while a client reusing its own ids pays for each answer."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration

BURST = 40


async def budget_one_answer(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str, extra: int) -> int:
    """Limits the tenant's month to its max_tokens + `extra`; returns max_tokens."""
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    current = (await stub.GetTenant(tenant_pb2.GetTenantRequest(tenant_id=tenant), metadata=mesh.operator(),
                                    timeout=5)).tenant
    current.limits.tokens_per_month = current.config.max_tokens + extra
    await stub.UpdateTenant(tenant_pb2.UpdateTenantRequest(tenant=current, update_mask={
        "paths": ["limits.tokens_per_month"]}), metadata=mesh.operator(), timeout=5)
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s + 0.2)
    return int(current.config.max_tokens)


async def _billed(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str) -> metering_pb2.GetUsageResponse:
    stub = metering_pb2_grpc.MeteringServiceStub(channel)
    return await stub.GetUsage(metering_pb2.GetUsageRequest(), metadata=mesh.auth(tenant), timeout=5)


async def test_a_burst_against_room_for_one_answer_admits_exactly_one(mesh: RunningMesh,
                                                                      channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, plan=common_pb2.PLAN_ENTERPRISE)
    await budget_one_answer(mesh, channel, tenant, extra=1)
    answers = generation_pb2_grpc.GenerationServiceStub(channel)

    async def ask(i: int) -> grpc.StatusCode:
        try:
            await answers.Answer(generation_pb2.AnswerRequest(question=f"What is the retention period? ({i})"),
                                 metadata=mesh.auth(tenant), timeout=30)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    codes = await asyncio.gather(*(ask(i) for i in range(BURST)))
    assert codes.count(grpc.StatusCode.OK) == 1, codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    usage = await _billed(mesh, channel, tenant)
    assert usage.requests == 1
    # The one answer's hold was settled to what it used: no hold is left behind.
    check = await metering_pb2_grpc.MeteringServiceStub(channel).CheckQuota(
        metering_pb2.CheckQuotaRequest(), metadata=mesh.auth(tenant), timeout=5)
    tokens = next(q for q in check.quotas if q.name == "tokens_per_month")
    assert tokens.used == usage.total_tokens


async def test_every_attempt_of_one_edge_call_is_billed_once(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    """What a retry by Envoy looks like to generation: the same x-request-id on a second
    attempt (here made directly to the service, as Envoy's retry to another replica is)."""
    tenant = await create_tenant(mesh, channel)
    call = str(uuid.uuid4())
    identity = (("x-tenant-id", tenant), ("x-user-id", "alice"), ("x-roles", "member"), ("x-request-id", call))
    async with grpc.aio.insecure_channel(mesh.settings.address("generation")) as direct:
        answers = generation_pb2_grpc.GenerationServiceStub(direct)
        request = generation_pb2.AnswerRequest(question="What is the retention period?")
        first = await answers.Answer(request, metadata=identity, timeout=10)
        retried = await answers.Answer(request, metadata=identity, timeout=10)
    assert first.answer and retried.answer
    usage = await _billed(mesh, channel, tenant)
    assert (usage.requests, usage.events) == (1, 1)


async def test_a_client_cannot_choose_the_billing_key(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    """The same client request id and the same x-request-id header, twice through the edge:
    Envoy makes its own request id for each call, so both answers are billed."""
    tenant = await create_tenant(mesh, channel)
    answers = generation_pb2_grpc.GenerationServiceStub(channel)
    request = generation_pb2.AnswerRequest(question="What is the retention period?", request_id="mine")
    metadata = (*mesh.auth(tenant), ("x-request-id", "chosen-by-the-client"))
    await answers.Answer(request, metadata=metadata, timeout=10)
    await answers.Answer(request, metadata=metadata, timeout=10)
    usage = await _billed(mesh, channel, tenant)
    assert usage.requests == 2
