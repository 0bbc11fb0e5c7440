"""Hostile credentials and header smuggling through the real Envoy, for gRPC and gRPC-Web
alike; roles per RPC at the edge; suspension and deletion take effect within seconds."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from google.protobuf import field_mask_pb2

from copilot.v1 import (
    common_pb2,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from servers.common.issuer import DevIssuer
from tests.integration.conftest import RunningMesh, create_tenant
from tests.integration.test_edge_protocols import _grpc_web_call

pytestmark = pytest.mark.integration

UNAUTHENTICATED = str(grpc.StatusCode.UNAUTHENTICATED.value[0])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(header: dict[str, object], claims: dict[str, object], sign: Callable[[bytes], bytes] | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{_b64(signature)}"


def _claims(mesh: RunningMesh, tenant: str, **over: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"iss": mesh.issuer.issuer, "aud": mesh.issuer.audience, "sub": "mallory",
                                 "tenant_id": tenant, "roles": ["member", "admin"], "iat": now, "nbf": now,
                                 "exp": now + 600}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def hostile_tokens(mesh: RunningMesh, tenant: str) -> dict[str, str]:
    issuer = mesh.issuer
    kid = issuer.kid
    public_pem = issuer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk_n = json.loads(json.dumps(issuer.jwks()))["keys"][0]["n"]
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_ec = ec.generate_private_key(ec.SECP256R1())
    good = _claims(mesh, tenant)
    forger = DevIssuer(private_key=other_rsa, kid=kid, issuer=issuer.issuer, audience=issuer.audience)
    return {
        "alg none (unsigned)": _raw({"alg": "none", "typ": "JWT", "kid": kid}, good, None),
        "alg none, signature kept": _raw({"alg": "none", "kid": kid}, good,
                                         lambda m: issuer.private_key.sign(m, *_pkcs1())),
        "HS256 keyed with the public key PEM": _raw(
            {"alg": "HS256", "typ": "JWT", "kid": kid}, good,
            lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
        "HS256 keyed with the JWK modulus": _raw(
            {"alg": "HS256", "kid": kid}, good, lambda m: hmac.new(jwk_n.encode(), m, hashlib.sha256).digest()),
        "RS256 by another key, same kid": forger.mint(tenant, "mallory", ["admin"]),
        "RS256 by another key, unknown kid": jwt.encode(good, other_rsa, algorithm="RS256", headers={"kid": "nope"}),
        "ES256 by a key not in the JWKS": jwt.encode(good, other_ec, algorithm="ES256", headers={"kid": kid}),
        "alg says RS512 (key is RS256)": jwt.encode(good, issuer.private_key, algorithm="RS512", headers={"kid": kid}),
        "expired beyond the clock skew": mesh.token(tenant, ttl_s=-120),
        "not valid yet (nbf in 10 minutes)": mesh.token(tenant, not_before_s=600),
        "no expiry": jwt.encode(_claims(mesh, tenant, exp=None), issuer.private_key, algorithm="RS256",
                                headers={"kid": kid}),
        "wrong issuer": mesh.token(tenant, issuer="https://evil.example"),
        "wrong audience": mesh.token(tenant, audience="another-service"),
        "no tenant claim": mesh.token(None),
        "empty tenant claim": mesh.token("", extra={"tenant_id": ""}),
        "malformed tenant claim": mesh.token(None, extra={"tenant_id": "../Other Tenant"}),
        "tenant claim not a string": mesh.token(None, extra={"tenant_id": [tenant, "other"]}),
        "oversized (12 KB of garbage)": "eyJ" + "A" * 12_000 + ".e30." + "B" * 300,
        "garbage": "not-a-jwt",
        "two segments": "eyJhbGciOiJSUzI1NiJ9.e30",
        "payload spliced from another token": ".".join([
            mesh.token(tenant).split(".")[0], mesh.token("someone-else").split(".")[1],
            mesh.token(tenant).split(".")[2]]),
    }


def _pkcs1() -> tuple[padding.PKCS1v15, hashes.SHA256]:
    return padding.PKCS1v15(), hashes.SHA256()


async def test_every_hostile_token_is_unauthenticated_over_grpc_and_grpc_web(
        mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, prefix="target")
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    # The corpus is hostile, not broken: a good token for the same tenant works.
    ok = await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=mesh.auth(tenant), timeout=5)
    assert ok.tenant.tenant_id == tenant
    message = tenant_pb2.GetTenantRequest().SerializeToString()
    failures = []
    for name, token in hostile_tokens(mesh, tenant).items():
        # Every case also tries to name the tenant by header.
        metadata = (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant), ("x-roles", "operator"))
        try:
            await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=metadata, timeout=5)
            failures.append(f"{name}: grpc accepted")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                failures.append(f"{name}: grpc {exc.code().name} {exc.details()}")
        _, _, trailers = await asyncio.to_thread(
            _grpc_web_call, mesh.edge, "/copilot.v1.TenantService/GetTenant", message,
            {"authorization": f"Bearer {token}", "x-tenant-id": tenant})
        if trailers.get("grpc-status") != UNAUTHENTICATED:
            failures.append(f"{name}: grpc-web grpc-status {trailers.get('grpc-status')}")
    assert not failures, "\n".join(failures)


async def test_header_smuggling_never_changes_the_tenant(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    mine = await create_tenant(mesh, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="mine")
    victim = await create_tenant(mesh, channel, prefix="victim")
    # Until the edge's tenant table lists a new tenant, it gets the free plan's 5 requests/s.
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 1.5)
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    token = mesh.token(mine)
    attempts = {
        "x-tenant-id": (("x-tenant-id", victim),),
        "underscore variant": (("x_tenant_id", victim), ("x_roles", "operator")),
        "identity headers twice": (("x-tenant-id", victim), ("x-tenant-id", "platform"), ("x-user-id", "root")),
        "roles header": (("x-roles", "operator"), ("x-roles", "service")),
        "envoy-internal headers": (("x-envoy-original-path", "/copilot.v1.TenantService/ListTenants"),
                                   ("x-envoy-internal", "true")),
    }
    for name, extra in attempts.items():
        response = await stub.GetTenant(tenant_pb2.GetTenantRequest(),
                                        metadata=(("authorization", f"Bearer {token}"), *extra), timeout=5)
        assert response.tenant.tenant_id == mine, name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListTenants(tenant_pb2.ListTenantsRequest(),
                                   metadata=(("authorization", f"Bearer {token}"), *extra), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    # gRPC-Web (HTTP/1.1): the same.
    _, payload, trailers = await asyncio.to_thread(
        _grpc_web_call, mesh.edge, "/copilot.v1.TenantService/GetTenant",
        tenant_pb2.GetTenantRequest().SerializeToString(),
        {"authorization": f"Bearer {token}", "x-tenant-id": victim, "x-roles": "operator", "x_tenant_id": victim})
    assert trailers.get("grpc-status") == "0", trailers
    assert tenant_pb2.GetTenantResponse.FromString(payload).tenant.tenant_id == mine
    # A token in the query string is not a credential (only the Authorization header is).
    _, _, trailers = await asyncio.to_thread(
        _grpc_web_call, mesh.edge, f"/copilot.v1.TenantService/GetTenant?access_token={token}",
        tenant_pb2.GetTenantRequest().SerializeToString(), {})
    assert trailers.get("grpc-status") == UNAUTHENTICATED, trailers


async def test_roles_per_rpc_at_the_edge(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="roles")
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 1.5)
    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    metering = metering_pb2_grpc.MeteringServiceStub(channel)
    doc = retrieval_pb2.IngestDocumentsRequest(documents=[retrieval_pb2.Document(
        document_id="d1", title="Policy", text="Records are kept for five years.")])

    async def code(call: object) -> grpc.StatusCode:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    member, admin, ingest = mesh.auth(tenant, ("member",)), mesh.auth(tenant, ("member", "admin")), mesh.auth(
        tenant, ("ingest",))
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await code(retrieval.IngestDocuments(doc, metadata=member, timeout=10)) == denied
    assert await code(retrieval.DeleteDocuments(retrieval_pb2.DeleteDocumentsRequest(document_ids=["d1"]),
                                                metadata=member, timeout=10)) == denied
    assert await code(retrieval.IngestDocuments(doc, metadata=admin, timeout=10)) == grpc.StatusCode.OK
    assert await code(retrieval.IngestDocuments(doc, metadata=ingest, timeout=10)) == grpc.StatusCode.OK
    assert await code(retrieval.Search(retrieval_pb2.SearchRequest(query="records"), metadata=member,
                                       timeout=10)) == grpc.StatusCode.OK
    # A token with no role at all may do nothing.
    assert await code(retrieval.Search(retrieval_pb2.SearchRequest(query="records"), metadata=mesh.auth(tenant, ()),
                                       timeout=10)) == denied
    # Tenant management is the operator's.
    assert await code(tenants.ListTenants(tenant_pb2.ListTenantsRequest(), metadata=admin, timeout=5)) == denied
    assert await code(tenants.ListTenants(tenant_pb2.ListTenantsRequest(), metadata=mesh.operator(),
                                          timeout=5)) == grpc.StatusCode.OK
    # Service-to-service RPCs are closed to every end-user role, operators included.
    for metadata in (admin, mesh.operator(), mesh.auth(tenant, ("member", "admin", "operator"))):
        assert await code(metering.RecordUsage(metering_pb2.RecordUsageRequest(), metadata=metadata,
                                               timeout=5)) == denied
        assert await code(retrieval.EraseTenant(retrieval_pb2.EraseTenantRequest(), metadata=metadata,
                                                timeout=5)) == denied


async def _until(check: Callable[[], object], want: grpc.StatusCode, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while True:
        try:
            await check()  # type: ignore[misc]
            got = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            got = exc.code()
        if got == want:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"still {got.name} after {timeout_s}s"
        await asyncio.sleep(0.2)


async def test_suspended_and_deleted_tenants_are_refused_within_seconds(
        mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, prefix="suspend")
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    search = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    def call() -> object:
        return search.Search(retrieval_pb2.SearchRequest(query="anything"), metadata=mesh.auth(tenant), timeout=5)

    await _until(call, grpc.StatusCode.OK)

    async def set_state(state: int) -> None:
        await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(tenant_id=tenant, state=state),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=["state"])), metadata=mesh.operator(), timeout=5)

    await set_state(tenant_pb2.TENANT_STATE_SUSPENDED)
    await _until(call, grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call()  # type: ignore[misc]
    assert "suspended" in (info.value.details() or "")
    await set_state(tenant_pb2.TENANT_STATE_ACTIVE)
    await _until(call, grpc.StatusCode.OK)
    await tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id=tenant), metadata=mesh.operator(), timeout=10)
    await _until(call, grpc.StatusCode.PERMISSION_DENIED)


async def test_a_token_beyond_the_header_limit_is_refused_before_anything_reads_it(
        mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, prefix="huge")
    huge = "eyJ" + "A" * 100_000 + ".e30.sig"  # past Envoy's 60 KiB request-header limit
    # Envoy's codec refuses the request (gRPC sees the stream reset as UNAVAILABLE, gRPC-Web
    # gets HTTP 431); no filter or service ever sees it. Below the limit: UNAUTHENTICATED above.
    async with grpc.aio.insecure_channel(mesh.edge) as own:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tenant_pb2_grpc.TenantServiceStub(own).GetTenant(
                tenant_pb2.GetTenantRequest(), metadata=(("authorization", f"Bearer {huge}"),), timeout=5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    status, _, _ = await asyncio.to_thread(_grpc_web_call, mesh.edge, "/copilot.v1.TenantService/GetTenant", b"",
                                           {"authorization": f"Bearer {huge}"})
    assert status == 431
    # The edge is unharmed.
    response = await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(
        tenant_pb2.GetTenantRequest(), metadata=mesh.auth(tenant), timeout=5)
    assert response.tenant.tenant_id == tenant
