"""One trace per request, from Envoy through every service and back.

The mesh runs as separate processes (Envoy and the four Python servers), so the
"in-memory exporter" is an OTLP/gRPC receiver in this test process that keeps every span
it is sent in memory: Envoy's OpenTelemetry tracer and the services' OTLP exporters all
export to it, exactly as they would to a real collector.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
)
from tests.fakes.llm_server import FakeLLMServer
from tests.integration.conftest import RunningMesh, create_tenant, running_mesh
from tests.integration.otlp import Span, SpanReceiver, span_receiver

pytestmark = pytest.mark.integration

ENVOY = "copilot-envoy"
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
DOC = retrieval_pb2.Document(
    document_id="screening", title="Screening policy", content_type="text/markdown",
    text="# Screening\n\nExisting customers are rescreened daily against the sanctions list. Potential "
         "matches are escalated to the Head of Financial Crime within 24 hours.\n",
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[SpanReceiver]:
    with span_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory: pytest.TempPathFactory, receiver: SpanReceiver,
                fake_llm: FakeLLMServer) -> Iterator[RunningMesh]:
    # Envoy's config is rendered from the settings (otel_endpoint); the services read the environment.
    with running_mesh(tmp_path_factory, "tracedmesh", {
            **receiver.exporter_env(), **fake_llm.provider_env(),
            # Vectors without a model to load: hybrid retrieval (lexical + dense + fusion) runs.
            "COPILOT_EMBEDDER": "hash"}, otel_endpoint=receiver.endpoint) as running:
        yield running


@pytest.fixture
async def tchannel(traced_mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(traced_mesh.edge) as ch:
        yield ch


async def _tenant(mesh: RunningMesh, channel: grpc.aio.Channel) -> str:
    tenant_id = await create_tenant(mesh, channel, common_pb2.PLAN_ENTERPRISE, "trace", provider="openai",
                                    documents=[DOC])
    # The edge learns the new tenant's plan limits in the background.
    await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)
    return tenant_id


async def _answer(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str) -> generation_pb2.AnswerResponse:
    return await generation_pb2_grpc.GenerationServiceStub(channel).Answer(
        generation_pb2.AnswerRequest(question="How often are existing customers rescreened?",
                                     mode=common_pb2.RETRIEVAL_MODE_HYBRID),
        metadata=mesh.auth(tenant), timeout=20)


WANTED = {
    # Envoy's request span and, under it, its call to the generation cluster.
    (ENVOY, "ingress"), (ENVOY, "router generation egress"),
    ("copilot-generation", "/copilot.v1.GenerationService/Answer"),
    ("copilot-generation", "quota.reserve"), ("copilot-generation", "retrieval.search"),
    ("copilot-generation", "provider.stream"), ("copilot-generation", "usage.write"),
    ("copilot-retrieval", "/copilot.v1.RetrievalService/Search"),
    ("copilot-retrieval", "search.lexical"), ("copilot-retrieval", "search.dense"),
    ("copilot-retrieval", "search.fusion"),
    ("copilot-metering", "/copilot.v1.MeteringService/ReserveQuota"), ("copilot-metering", "quota.reserve"),
    ("copilot-metering", "/copilot.v1.MeteringService/RecordUsage"), ("copilot-metering", "usage.record"),
}


def _present(spans: list[Span]) -> set[tuple[str, str]]:
    return {(s.service, s.name) for s in spans}


async def _trace_of_answer(receiver: SpanReceiver, tenant: str, within_s: float = 30.0) -> list[Span]:
    """The spans of the trace holding `tenant`'s Answer, once every expected one arrived
    (Envoy's tracer sends its batches every few seconds)."""
    deadline = time.monotonic() + within_s
    spans: list[Span] = []
    while time.monotonic() < deadline:
        answers = [s for s in receiver.spans if s.name == "/copilot.v1.GenerationService/Answer"
                   and s.kind == SERVER and s.attributes.get("tenant.id") == tenant]
        if answers:
            spans = [s for s in receiver.spans if s.trace_id == answers[0].trace_id]
            if _present(spans) >= WANTED:
                return spans
        await asyncio.sleep(0.25)
    return spans


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    chain: list[Span] = []
    current = by_id.get(span.parent_id)
    while current is not None and len(chain) < 50:
        chain.append(current)
        current = by_id.get(current.parent_id)
    return chain


async def test_one_answer_is_one_trace_from_envoy_through_every_service(
        traced_mesh: RunningMesh, tchannel: grpc.aio.Channel, receiver: SpanReceiver) -> None:
    tenant = await _tenant(traced_mesh, tchannel)
    response = await _answer(traced_mesh, tchannel, tenant)
    assert response.details.provider == "openai" and not response.details.degraded
    assert response.details.mode_used == common_pb2.RETRIEVAL_MODE_HYBRID

    spans = await _trace_of_answer(receiver, tenant)
    assert _present(spans) >= WANTED, (sorted(WANTED - _present(spans), key=str),
                                       sorted({(s.service, s.name) for s in receiver.spans}))
    by_id = {s.span_id: s for s in spans}

    # Envoy's request span is the root; the generation server span hangs under Envoy.
    roots = [s for s in spans if not s.parent_id]
    assert [(r.service, r.name, r.kind) for r in roots] == [(ENVOY, "ingress", SERVER)]
    answer = next(s for s in spans if s.name == "/copilot.v1.GenerationService/Answer" and s.kind == SERVER)
    upstream = by_id[answer.parent_id]
    assert (upstream.service, upstream.name, upstream.kind, upstream.parent_id) == (
        ENVOY, "router generation egress", CLIENT, roots[0].span_id)
    # From the verified claims (custom tags on Envoy's spans).
    assert roots[0].attributes.get("tenant.id") == upstream.attributes.get("tenant.id") == tenant
    assert roots[0].attributes.get("enduser.id") == "alice"

    def named(service: str, name: str) -> Span:
        return next(s for s in spans if s.service == service and s.name == name)

    # Generation's own stages are children of its server span; its calls are client spans under them.
    for stage in ("quota.reserve", "retrieval.search", "provider.stream", "usage.write"):
        assert named("copilot-generation", stage).parent_id == answer.span_id, stage
    assert named("copilot-generation", "provider.stream").attributes["gen_ai.system"] == "openai"
    search = named("copilot-retrieval", "/copilot.v1.RetrievalService/Search")
    search_client = by_id[search.parent_id]
    assert (search_client.service, search_client.kind) == ("copilot-generation", CLIENT)
    assert by_id[search_client.parent_id].name == "retrieval.search"
    for stage in ("search.lexical", "search.dense", "search.fusion"):
        assert search in _ancestors(named("copilot-retrieval", stage), by_id), stage
    check = named("copilot-metering", "/copilot.v1.MeteringService/ReserveQuota")
    assert by_id[by_id[check.parent_id].parent_id].name == "quota.reserve"
    assert named("copilot-metering", "quota.reserve").parent_id == check.span_id
    record = named("copilot-metering", "/copilot.v1.MeteringService/RecordUsage")
    assert named("copilot-generation", "usage.write") in _ancestors(record, by_id)
    assert named("copilot-metering", "usage.record").parent_id == record.span_id

    # Every span of the services carries the tenant and the acting user.
    for s in spans:
        if s.service != ENVOY:
            assert s.attributes.get("tenant.id") == tenant, (s.service, s.name, s.attributes)
            assert s.attributes.get("enduser.id") in ("alice", "service:generation"), (s.service, s.name)
    assert answer.attributes["enduser.id"] == "alice"


def _kept_in_outbox(mesh: RunningMesh, tenant: str) -> set[str]:
    """Trace ids of the answers whose usage generation logged as left to its outbox."""
    kept = set()
    for line in (mesh.mesh.log_dir / "generation.log").read_text(errors="replace").splitlines():
        if line.startswith("{") and "usage.outbox: kept for later delivery" in line:
            entry = json.loads(line)
            if entry.get("tenant") == tenant and entry.get("trace_id"):
                kept.add(entry["trace_id"])
    return kept


async def test_usage_delivered_later_from_the_outbox_links_back_to_the_answer(
        traced_mesh: RunningMesh, tchannel: grpc.aio.Channel, receiver: SpanReceiver) -> None:
    tenant = await _tenant(traced_mesh, tchannel)
    await _answer(traced_mesh, tchannel, tenant)  # metering allowed this tenant a moment ago
    await asyncio.to_thread(traced_mesh.mesh.kill, "metering")
    try:
        # Answered on the last quota decision; its usage waits in generation's outbox.
        await _answer(traced_mesh, tchannel, tenant)
        # The answer's own delivery waits for metering (retries, wait-for-ready) before it
        # gives up and leaves the event to the background loop: stay down until it has.
        kept: set[str] = set()
        for _ in range(300):
            kept = _kept_in_outbox(traced_mesh, tenant)
            if kept:
                break
            await asyncio.sleep(0.1)
        assert kept
    finally:
        await asyncio.to_thread(traced_mesh.mesh.respawn, "metering", 90.0)
    wanted = {"/copilot.v1.MeteringService/RecordUsage", "usage.record"}
    deliveries: list[Span] = []
    for _ in range(300):
        deliveries = [s for s in receiver.spans if s.name == "usage.outbox.deliver" and kept & set(s.links)]
        if deliveries and wanted <= {s.name for s in receiver.spans if s.trace_id == deliveries[0].trace_id
                                     and s.service == "copilot-metering"}:
            break
        await asyncio.sleep(0.1)
    assert deliveries, "no outbox delivery linked to the answer's trace"
    delivery = deliveries[0]
    linked = next(iter(kept & set(delivery.links)))
    # The linked trace is an answer of this tenant's (its generation server span).
    assert any(s.trace_id == linked and s.name == "/copilot.v1.GenerationService/Answer" and s.kind == SERVER
               for s in receiver.spans)
    # Its own trace (background work), linked to the answer; metering's spans follow it.
    assert delivery.trace_id != linked and not delivery.parent_id
    assert delivery.attributes["tenant.id"] == tenant
    metering = [s for s in receiver.spans if s.trace_id == delivery.trace_id and s.service == "copilot-metering"]
    assert wanted <= {s.name for s in metering}
    assert all(s.attributes.get("tenant.id") == tenant for s in metering)


async def test_a_streamed_answer_is_one_trace_too(traced_mesh: RunningMesh, tchannel: grpc.aio.Channel,
                                                  receiver: SpanReceiver) -> None:
    tenant = await _tenant(traced_mesh, tchannel)
    stub = generation_pb2_grpc.GenerationServiceStub(tchannel)
    parts = [r async for r in stub.StreamAnswer(generation_pb2.StreamAnswerRequest(
        question="How often are existing customers rescreened?"), metadata=traced_mesh.auth(tenant), timeout=20)]
    assert parts[-1].details.provider == "openai"
    rpc = "/copilot.v1.GenerationService/StreamAnswer"
    spans: list[Span] = []
    for _ in range(120):
        streams = [s for s in receiver.spans if s.name == rpc and s.kind == SERVER
                   and s.attributes.get("tenant.id") == tenant]
        spans = [s for s in receiver.spans if streams and s.trace_id == streams[0].trace_id]
        if _present(spans) >= {(ENVOY, "ingress"), (ENVOY, "router generation egress"),
                               ("copilot-metering", "usage.record"), ("copilot-generation", "provider.stream")}:
            break
        await asyncio.sleep(0.25)
    by_id = {s.span_id: s for s in spans}
    stream = next(s for s in spans if s.name == rpc and s.kind == SERVER)
    # The provider span and the usage write (made after the last delta) stay under the stream's span.
    for name in ("quota.reserve", "retrieval.search", "provider.stream", "usage.write"):
        assert next(s for s in spans if s.name == name and s.service == "copilot-generation").parent_id \
            == stream.span_id, name
    assert by_id[stream.parent_id].service == ENVOY
    assert all(s.attributes.get("tenant.id") == tenant for s in spans if s.service != ENVOY)
