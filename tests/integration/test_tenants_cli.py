"""Tenant lifecycle from the `copilot` CLI on the running mesh: create (provisioned in
retrieval), update, suspend (the edge then refuses the tenant), resume, usage with cost,
delete (erasure everywhere is covered by tests/unit/test_tenants_lifecycle.py)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from copilot.v1 import generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from tests.integration.conftest import RunningMesh, new_tenant_id
from tests.integration.test_cli import _copilot

pytestmark = pytest.mark.integration


async def _code(awaitable: object) -> grpc.StatusCode:
    try:
        await awaitable  # type: ignore[misc]
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_tenant_lifecycle_from_the_cli(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = new_tenant_id("life")

    def run(*args: str, code: int = 0) -> str:
        result = _copilot(mesh, *args)
        assert result.returncode == code, result.stderr
        return result.stdout

    assert "created" in await asyncio.to_thread(run, "tenants", "create", tenant, "--plan", "pro")
    updated = await asyncio.to_thread(run, "tenants", "update", tenant, "--set", "config.top_k=7",
                                      "--set", "limits.requests_per_hour=5000")
    assert "config version 2" in updated
    got = json.loads(await asyncio.to_thread(run, "tenants", "get", tenant))
    assert got["config"]["top_k"] == 7 and got["limits"]["requests_per_hour"] == 5000
    bad = _copilot(mesh, "tenants", "update", tenant, "--set", "config.top_k=1000")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr

    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    answers = generation_pb2_grpc.GenerationServiceStub(channel)
    admin = mesh.auth(tenant, ("member", "admin"))
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)  # the edge learns the new tenant
    await retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=[retrieval_pb2.Document(
        document_id="policy", title="Policy", text="Records are kept for seven years.")]), metadata=admin, timeout=10)
    await answers.Answer(generation_pb2.AnswerRequest(question="How long are records kept?"),
                         metadata=mesh.auth(tenant), timeout=10)
    usage = json.loads(await asyncio.to_thread(run, "usage", "--tenant", tenant, "--json"))
    assert usage["requests"] == 1 and usage["tokens"] > 0 and usage["currency"] == "usd" and usage["cost_micros"] > 0
    assert tenant in await asyncio.to_thread(run, "billing", "show", "--tenant", tenant)

    assert "suspended" in await asyncio.to_thread(run, "tenants", "suspend", tenant)
    listed = await asyncio.to_thread(run, "tenants", "list")
    assert any(line.startswith(tenant) and "suspended" in line for line in listed.splitlines())
    ask = generation_pb2.AnswerRequest(question="How long are records kept?")
    for _ in range(50):  # pushed to the edge within its refresh period
        code = await _code(answers.Answer(ask, metadata=mesh.auth(tenant), timeout=10))
        if code != grpc.StatusCode.OK:
            break
        await asyncio.sleep(0.2)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "resumed" in await asyncio.to_thread(run, "tenants", "resume", tenant)

    assert "deleted" in await asyncio.to_thread(run, "tenants", "delete", tenant, "--yes")
    missing = _copilot(mesh, "tenants", "get", tenant)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
