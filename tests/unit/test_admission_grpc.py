"""ReserveQuota / ReleaseQuota / settling RecordUsage over a real grpc.aio metering server
(the in-process ledger; the Redis one across two processes is in
tests/integration/test_admission_redis.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2

from copilot.v1 import metering_pb2, tenant_pb2
from servers.common import identity
from servers.common.errors import from_rpc_error
from servers.edge.roles import allowed_roles
from tests.unit import test_metering_grpc
from tests.unit.test_metering_grpc import NOW, OPERATOR, Mesh, code_of, event, member, service

# The real metering server of test_metering_grpc (in-process ledger, fixed clock).
mesh = test_metering_grpc.mesh

MAX_TOKENS = 100


async def set_limits(mesh: Mesh, tenant: str, **limits: int) -> None:
    await mesh.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, limits=tenant_pb2.TenantLimits(**limits)),
        update_mask=field_mask_pb2.FieldMask(paths=[f"limits.{name}" for name in limits])), metadata=OPERATOR)


def reserve(mesh: Mesh, reservation_id: str, tokens: int = MAX_TOKENS, tenant: str = "acme",
            **kw: object) -> grpc.aio.UnaryUnaryCall:
    return mesh.metering.ReserveQuota(metering_pb2.ReserveQuotaRequest(
        reservation_id=reservation_id, tokens=tokens, **kw), metadata=service(tenant))  # type: ignore[arg-type]


async def used(mesh: Mesh, tenant: str = "acme") -> dict[str, int]:
    check = await mesh.metering.CheckQuota(metering_pb2.CheckQuotaRequest(), metadata=member(tenant))
    return {q.name: q.used for q in check.quotas}


async def test_a_burst_against_room_for_one_answer_admits_one(mesh: Mesh) -> None:
    await mesh.create("acme")
    await set_limits(mesh, "acme", tokens_per_month=1000, requests_per_hour=1000)
    await mesh.record("acme", event("earlier", input_tokens=800, output_tokens=50))

    async def attempt(i: int) -> grpc.StatusCode | metering_pb2.ReserveQuotaResponse:
        try:
            return await reserve(mesh, f"question-{i}")
        except grpc.aio.AioRpcError as exc:
            _, _, details = from_rpc_error(exc)
            # Refused exactly as CheckQuota's refusal path: QuotaFailure + RetryInfo.
            assert {type(d) for d in details} >= {error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo}
            return exc.code()

    outcomes = await asyncio.gather(*[attempt(i) for i in range(40)])
    admitted = [o for o in outcomes if isinstance(o, metering_pb2.ReserveQuotaResponse)]
    assert len(admitted) == 1
    assert {o for o in outcomes if isinstance(o, grpc.StatusCode)} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    response = admitted[0]
    assert response.allowed and response.tokens == MAX_TOKENS
    assert response.expire_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(seconds=120)
    assert {q.name: q.used for q in response.quotas} == {"requests_per_hour": 1, "tokens_per_month": 850}
    # CheckQuota counts the hold too.
    assert await used(mesh) == {"requests_per_hour": 2, "tokens_per_month": 950}


async def test_settle_release_and_idempotent_reserve(mesh: Mesh) -> None:
    await mesh.create("acme")
    first = await reserve(mesh, "q1", 500)
    assert (await reserve(mesh, "q1", 500)).expire_time == first.expire_time
    assert await used(mesh) == {"requests_per_hour": 1, "tokens_per_month": 500}

    settle = event("answer-q1", input_tokens=20, output_tokens=40, reservation_id="q1")
    assert (await mesh.record("acme", settle)).recorded == 1
    assert (await mesh.record("acme", settle)).duplicates == 1
    assert await used(mesh) == {"requests_per_hour": 1, "tokens_per_month": 60}

    await reserve(mesh, "q2", 500)
    release = metering_pb2.ReleaseQuotaRequest(reservation_id="q2")
    assert (await mesh.metering.ReleaseQuota(release, metadata=service("acme"))).released
    assert not (await mesh.metering.ReleaseQuota(release, metadata=service("acme"))).released
    unknown = metering_pb2.ReleaseQuotaRequest(reservation_id="nobody-reserved-this")
    assert not (await mesh.metering.ReleaseQuota(unknown, metadata=service("acme"))).released
    assert await used(mesh) == {"requests_per_hour": 1, "tokens_per_month": 60}


async def test_ttl_defaults_and_is_capped(mesh: Mesh) -> None:
    await mesh.create("acme")
    short = await reserve(mesh, "short", ttl=duration_pb2.Duration(seconds=5))
    assert short.expire_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(seconds=5)
    long = await reserve(mesh, "long", ttl=duration_pb2.Duration(seconds=86400))
    assert long.expire_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(seconds=900)


@pytest.mark.parametrize("request_", [
    metering_pb2.ReserveQuotaRequest(reservation_id="", tokens=1),
    metering_pb2.ReserveQuotaRequest(reservation_id="x" * 129, tokens=1),
    metering_pb2.ReserveQuotaRequest(reservation_id="r", tokens=-1),
    metering_pb2.ReserveQuotaRequest(reservation_id="r", tokens=1, ttl=duration_pb2.Duration(seconds=-1)),
])
async def test_bad_reservations_are_invalid(mesh: Mesh, request_: metering_pb2.ReserveQuotaRequest) -> None:
    await mesh.create("acme")
    assert await code_of(mesh.metering.ReserveQuota(request_, metadata=service("acme"))) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_only_platform_services_reserve_and_release(mesh: Mesh) -> None:
    await mesh.create("acme")
    request = metering_pb2.ReserveQuotaRequest(reservation_id="r", tokens=1)
    # (Operators pass here as everywhere in the services; the edge keeps them out of service RPCs.)
    for roles in (("member",), ("admin",), ("member", "ingest")):
        metadata = (("x-tenant-id", "acme"), ("x-user-id", "alice"), ("x-roles", ",".join(roles)))
        assert await code_of(mesh.metering.ReserveQuota(request, metadata=metadata)) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(mesh.metering.ReleaseQuota(metering_pb2.ReleaseQuotaRequest(reservation_id="r"),
                                                        metadata=metadata)) == grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(mesh.metering.ReserveQuota(request, metadata=service("nobody"))) == \
        grpc.StatusCode.NOT_FOUND
    for rpc in ("ReserveQuota", "ReleaseQuota"):
        assert allowed_roles(f"/copilot.v1.MeteringService/{rpc}") == frozenset({identity.SERVICE})
