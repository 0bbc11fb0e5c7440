"""The answer pipeline end to end through Envoy, with the real OpenAI and Anthropic SDKs
talking to a local fake of their APIs: providers, PII masking, scripted provider failures,
degradation, retrieval modes, streaming cancellation, config caching, and usage recorded
exactly once across a metering crash."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from tests.fakes.llm_server import FakeLLMServer
from tests.integration.conftest import RunningMesh, new_tenant_id, running_mesh
from tests.integration.otlp import SpanReceiver, span_receiver

pytestmark = pytest.mark.integration

DOC = retrieval_pb2.Document(
    document_id="kyc-policy", title="KYC policy", content_type="text/markdown",
    text="# KYC policy\n\n## 2. Screening\n\n2.1 Existing customers are rescreened daily against the sanctions "
         "list. Potential matches are escalated to the Head of Financial Crime within 24 hours.\n\n"
         "## 3. Records\n\n3.1 KYC records are kept for five years after the relationship ends. "
         "Transaction logs are kept for ten years.\n",
)


@pytest.fixture(scope="module")
def collector() -> Iterator[SpanReceiver]:
    with span_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def gen_mesh(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLMServer,
             collector: SpanReceiver) -> Iterator[RunningMesh]:
    """A mesh of its own (its metering is killed mid-test), with both SDK providers pointed
    at the fake."""
    with running_mesh(tmp_path_factory, "genmesh", {
            **fake_llm.provider_env(), "COPILOT_LLM_TIMEOUT_S": "1.0", "COPILOT_LLM_MAX_RETRIES": "2",
            "COPILOT_ACCESS_LOG": "1", **collector.exporter_env()}) as running:
        yield running


async def _tenant(mesh: RunningMesh, channel: grpc.aio.Channel, plan: int = common_pb2.PLAN_ENTERPRISE,
                  **config: object) -> str:
    tenant_id = new_tenant_id("gen")
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    created = await tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
        tenant_id=tenant_id, display_name=tenant_id, plan=plan), metadata=mesh.operator(), timeout=10)  # type: ignore[arg-type]
    if config:
        tenant = created.tenant
        for key, value in config.items():
            setattr(tenant.config, key, value)
        await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant, update_mask={"paths": [f"config.{k}" for k in config]}), metadata=mesh.operator(), timeout=5)
    await retrieval_pb2_grpc.RetrievalServiceStub(channel).IngestDocuments(
        retrieval_pb2.IngestDocumentsRequest(documents=[DOC]), metadata=mesh.auth(tenant_id, ("member", "admin")),
        timeout=10)
    return tenant_id


async def _answer(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str, question: str,
                  mode: int = 0) -> generation_pb2.AnswerResponse:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    return await stub.Answer(generation_pb2.AnswerRequest(question=question, mode=mode),  # type: ignore[arg-type]
                             metadata=mesh.auth(tenant), timeout=20)


@pytest.fixture
async def gchannel(gen_mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(gen_mesh.edge) as ch:
        yield ch


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_sdk_provider_answers_with_citations_usage_and_masked_pii(
        gen_mesh: RunningMesh, gchannel: grpc.aio.Channel, fake_llm: FakeLLMServer, provider: str) -> None:
    tenant = await _tenant(gen_mesh, gchannel, provider=provider, model=f"{provider}-model")
    fake_llm.reset()
    question = "How often are customers rescreened? Reply to jane.doe@example.com or +44 20 7946 0958."
    response = await _answer(gen_mesh, gchannel, tenant, question)
    details = response.details
    assert (details.provider, details.model, details.degraded) == (provider, f"{provider}-model", False)
    assert "[1]" in response.answer and "rescreened daily" in response.answer
    assert details.citations[0].index == 1 and details.citations[0].document_id == "kyc-policy"
    assert "rescreened daily" in details.citations[0].quote
    assert details.usage.estimated is False and details.usage.output_tokens > 0
    # PII never reached the provider; the masks are reported, the values are not.
    sent = json.dumps([r["body"] for r in fake_llm.state.requests])
    assert "jane.doe@example.com" not in sent and "7946" not in sent and "[EMAIL_1]" in sent
    assert sorted(m.kind for m in details.pii_masks) == ["EMAIL", "PHONE"]
    assert "jane" not in str(details)


async def test_scripted_provider_failures(gen_mesh: RunningMesh, gchannel: grpc.aio.Channel,
                                          fake_llm: FakeLLMServer) -> None:
    tenant = await _tenant(gen_mesh, gchannel, provider="openai")
    question = "How often are customers rescreened?"
    # 429 (retry-after) then 500: the SDK retries before any text exists; the answer is whole.
    fake_llm.reset()
    fake_llm.state.script[:] = ["429", "500"]
    ok = await _answer(gen_mesh, gchannel, tenant, question)
    assert ok.details.provider == "openai" and not ok.details.degraded
    assert len(fake_llm.state.requests) == 3
    # A malformed first chunk: nothing was said yet, so the extractive answerer answers.
    fake_llm.state.script[:] = ["malformed"]
    bad = await _answer(gen_mesh, gchannel, tenant, question)
    assert bad.details.degraded and bad.details.provider == "extractive"
    assert "malformed" in bad.details.degraded_reason and "daily" in bad.answer
    # Timeouts on every attempt: degraded, answered extractively, within the deadline.
    fake_llm.state.script[:] = ["timeout"] * 3
    slow = await _answer(gen_mesh, gchannel, tenant, question)
    assert slow.details.degraded and "timed out" in slow.details.degraded_reason
    # A third failure in a row opens this tenant's breaker: the provider is not called.
    fake_llm.state.script[:] = ["500"] * 3
    await _answer(gen_mesh, gchannel, tenant, question)
    fake_llm.reset()
    skipped = await _answer(gen_mesh, gchannel, tenant, question)
    assert "circuit breaker" in skipped.details.degraded_reason and fake_llm.state.requests == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_retrieval_modes_report_what_ran(gen_mesh: RunningMesh, gchannel: grpc.aio.Channel,
                                               fake_llm: FakeLLMServer, provider: str) -> None:
    fake_llm.reset()
    tenant = await _tenant(gen_mesh, gchannel, provider=provider, agentic_tools=True)
    compound = "How long are KYC records kept and who handles potential sanctions matches?"
    decomposed = await _answer(gen_mesh, gchannel, tenant, compound, common_pb2.RETRIEVAL_MODE_DECOMPOSED)
    assert decomposed.details.mode_used == common_pb2.RETRIEVAL_MODE_DECOMPOSED
    assert len(decomposed.details.sub_questions) == 2
    agentic = await _answer(gen_mesh, gchannel, tenant, "How often are customers rescreened?",
                            common_pb2.RETRIEVAL_MODE_AGENTIC)
    assert agentic.details.mode_used == common_pb2.RETRIEVAL_MODE_AGENTIC, agentic.details.degraded_reason
    assert agentic.details.sub_questions and agentic.details.citations
    assert any(r["body"].get("tools") for r in fake_llm.state.requests)
    for mode in (common_pb2.RETRIEVAL_MODE_BASIC, common_pb2.RETRIEVAL_MODE_HYBRID):
        ran = await _answer(gen_mesh, gchannel, tenant, "How often are customers rescreened?", mode)
        assert ran.details.mode_used == mode, ran.details.degraded_reason
        assert ran.details.provider == provider and ran.details.citations
    # The extractive provider has no tool calling: agentic degrades and says so.
    plain = await _tenant(gen_mesh, gchannel, agentic_tools=True)
    degraded = await _answer(gen_mesh, gchannel, plain, "How often are customers rescreened?",
                             common_pb2.RETRIEVAL_MODE_AGENTIC)
    assert degraded.details.degraded and "agentic" in degraded.details.degraded_reason
    assert degraded.details.mode_used != common_pb2.RETRIEVAL_MODE_AGENTIC
    # A free plan cannot ask for decomposed retrieval.
    free = await _tenant(gen_mesh, gchannel, plan=common_pb2.PLAN_FREE)
    refused = await _answer(gen_mesh, gchannel, free, compound, common_pb2.RETRIEVAL_MODE_DECOMPOSED)
    assert refused.details.degraded and "plan" in refused.details.degraded_reason


async def _usage(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str) -> metering_pb2.GetUsageResponse:
    return await metering_pb2_grpc.MeteringServiceStub(channel).GetUsage(
        metering_pb2.GetUsageRequest(), metadata=mesh.auth(tenant), timeout=5)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_stream_cancellation_closes_provider_stream_and_bills(
        gen_mesh: RunningMesh, gchannel: grpc.aio.Channel, fake_llm: FakeLLMServer, provider: str) -> None:
    tenant = await _tenant(gen_mesh, gchannel, provider=provider)
    fake_llm.reset()
    fake_llm.state.chunk_delay_s = 0.15
    stub = generation_pb2_grpc.GenerationServiceStub(gchannel)
    call = stub.StreamAnswer(generation_pb2.StreamAnswerRequest(question="How often are customers rescreened?"),
                             metadata=gen_mesh.auth(tenant), timeout=20)
    received = 0
    async for event in call:
        received += event.WhichOneof("event") == "delta"
        if received == 2:
            break
    call.cancel()
    for _ in range(60):
        await asyncio.sleep(0.1)
        if fake_llm.state.streams_aborted:
            break
    # Closed, never finished (a slow first attempt may have been retried by the SDK first).
    assert fake_llm.state.streams_aborted >= 1 and fake_llm.state.streams_finished == 0
    fake_llm.state.chunk_delay_s = 0
    for _ in range(50):
        usage = await _usage(gen_mesh, gchannel, tenant)
        if usage.requests:
            break
        await asyncio.sleep(0.1)
    assert usage.requests == 1 and usage.output_tokens >= 2
    # The abandoned question is in the audit trail once, marked as not completed.
    from copilot.v1 import audit_pb2, audit_pb2_grpc

    audit = audit_pb2_grpc.AuditServiceStub(gchannel)
    questions: list[audit_pb2.AuditEvent] = []
    for _ in range(50):
        questions = list((await audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(
            tenant_id=tenant, filter=audit_pb2.AuditFilter(kinds=[audit_pb2.AUDIT_EVENT_KIND_QUESTION])),
            metadata=gen_mesh.operator(), timeout=10)).events)
        if questions:
            break
        await asyncio.sleep(0.1)
    assert len(questions) == 1 and "did not complete" in questions[0].question.degraded_reason


async def _edge_knows_plans(mesh: RunningMesh) -> None:
    """The edge refreshes plan limits in the background; until then a new tenant has the
    default (small) rate limits."""
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)


def _config_fetches(mesh: RunningMesh, tenant: str) -> int:
    """GetTenant calls metering served for this tenant's own identity (generation's fetches)."""
    log = mesh.mesh.log_dir / "metering.log"
    return sum(1 for line in log.read_text(errors="replace").splitlines()
               if '"rpc"' in line and "GetTenant" in line and f'"tenant": "{tenant}"' in line)


async def test_config_is_not_fetched_per_request(gen_mesh: RunningMesh, gchannel: grpc.aio.Channel) -> None:
    tenant = await _tenant(gen_mesh, gchannel)
    await _edge_knows_plans(gen_mesh)
    await _answer(gen_mesh, gchannel, tenant, "warm-up question about records")
    # Basic (lexical) retrieval: this is about config fetches, not about the embedder's speed.
    results = await asyncio.gather(*(_answer(gen_mesh, gchannel, tenant, f"How long are KYC records kept? {i}",
                                             common_pb2.RETRIEVAL_MODE_BASIC) for i in range(100)))
    assert all(r.details.citations for r in results)
    # The tenant reached generation through the WatchTenants push when it was created: 101
    # answers, several TTLs (1 s here) apart from its creation, and not one fetch.
    assert _config_fetches(gen_mesh, tenant) == 0


async def test_a_config_change_reaches_generation_by_push(gen_mesh: RunningMesh, gchannel: grpc.aio.Channel) -> None:
    tenant = await _tenant(gen_mesh, gchannel)
    await _edge_knows_plans(gen_mesh)
    first = await _answer(gen_mesh, gchannel, tenant, "How long are KYC records kept?")
    # Switch the tenant's configured mode to the other of basic and hybrid.
    target = common_pb2.RETRIEVAL_MODE_BASIC if first.details.mode_used != common_pb2.RETRIEVAL_MODE_BASIC \
        else common_pb2.RETRIEVAL_MODE_HYBRID
    tenants = tenant_pb2_grpc.TenantServiceStub(gchannel)
    await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, config=tenant_pb2.TenantConfig(retrieval_mode=target)),
        update_mask={"paths": ["config.retrieval_mode"]}), metadata=gen_mesh.operator(), timeout=5)
    mode_used = first.details.mode_used
    for _ in range(50):  # bounded: 50 answers at most
        mode_used = (await _answer(gen_mesh, gchannel, tenant, "How long are KYC records kept?")).details.mode_used
        if mode_used == target:
            break
        await asyncio.sleep(0.02)
    assert mode_used == target
    assert _config_fetches(gen_mesh, tenant) == 0  # pushed, not refetched after a TTL


async def test_usage_recorded_exactly_once_across_a_metering_crash(
        gen_mesh: RunningMesh, gchannel: grpc.aio.Channel) -> None:
    tenant = await _tenant(gen_mesh, gchannel)
    await _edge_knows_plans(gen_mesh)
    answered = 0
    failed = 0

    async def ask(n: int) -> None:
        nonlocal answered, failed
        for i in range(n):
            try:
                await _answer(gen_mesh, gchannel, tenant, f"How long are KYC records kept? {i}",
                              common_pb2.RETRIEVAL_MODE_BASIC)
                answered += 1
            except grpc.aio.AioRpcError:
                failed += 1

    await ask(5)
    await asyncio.to_thread(gen_mesh.mesh.kill, "metering")
    await ask(5)  # answered on the last quota decision; usage waits in the outbox
    outbox = gen_mesh.settings.data_dir / "generation" / "usage-outbox"
    assert len(list(outbox.glob("*.json"))) >= 1
    await asyncio.gather(asyncio.to_thread(gen_mesh.mesh.respawn, "metering"), ask(5))
    await ask(3)
    for _ in range(100):
        if not list(outbox.glob("*.json")):
            break
        await asyncio.sleep(0.2)
    assert not list(outbox.glob("*.json"))
    usage = await _usage(gen_mesh, gchannel, tenant)
    assert answered >= 13
    assert usage.requests == answered, (answered, failed)


async def test_tenant_id_is_on_every_span_of_a_request(gen_mesh: RunningMesh, gchannel: grpc.aio.Channel,
                                                       collector: SpanReceiver) -> None:
    tenant = await _tenant(gen_mesh, gchannel)
    await _answer(gen_mesh, gchannel, tenant, "How often are customers rescreened?")
    for _ in range(50):
        spans = collector.spans
        traces = {s.trace_id for s in spans if s.attributes.get("tenant.id") == tenant
                  and s.service == "copilot-generation"}
        services = {s.service for s in spans if s.trace_id in traces}
        if {"copilot-generation", "copilot-retrieval", "copilot-metering"} <= services:
            break
        await asyncio.sleep(0.2)
    assert {"copilot-generation", "copilot-retrieval", "copilot-metering"} <= services
    # The services' spans (Envoy's own client spans, such as its rate limit call, carry no tags).
    for s in spans:
        if s.trace_id in traces and s.service != "copilot-envoy":
            assert s.attributes.get("tenant.id") == tenant, (s.service, s.name, s.attributes)


async def test_identical_questions_from_two_tenants_never_share_results(
        gen_mesh: RunningMesh, gchannel: grpc.aio.Channel) -> None:
    first = await _tenant(gen_mesh, gchannel)
    second = new_tenant_id("gen")
    await tenant_pb2_grpc.TenantServiceStub(gchannel).CreateTenant(tenant_pb2.CreateTenantRequest(
        tenant_id=second, display_name=second, plan=common_pb2.PLAN_ENTERPRISE), metadata=gen_mesh.operator(),
        timeout=10)
    # An earlier test crashes metering on purpose: the edge's tenant watch may still be
    # reconnecting, so let its periodic refresh see the new tenants' plans.
    await _edge_knows_plans(gen_mesh)
    other = retrieval_pb2.Document(document_id="other-policy", title="Other", text=(
        "Customers are rescreened every quarter by the screening team. Records are kept for seven years."))
    await retrieval_pb2_grpc.RetrievalServiceStub(gchannel).IngestDocuments(
        retrieval_pb2.IngestDocumentsRequest(documents=[other]), metadata=gen_mesh.auth(second, ("member", "admin")),
        timeout=10)
    question = "How often are customers rescreened?"
    for _ in range(3):
        answers = await asyncio.gather(*(_answer(gen_mesh, gchannel, t, question) for t in (first, second) * 4))
        for i, response in enumerate(answers):
            own = "kyc-policy" if i % 2 == 0 else "other-policy"
            assert {c.document_id for c in response.details.citations} == {own}
            assert ("daily" in response.answer) == (own == "kyc-policy")


async def test_one_tenants_flood_does_not_fail_another(gen_mesh: RunningMesh, gchannel: grpc.aio.Channel) -> None:
    noisy = await _tenant(gen_mesh, gchannel, plan=common_pb2.PLAN_FREE)
    quiet = await _tenant(gen_mesh, gchannel)
    await _edge_knows_plans(gen_mesh)

    async def outcome(tenant: str) -> grpc.StatusCode:
        try:
            await _answer(gen_mesh, gchannel, tenant, "How long are KYC records kept?")
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    flood = [outcome(noisy) for _ in range(60)]
    calm = [outcome(quiet) for _ in range(10)]
    results = await asyncio.gather(*flood, *calm)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in results[:60]
    assert set(results[60:]) == {grpc.StatusCode.OK}
