"""Authentication and tenant identity through the real Envoy edge."""

from __future__ import annotations

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from copilot.v1 import metering_pb2, metering_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from servers.common.issuer import DevIssuer
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration


async def _who_am_i(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> str:
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    response = await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=metadata, timeout=5)
    return response.tenant.tenant_id


async def _expect(code: grpc.StatusCode, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _who_am_i(channel, metadata)
    assert info.value.code() == code, info.value.details()


async def test_no_token_is_unauthenticated(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    await _expect(grpc.StatusCode.UNAUTHENTICATED, channel, ())


async def test_expired_token_is_unauthenticated(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    await _expect(grpc.StatusCode.UNAUTHENTICATED, channel, mesh.auth(tenant, ttl_s=-120))


async def test_wrong_audience_is_unauthenticated(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    await _expect(grpc.StatusCode.UNAUTHENTICATED, channel, mesh.auth(tenant, audience="someone-else"))


async def test_wrong_issuer_is_unauthenticated(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    await _expect(grpc.StatusCode.UNAUTHENTICATED, channel, mesh.auth(tenant, issuer="https://evil.example"))


async def test_bad_signature_is_unauthenticated(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    # Same kid, issuer and audience, but signed by a key the edge has never seen.
    forger = DevIssuer(private_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
                       kid=mesh.issuer.kid, issuer=mesh.issuer.issuer, audience=mesh.issuer.audience)
    token = forger.mint(tenant, "mallory", ["member", "admin"])
    await _expect(grpc.StatusCode.UNAUTHENTICATED, channel, (("authorization", f"Bearer {token}"),))


async def test_tampered_payload_is_unauthenticated(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    victim = await create_tenant(mesh, channel)
    good = mesh.token(victim)
    header, payload, signature = good.split(".")
    other = mesh.token("someone-else").split(".")[1]
    await _expect(grpc.StatusCode.UNAUTHENTICATED, channel,
                  (("authorization", f"Bearer {header}.{other}.{signature}"),))
    assert payload  # the original verifies (next test), only the splice is refused


async def test_valid_token_reaches_service_as_its_tenant(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    assert await _who_am_i(channel, mesh.auth(tenant)) == tenant
    usage = await metering_pb2_grpc.MeteringServiceStub(channel).GetUsage(
        metering_pb2.GetUsageRequest(), metadata=mesh.auth(tenant), timeout=5)
    assert usage.tenant_id == tenant


async def test_spoofed_tenant_header_is_ignored(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    mine = await create_tenant(mesh, channel, prefix="mine")
    victim = await create_tenant(mesh, channel, prefix="victim")
    spoof = (("x-tenant-id", victim), ("x-roles", "operator"), ("x-user-id", "root"))
    assert await _who_am_i(channel, (*mesh.auth(mine), *spoof)) == mine
    # The spoofed operator role did not stick either: listing tenants needs operator.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tenant_pb2_grpc.TenantServiceStub(channel).ListTenants(
            tenant_pb2.ListTenantsRequest(), metadata=(*mesh.auth(mine), *spoof), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_token_without_tenant_claim_cannot_smuggle_one(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    victim = await create_tenant(mesh, channel, prefix="victim")
    metadata = (*mesh.auth(None), ("x-tenant-id", victim))
    await _expect(grpc.StatusCode.UNAUTHENTICATED, channel, metadata)


async def test_admin_manages_own_settings_but_not_plan_or_others(mesh: RunningMesh,
                                                                 channel: grpc.aio.Channel) -> None:
    mine = await create_tenant(mesh, channel, prefix="mine")
    other = await create_tenant(mesh, channel, prefix="other")
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    admin = mesh.auth(mine, ("member", "admin"))
    tenant = (await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=admin, timeout=5)).tenant
    tenant.config.system_prompt = "Answer as our compliance desk."
    updated = await stub.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant, update_mask={"paths": ["config.system_prompt"]}), metadata=admin, timeout=5)
    assert updated.tenant.config.system_prompt == "Answer as our compliance desk."
    tenant.limits.requests_per_second = 10_000
    for target, paths in ((mine, ["limits.requests_per_second"]), (mine, ["plan"]), (other, ["config.top_k"])):
        tenant.tenant_id = target
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UpdateTenant(tenant_pb2.UpdateTenantRequest(tenant=tenant, update_mask={"paths": paths}),
                                    metadata=admin, timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (target, paths)
    # A member cannot change settings at all.
    tenant.tenant_id = mine
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant, update_mask={"paths": ["config.system_prompt"]}), metadata=mesh.auth(mine), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
