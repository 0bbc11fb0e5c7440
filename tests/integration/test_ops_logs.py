"""Structured logs: one JSON line per request (trace id, tenant, RPC, status, latency), and no
personal data in any process's output, whatever a question carries — at DEBUG level, with a
real provider SDK in the path, and for a tenant that turned masking off (its questions then
go to retrieval and the provider as they are, but still never into a log)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from tests.fakes.llm_server import FakeLLMServer
from tests.integration.conftest import RunningMesh, new_tenant_id, running_mesh

pytestmark = pytest.mark.integration

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"  # Luhn-valid test number
IBAN = "GB82 WEST 1234 5698 7654 32"  # mod-97-valid example
# The values as they may be written elsewhere (digits only, no spaces).
RAW = (EMAIL, PHONE, "7946 0958", "79460958", CARD, "4111111111111111", IBAN, "GB82WEST12345698765432")
QUESTION = (f"My card {CARD} was charged twice; refund to IBAN {IBAN}. Which records do you keep? "
            f"Reply to {EMAIL} or call {PHONE}.")


@pytest.fixture(scope="module")
def debug_mesh(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLMServer) -> Iterator[RunningMesh]:
    with running_mesh(tmp_path_factory, "logmesh", {
            "COPILOT_LOG_LEVEL": "DEBUG", "COPILOT_ACCESS_LOG": "1", "COPILOT_EMBEDDER": "hash",
            **fake_llm.provider_env()}) as running:
        yield running


@pytest.fixture
async def dchannel(debug_mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(debug_mesh.edge) as ch:
        yield ch


async def _tenant(mesh: RunningMesh, channel: grpc.aio.Channel, masking: bool, provider: str) -> str:
    tenant_id = new_tenant_id("logs")
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    tenant = (await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
        tenant_id=tenant_id, display_name=tenant_id, plan=common_pb2.PLAN_ENTERPRISE),
        metadata=mesh.operator(), timeout=10)).tenant
    tenant.config.provider = provider
    tenant.config.pii_masking = masking
    await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant, update_mask={"paths": ["config.provider", "config.pii_masking"]}),
        metadata=mesh.operator(), timeout=5)
    await retrieval_pb2_grpc.RetrievalServiceStub(channel).IngestDocuments(retrieval_pb2.IngestDocumentsRequest(
        documents=[retrieval_pb2.Document(document_id="records", title="Records",
                                          text="KYC records are kept for five years after the relationship ends.")]),
        metadata=mesh.auth(tenant_id, ("member", "admin")), timeout=10)
    return tenant_id


def _lines(mesh: RunningMesh, name: str) -> list[str]:
    path = mesh.mesh.log_dir / f"{name}.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def _access_lines(mesh: RunningMesh, rpc: str, tenant: str) -> list[dict[str, Any]]:
    found = []
    for line in _lines(mesh, "generation"):
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("rpc") == rpc and entry.get("tenant") == tenant and entry.get("msg") == "rpc":
            found.append(entry)
    return found


async def test_no_pii_in_any_log_and_one_access_line_per_request(debug_mesh: RunningMesh, dchannel: grpc.aio.Channel,
                                                                 fake_llm: FakeLLMServer) -> None:
    mesh, channel = debug_mesh, dchannel
    tenant = await _tenant(mesh, channel, masking=True, provider="openai")
    # The Anthropic SDK logs every request's options (the prompt) at DEBUG.
    unmasked = await _tenant(mesh, channel, masking=False, provider="anthropic")
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)  # the edge learns their plans
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    fake_llm.reset()
    answer = await stub.Answer(generation_pb2.AnswerRequest(question=QUESTION), metadata=mesh.auth(tenant),
                               timeout=20)
    assert answer.details.provider == "openai" and not answer.details.degraded
    assert sorted(m.kind for m in answer.details.pii_masks) == ["CARD", "EMAIL", "IBAN", "PHONE"]
    # The tenant that turned masking off: the raw question really goes out (so a log could see it).
    raw = await stub.Answer(generation_pb2.AnswerRequest(question=QUESTION), metadata=mesh.auth(unmasked),
                            timeout=20)
    assert raw.details.provider == "anthropic" and not raw.details.pii_masks
    assert EMAIL in json.dumps([r["body"] for r in fake_llm.state.requests])
    # A provider failure (logged as a warning) with the raw question in flight.
    fake_llm.state.script[:] = ["500"] * 3
    failed = await stub.Answer(generation_pb2.AnswerRequest(question=QUESTION), metadata=mesh.auth(unmasked),
                               timeout=20)
    assert failed.details.degraded
    fake_llm.reset()
    streamed = [r async for r in stub.StreamAnswer(generation_pb2.StreamAnswerRequest(question=QUESTION),
                                                   metadata=mesh.auth(tenant), timeout=20)]
    assert streamed
    # Refused requests too: a question over the limit, and one from a caller without a valid token.
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Answer(generation_pb2.AnswerRequest(question=QUESTION + " x" * 3000), metadata=mesh.auth(tenant),
                          timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Answer(generation_pb2.AnswerRequest(question=QUESTION),
                          metadata=(("authorization", "Bearer not-a-token"),), timeout=10)

    # The access line of each call (written when it finishes, maybe just after the reply).
    lines: list[dict[str, Any]] = []
    for _ in range(50):
        lines = _access_lines(mesh, "/copilot.v1.GenerationService/Answer", tenant)
        if len(lines) >= 2 and _access_lines(mesh, "/copilot.v1.GenerationService/StreamAnswer", tenant):
            break
        await asyncio.sleep(0.1)
    assert [line["status"] for line in lines] == ["OK", "INVALID_ARGUMENT"]
    for line in lines + _access_lines(mesh, "/copilot.v1.GenerationService/StreamAnswer", tenant):
        assert len(line["trace_id"]) == 32 and int(line["trace_id"], 16)
        assert line["service"] == "generation" and line["level"] == "info"
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    # The calls it made for the answer are logged by retrieval and metering under the same trace.
    trace_id = lines[0]["trace_id"]
    for service in ("retrieval", "metering"):
        assert any(trace_id in line and f'"tenant": "{tenant}"' in line for line in _lines(mesh, service)), service

    # Nothing any process wrote (services, Envoy) holds a raw value.
    for name in ("generation", "retrieval", "metering", "edge", "envoy"):
        text = "\n".join(_lines(mesh, name))
        leaked = [value for value in RAW if value in text]
        assert not leaked, (name, leaked)
