"""Two tenants, different documents: each one's search and answers cite only its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from copilot.v1 import generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration

BANK_DOC = retrieval_pb2.Document(
    document_id="sanctions-policy", title="Sanctions screening policy", content_type="text/markdown",
    text="# Sanctions screening policy\n\n## 2. Screening\n\n2.1 Every customer is screened against the "
         "consolidated sanctions list before onboarding.\n\n2.2 Existing customers are rescreened daily. "
         "Potential matches are escalated to the Head of Financial Crime within 24 hours.\n",
)
CLINIC_DOC = retrieval_pb2.Document(
    document_id="patient-records", title="Patient records policy", content_type="text/markdown",
    text="# Patient records policy\n\n## 3. Sanctions for misuse\n\n3.1 Staff who access patient records "
         "without a clinical reason face disciplinary sanctions.\n\n3.2 Access to records is logged and "
         "reviewed monthly by the Privacy Officer.\n",
)


async def _ingest(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str, doc: retrieval_pb2.Document) -> None:
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    response = await stub.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=[doc]),
                                          metadata=mesh.auth(tenant, ("member", "admin")), timeout=10)
    assert response.results[0].chunks > 0


@pytest.fixture
async def two_tenants(mesh: RunningMesh, channel: grpc.aio.Channel) -> tuple[str, str]:
    bank = await create_tenant(mesh, channel, prefix="bank")
    clinic = await create_tenant(mesh, channel, prefix="clinic")
    await _ingest(mesh, channel, bank, BANK_DOC)
    await _ingest(mesh, channel, clinic, CLINIC_DOC)
    return bank, clinic


async def test_search_only_sees_own_documents(mesh: RunningMesh, channel: grpc.aio.Channel,
                                              two_tenants: tuple[str, str]) -> None:
    bank, clinic = two_tenants
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    # The same words appear in both tenants' documents: each must only ever get its own.
    for tenant, own in ((bank, "sanctions-policy"), (clinic, "patient-records")):
        response = await stub.Search(retrieval_pb2.SearchRequest(query="sanctions screening records", top_k=10),
                                     metadata=mesh.auth(tenant), timeout=5)
        assert response.hits, tenant
        assert {h.document_id for h in response.hits} == {own}


async def test_answers_cite_only_own_documents(mesh: RunningMesh, channel: grpc.aio.Channel,
                                               two_tenants: tuple[str, str]) -> None:
    bank, clinic = two_tenants
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    question = "How often are customers rescreened against sanctions lists?"
    bank_answer, clinic_answer = await asyncio.gather(
        stub.Answer(generation_pb2.AnswerRequest(question=question), metadata=mesh.auth(bank), timeout=10),
        stub.Answer(generation_pb2.AnswerRequest(question=question), metadata=mesh.auth(clinic), timeout=10),
    )
    assert "daily" in bank_answer.answer
    assert bank_answer.details.citations
    assert {c.document_id for c in bank_answer.details.citations} == {"sanctions-policy"}
    assert all(c.document_id == "patient-records" for c in clinic_answer.details.citations)
    assert "daily" not in clinic_answer.answer


async def test_stream_answer_streams_text_then_details(mesh: RunningMesh, channel: grpc.aio.Channel,
                                                       two_tenants: tuple[str, str]) -> None:
    bank, _ = two_tenants
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    events = [e async for e in stub.StreamAnswer(
        generation_pb2.StreamAnswerRequest(question="Who handles potential sanctions matches?"),
        metadata=mesh.auth(bank), timeout=10)]
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert deltas and events[-1].WhichOneof("event") == "details"
    text = "".join(deltas)
    assert "Head of Financial Crime" in text and "[1]" in text
    details = events[-1].details
    assert details.citations[0].index == 1 and details.citations[0].document_id == "sanctions-policy"
    quote = " ".join(details.citations[0].quote.split())
    assert quote and quote[:40] in " ".join(BANK_DOC.text.split())
    assert details.usage.output_tokens > 0 and details.provider == "extractive"


async def test_member_cannot_ingest(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=[BANK_DOC]),
                                   metadata=mesh.auth(tenant, ("member",)), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_requests_are_invalid_argument(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    search = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    answer = generation_pb2_grpc.GenerationServiceStub(channel)
    calls: list[Awaitable[Any]] = [
        search.Search(retrieval_pb2.SearchRequest(query="  "), metadata=mesh.auth(tenant), timeout=5),
        search.Search(retrieval_pb2.SearchRequest(query="x", top_k=10_000), metadata=mesh.auth(tenant), timeout=5),
        answer.Answer(generation_pb2.AnswerRequest(question=""), metadata=mesh.auth(tenant), timeout=5),
        answer.Answer(generation_pb2.AnswerRequest(question="q" * 5000), metadata=mesh.auth(tenant), timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details()
