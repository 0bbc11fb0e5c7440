"""Rough edges a new user hits, tried as they would, through the real mesh: a token for a
tenant that does not exist gets nothing (and leaves nothing), a tenant just created is
usable at once, and a tenant whose hourly quota is spent can still read its usage."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from copilot.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from servers.common.errors import from_rpc_error
from tests.integration.conftest import RunningMesh, create_tenant, new_tenant_id
from tests.integration.test_cli import _copilot

pytestmark = pytest.mark.integration

POLICY = "# Policy\n\n## 6. Approvals\n\n6.1 Two signatures are needed for payments above 10,000 EUR.\n"


async def test_a_tenant_that_does_not_exist_gets_nothing_and_leaves_nothing(mesh: RunningMesh,
                                                                             tmp_path: Path) -> None:
    ghost = new_tenant_id("no-such")
    policy = tmp_path / "policy.md"
    policy.write_text(POLICY)
    for args in (["ingest", "--tenant", ghost, str(policy)], ["search", "--tenant", ghost, "signatures"],
                 ["usage", "--tenant", ghost], ["ask", "--tenant", ghost, "Who signs payments?"]):
        result = await asyncio.to_thread(_copilot, mesh, *args)
        assert result.returncode == 1, (args, result.stdout)
        assert f"PERMISSION_DENIED: tenant {ghost} does not exist" in result.stderr, (args, result.stderr)
    # Nothing was stored for it: no index file, no audit trail.
    assert not list((mesh.settings.data_dir / "retrieval").rglob(f"{ghost}*"))
    async with grpc.aio.insecure_channel(mesh.edge) as channel:
        trail = await audit_pb2_grpc.AuditServiceStub(channel).ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(tenant_id=ghost), metadata=mesh.operator(), timeout=10)
        assert not trail.events
    # Defence in depth: a caller behind the edge (no Envoy to refuse it) cannot write either.
    async with grpc.aio.insecure_channel(mesh.settings.address("retrieval")) as direct:
        caller = (("x-tenant-id", ghost), ("x-user-id", "intruder"), ("x-roles", "admin"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await retrieval_pb2_grpc.RetrievalServiceStub(direct).IngestDocuments(
                retrieval_pb2.IngestDocumentsRequest(documents=[retrieval_pb2.Document(
                    document_id="p", text="x")]), metadata=caller, timeout=10)
        code, message, _ = from_rpc_error(err.value)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "does not exist" in message
    assert not list((mesh.settings.data_dir / "retrieval").rglob(f"{ghost}*"))

    # Created now (after its tokens were refused): usable at once, from the CLI as a user would.
    created = await asyncio.to_thread(_copilot, mesh, "tenants", "create", ghost)
    assert created.returncode == 0, created.stderr
    ingested = await asyncio.to_thread(_copilot, mesh, "ingest", "--tenant", ghost, str(policy))
    assert ingested.returncode == 0 and "1 created" in ingested.stdout, ingested.stderr
    found = await asyncio.to_thread(_copilot, mesh, "search", "--tenant", ghost, "--json", "payment signatures")
    assert found.returncode == 0, found.stderr
    hit = json.loads(found.stdout)["hits"][0]
    # The title once, and the source as ingested (not this machine's absolute path).
    assert (hit["title"], hit["source"]) == ("Policy", "policy.md")
    assert hit["section"].startswith("6. Approvals")  # the rule below it may follow
    assert isinstance(hit["score"], float)
    text = await asyncio.to_thread(_copilot, mesh, "search", "--tenant", ghost, "payment signatures")
    assert "Policy › 6. Approvals" in text.stdout and "Policy › Policy" not in text.stdout


async def test_a_tenant_over_its_hourly_quota_still_reads_its_usage(mesh: RunningMesh,
                                                                    channel: grpc.aio.Channel) -> None:
    if 3600 - time.time() % 3600 < 30:  # keep the calls inside one hour window
        await asyncio.sleep(31)
    tenant = await create_tenant(mesh, channel)
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, limits=tenant_pb2.TenantLimits(requests_per_hour=2)),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.requests_per_hour"])), metadata=mesh.operator(),
        timeout=10)
    search = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    request = retrieval_pb2.SearchRequest(query="anything")
    codes = []
    for _ in range(20):  # the edge learns the new limit within moments (pushed)
        try:
            await search.Search(request, metadata=mesh.auth(tenant), timeout=10)
            codes.append("OK")
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code().name)
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
        await asyncio.sleep(0.1)
    assert codes[-1] == "RESOURCE_EXHAUSTED", codes
    usage = await asyncio.to_thread(_copilot, mesh, "usage", "--tenant", tenant, "--json")
    assert usage.returncode == 0, usage.stderr
    body = json.loads(usage.stdout)
    assert body["tenant"] == tenant and isinstance(body["requests"], int)
    assert all(isinstance(m["requests"], int) and "inputTokens" not in m for m in body["by_model"])
    got = await tenants.GetTenant(tenant_pb2.GetTenantRequest(), metadata=mesh.auth(tenant), timeout=10)
    assert got.tenant.limits.requests_per_hour == 2
    # Still counted work is refused.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search.Search(request, metadata=mesh.auth(tenant), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
