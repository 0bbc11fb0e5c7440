"""Span-exact citations and the groundedness verdict through the real edge (Envoy, JWT) and
the whole mesh: an Answer's spans are the ingested document's own characters at the offsets
they give, every sentence has a verdict, and the tenant setting for unsupported sentences
flags, removes or refuses (with the real OpenAI SDK against the local fake model)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

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

# CRLF line ends, runs of spaces and a decomposed accent: offsets are the original's, not the
# chunker's normalised text.
TEXT = ("# Breach policy\r\n\r\n## 1. Reporting\r\n\r\nA breach must be reported to the FSRA within   72 hours.\r\n"
        "The MLRO decides on escalation and keeps a re\u0301gister of breaches.\r\n\r\n## 2. Records\r\n\r\n"
        "Breach records are kept for seven years after closure.\r\n")
DOC = retrieval_pb2.Document(document_id="breach-policy", title="Breach policy", content_type="text/markdown",
                             text=TEXT)
QUESTION = "Within how many hours must a breach be reported to the FSRA?"


@pytest.fixture(scope="module")
def grounded_mesh(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLMServer) -> Iterator[RunningMesh]:
    with running_mesh(tmp_path_factory, "grounded", {**fake_llm.provider_env(), "COPILOT_LLM_TIMEOUT_S": "2.0",
                                                     "COPILOT_LLM_MAX_RETRIES": "0"}) as running:
        yield running


@pytest.fixture
async def channel(grounded_mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(grounded_mesh.edge) as ch:
        yield ch


async def _tenant(mesh: RunningMesh, channel: grpc.aio.Channel, **config: object) -> str:
    tenant_id = new_tenant_id("grd")
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    created = await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
        tenant_id=tenant_id, display_name=tenant_id, plan=common_pb2.PLAN_PRO), metadata=mesh.operator(), timeout=10)
    if config:
        tenant = created.tenant
        for key, value in config.items():
            setattr(tenant.config, key, value)
        await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant, update_mask={"paths": [f"config.{k}" for k in config]}),
            metadata=mesh.operator(), timeout=5)
    await retrieval_pb2_grpc.RetrievalServiceStub(channel).IngestDocuments(
        retrieval_pb2.IngestDocumentsRequest(documents=[DOC]), metadata=mesh.auth(tenant_id, ("member", "admin")),
        timeout=20)
    return tenant_id


async def _answer(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str) -> generation_pb2.AnswerResponse:
    return await generation_pb2_grpc.GenerationServiceStub(channel).Answer(
        generation_pb2.AnswerRequest(question=QUESTION), metadata=mesh.auth(tenant), timeout=30)


def _assert_spans_are_the_documents(details: generation_pb2.AnswerDetails) -> None:
    assert details.spans
    cited = {c.index for c in details.citations}
    for span in details.spans:
        assert span.document_id == DOC.document_id and span.citation_index in cited
        assert 0 <= span.start < span.end <= len(TEXT)
        assert TEXT[span.start:span.end] == span.text


async def test_extractive_answer_cites_exact_spans_with_a_verdict(grounded_mesh: RunningMesh,
                                                                  channel: grpc.aio.Channel) -> None:
    tenant = await _tenant(grounded_mesh, channel)
    response = await _answer(grounded_mesh, channel, tenant)
    details = response.details
    _assert_spans_are_the_documents(details)
    assert all(s.origin == generation_pb2.SPAN_ORIGIN_EXTRACTED and s.match_quality == 1.0 for s in details.spans)
    assert "72 hours" in " ".join(s.text for s in details.spans)
    assert details.sentences and all(s.supported and s.citations and s.spans for s in details.sentences)
    for sentence in details.sentences:
        assert response.answer[sentence.start:sentence.end].strip()
    assert details.groundedness.score == pytest.approx(1.0)
    assert details.groundedness.policy == tenant_pb2.UNSUPPORTED_SENTENCES_FLAG

    # The streamed answer carries the same spans in its last message.
    stream = generation_pb2_grpc.GenerationServiceStub(channel).StreamAnswer(
        generation_pb2.StreamAnswerRequest(question=QUESTION), metadata=grounded_mesh.auth(tenant), timeout=30)
    last = [event async for event in stream][-1]
    assert [(s.start, s.end) for s in last.details.spans] == [(s.start, s.end) for s in details.spans]


async def test_model_quotes_map_to_spans_and_unsupported_sentences_are_flagged(
        grounded_mesh: RunningMesh, channel: grpc.aio.Channel, fake_llm: FakeLLMServer) -> None:
    tenant = await _tenant(grounded_mesh, channel, provider="openai", model="gpt-test")
    fake_llm.state.script[:] = ["unsupported"]
    response = await _answer(grounded_mesh, channel, tenant)
    details = response.details
    assert details.provider == "openai" and "Quotes:" not in response.answer
    _assert_spans_are_the_documents(details)
    assert any(s.origin == generation_pb2.SPAN_ORIGIN_QUOTED for s in details.spans)
    flagged = [s for s in details.sentences if not s.supported]
    assert len(flagged) == 1 and "9999" in response.answer[flagged[0].start:flagged[0].end]
    assert any("9999" in issue for issue in flagged[0].issues)
    assert details.groundedness.unsupported_sentences == 1 and details.groundedness.score < 1.0

    fake_llm.state.script[:] = ["misquote"]
    misquoted = (await _answer(grounded_mesh, channel, tenant)).details
    assert misquoted.groundedness.unmatched_quotes == 1
    assert all(s.origin != generation_pb2.SPAN_ORIGIN_QUOTED for s in misquoted.spans)
    _assert_spans_are_the_documents(misquoted)


async def test_the_tenant_setting_removes_or_refuses(grounded_mesh: RunningMesh, channel: grpc.aio.Channel,
                                                     fake_llm: FakeLLMServer) -> None:
    removing = await _tenant(grounded_mesh, channel, provider="openai", model="gpt-test",
                             unsupported_sentences=tenant_pb2.UNSUPPORTED_SENTENCES_REMOVE)
    fake_llm.state.script[:] = ["unsupported"]
    response = await _answer(grounded_mesh, channel, removing)
    assert "9999" not in response.answer and "72 hours" in response.answer
    removed = [s for s in response.details.sentences if s.removed]
    assert len(removed) == 1 and removed[0].start == removed[0].end
    assert not response.details.groundedness.refused

    refusing = await _tenant(grounded_mesh, channel, provider="openai", model="gpt-test",
                             unsupported_sentences=tenant_pb2.UNSUPPORTED_SENTENCES_REFUSE)
    fake_llm.state.script[:] = ["unsupported"]
    refused = await _answer(grounded_mesh, channel, refusing)
    assert refused.details.groundedness.refused
    assert "72 hours" not in refused.answer and "9999" not in refused.answer
    assert refused.details.groundedness.policy == tenant_pb2.UNSUPPORTED_SENTENCES_REFUSE

    # A supported answer is not refused.
    fake_llm.state.script[:] = []
    fine = await _answer(grounded_mesh, channel, refusing)
    assert not fine.details.groundedness.refused and "72 hours" in fine.answer
