"""Generation's clients of metering and retrieval, in domain types, against the real
MeteringService, TenantService, AuditService and RetrievalService on a loopback grpc.aio
server (with the identity interceptor), called through a channel built like the server's
(`lifecycle.connect`: identity and deadline forwarded)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from copilot.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from servers.common import identity
from servers.common.audit import AuditTrail
from servers.common.errors import ResourceExhausted, from_rpc_error
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.lifecycle import connect
from servers.generation import convert
from servers.generation.clients import MeteringClient, QuestionAuditor, RetrievalClient, UsageRecorder
from servers.generation.models import (
    AnsweredQuestion,
    AuditCitation,
    Plan,
    RetrievalMode,
    SearchMode,
    Usage,
    allowed_modes,
)
from servers.generation.tenant_config import config_from_proto
from servers.metering.audit.service import AuditServiceServicer, MeteringAudit
from servers.metering.audit.store import AUDIT_CODEC, AuditStore
from servers.metering.storage.clickhouse import ChdbBackend
from servers.metering.storage.log import LocalLog
from servers.metering.tenants.service import TenantServiceServicer
from servers.metering.tenants.store import CachedTenantStore, SqliteTenantStore
from servers.metering.usage.service import MeteringServiceServicer
from servers.metering.usage.store import SqliteUsageStore
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.service import RetrievalServiceServicer
from servers.retrieval.stores.sqlite import SqliteFtsStore

OPERATOR = (("x-tenant-id", "platform"), ("x-user-id", "ops"), ("x-roles", "operator"))


def as_member(tenant: str, user: str = "alice") -> contextlib.AbstractContextManager[identity.Identity]:
    return identity.acting_as(identity.Identity(tenant_id=tenant, subject=user, roles=frozenset({"member"})))


@dataclass
class Peers:
    """The real services generation calls, and a channel to them as generation makes it."""

    server: grpc.aio.Server
    # Generation's channel; the stubs below are the test's own (a plain channel, identity
    # headers as Envoy sets them).
    channel: grpc.aio.Channel
    tenants: tenant_pb2_grpc.TenantServiceAsyncStub
    retrieval: retrieval_pb2_grpc.RetrievalServiceAsyncStub
    audit: audit_pb2_grpc.AuditServiceAsyncStub
    metering: metering_pb2_grpc.MeteringServiceAsyncStub

    async def create(self, tenant_id: str, plan: int = common_pb2.PLAN_FREE) -> None:
        await self.tenants.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id=tenant_id, plan=plan),  # type: ignore[arg-type]
                                        metadata=OPERATOR)

    async def tokens_used(self, tenant_id: str) -> int:
        usage = await self.metering.GetUsage(metering_pb2.GetUsageRequest(tenant_id=tenant_id), metadata=OPERATOR)
        return usage.total_tokens


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[Peers]:
    tenant_store = CachedTenantStore(SqliteTenantStore(tmp_path / "tenants.sqlite"), ttl_s=0.0)
    usage_store = SqliteUsageStore(tmp_path / "usage.sqlite")
    audit_store = AuditStore(ChdbBackend(tmp_path / "chdb"), LocalLog(tmp_path / "audit-log", codec=AUDIT_CODEC),
                             owns_db=True, flush_interval_s=0.05)
    documents = SqliteFtsStore(tmp_path / "documents")
    for store in (tenant_store, usage_store, audit_store):
        await store.open()
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    metering_pb2_grpc.add_MeteringServiceServicer_to_server(MeteringServiceServicer(tenant_store, usage_store), server)
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(TenantServiceServicer(tenant_store), server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(
        AuditServiceServicer(MeteringAudit(audit_store, tenant_store)), server)
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(
        RetrievalServiceServicer(RetrievalEngine(documents)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = connect(f"127.0.0.1:{port}")
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Peers(server, channel, tenant_pb2_grpc.TenantServiceStub(plain),
                    retrieval_pb2_grpc.RetrievalServiceStub(plain),
                    audit_pb2_grpc.AuditServiceStub(plain),
                    metering_pb2_grpc.MeteringServiceStub(plain))
    finally:
        await plain.close(None)
        await channel.close(None)
        await server.stop(None)
        await documents.close()
        for store in (audit_store, usage_store, tenant_store):
            await store.close()


def usage(tenant: str, event_id: str, tokens: int = 60, reservation_id: str = "") -> Usage:
    return Usage(event_id=event_id, tenant_id=tenant, user="alice", provider="extractive", model="extractive-v1",
                 input_tokens=tokens - 10, output_tokens=10, occurred_at_s=int(time.time()) - 60,
                 reservation_id=reservation_id)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


# --- conversions of enums ------------------------------------------------------------------


def test_every_proto_mode_and_plan_has_a_domain_value() -> None:
    for name, number in common_pb2.RetrievalMode.items():
        mode = convert.mode_from_proto(number)
        assert (mode is None) == (name == "RETRIEVAL_MODE_UNSPECIFIED"), name
        if mode is not None:
            assert convert.mode_to_proto(mode) == number
    for name, number in common_pb2.Plan.items():
        assert (convert.plan_from_proto(number) is None) == (name == "PLAN_UNSPECIFIED"), name
    for name, number in retrieval_pb2.SearchMode.items():
        search = convert.search_mode_from_proto(number)
        assert (search is None) == (name == "SEARCH_MODE_UNSPECIFIED"), name
        if search is not None:
            assert convert.search_mode_to_proto(search) == number


def test_a_tenant_config_gets_domain_values_and_the_system_defaults() -> None:
    unset = config_from_proto(tenant_pb2.Tenant(tenant_id="acme"))
    assert (unset.plan, unset.retrieval_mode, unset.provider, unset.top_k, unset.max_tokens) == (
        Plan.FREE, RetrievalMode.BASIC, "extractive", 5, 512)
    assert allowed_modes(unset) == {RetrievalMode.BASIC, RetrievalMode.HYBRID}
    pro = config_from_proto(tenant_pb2.Tenant(
        tenant_id="acme", plan=common_pb2.PLAN_PRO, state=tenant_pb2.TENANT_STATE_SUSPENDED,
        config=tenant_pb2.TenantConfig(retrieval_mode=common_pb2.RETRIEVAL_MODE_AGENTIC, top_k=7)))
    assert (pro.plan, pro.retrieval_mode, pro.top_k, pro.suspended) == (Plan.PRO, RetrievalMode.AGENTIC, 7, True)
    # The tenant's own mode runs even where its plan would not offer it per request.
    assert allowed_modes(pro) == {RetrievalMode.BASIC, RetrievalMode.HYBRID, RetrievalMode.DECOMPOSED,
                                  RetrievalMode.AGENTIC}


# --- metering ----------------------------------------------------------------------------------


async def _limit_tokens(peers: Peers, tenant: str, tokens: int) -> None:
    await peers.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, limits=tenant_pb2.TenantLimits(tokens_per_month=tokens)),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.tokens_per_month"])), metadata=OPERATOR)


async def test_admission_holds_then_settles_and_refuses_in_domain_types(peers: Peers, tmp_path: Path) -> None:
    await peers.create("acme")
    await _limit_tokens(peers, "acme", 100)
    metering = MeteringClient(peers.channel)
    recorder = UsageRecorder(metering, tmp_path / "usage-outbox")
    with as_member("acme"):
        admitted = await metering.reserve("answer:1", tokens=40)
        assert admitted.allowed and not admitted.stale
        assert {q.name for q in admitted.quotas} >= {"tokens_per_month", "requests_per_hour"}
        tokens = next(q for q in admitted.quotas if q.name == "tokens_per_month")
        assert (tokens.used, tokens.limit) == (0, 100)
        # A retried reserve of the same answer holds nothing more.
        assert (await metering.reserve("answer:1", tokens=40)).allowed
        # The hold counts: 40 held + 70 > 100.
        with pytest.raises(ResourceExhausted):
            await metering.reserve("answer:2", tokens=70)
        # The answer's usage (60) settles its hold (40): 60 + 50 > 100 is refused, 60 + 40 is not.
        assert await recorder.record(usage("acme", "answer:1", tokens=60, reservation_id="answer:1"))
        with pytest.raises(ResourceExhausted) as refused:
            await metering.reserve("answer:3", tokens=50)
        assert (await metering.reserve("answer:4", tokens=40)).allowed
        # A released hold is free again.
        await metering.release("acme", "answer:4")
        assert (await metering.reserve("answer:5", tokens=40)).allowed
    # What the caller is told: this service's RESOURCE_EXHAUSTED naming the quota that refused.
    error = refused.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [(v.subject, v.description) for v in error.violations] == [("tenant:acme:tokens_per_month",
                                                                       "60 of 100 used")]
    assert error.retry_after_s > 0
    await recorder.stop()


async def test_usage_is_written_for_its_own_tenant_whoever_is_calling(peers: Peers, tmp_path: Path) -> None:
    await peers.create("acme")
    await peers.create("globex")
    recorder = UsageRecorder(MeteringClient(peers.channel), tmp_path / "usage-outbox")
    # No identity in the context at all (as on a redelivery), then another tenant's.
    assert identity.current_or_none() is None
    assert await recorder.record(usage("acme", "answer:a", tokens=60))
    with as_member("globex"):
        assert await recorder.record(usage("acme", "answer:b", tokens=40))
    await recorder.outbox.settled()
    assert await peers.tokens_used("acme") == 100
    assert await peers.tokens_used("globex") == 0
    billed = await peers.metering.GetUsage(metering_pb2.GetUsageRequest(tenant_id="acme"), metadata=OPERATOR)
    assert (billed.events, billed.requests) == (2, 2)
    assert recorder.outbox.pending_count() == 0
    await recorder.stop()


async def test_usage_kept_while_metering_is_away_reaches_it_for_its_tenant_after_a_restart(
        peers: Peers, tmp_path: Path) -> None:
    await peers.create("acme")
    outbox = tmp_path / "usage-outbox"
    # Nothing listens here: every delivery fails, the outbox keeps the event.
    away = connect(f"127.0.0.1:{_closed_port()}")
    recorder = UsageRecorder(MeteringClient(away, usage_timeout_s=0.2), outbox)
    with as_member("acme"):
        # Safe once it is on disk here, though Metering never answered.
        assert await recorder.record(usage("acme", "answer:kept", tokens=70))
    await recorder.stop()
    await away.close(None)
    assert recorder.outbox.pending_count() == 1

    # "After the restart": a new recorder on the same directory, outside any request.
    restarted = UsageRecorder(MeteringClient(peers.channel), outbox)
    assert identity.current_or_none() is None
    await restarted.start()

    async def delivered() -> bool:
        return await peers.tokens_used("acme") == 70

    async def drained() -> bool:
        return restarted.outbox.pending_count() == 0

    await eventually(delivered)
    await eventually(drained)
    await restarted.stop()
    assert await peers.tokens_used("acme") == 70


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_tenant_allowed_recently_is_answered_while_metering_is_unreachable(peers: Peers) -> None:
    for tenant in ("acme", "globex"):
        await peers.create(tenant)
    metering = MeteringClient(peers.channel, quota_timeout_s=0.5)
    expired = MeteringClient(peers.channel, quota_timeout_s=0.5, quota_grace_s=0.0)
    with as_member("acme"):
        assert (await metering.reserve("answer:a", 10)).allowed
        assert (await expired.reserve("answer:b", 10)).allowed
    await peers.server.stop(None)
    with as_member("acme"):
        stale = await metering.reserve("answer:c", 10)
    assert stale.allowed and stale.stale
    # A tenant metering never allowed is not answered on a guess: the RPC's error stands.
    with as_member("globex"), pytest.raises(grpc.aio.AioRpcError) as info:
        await metering.reserve("answer:d", 10)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # Past the grace period, nobody is.
    with as_member("acme"), pytest.raises(grpc.aio.AioRpcError):
        await expired.reserve("answer:e", 10)


async def test_a_refusal_of_metering_reaches_the_caller_unchanged(peers: Peers) -> None:
    await peers.create("acme")
    await peers.tenants.SuspendTenant(tenant_pb2.SuspendTenantRequest(tenant_id="acme", suspended=True),
                                      metadata=OPERATOR)
    metering = MeteringClient(peers.channel)
    with as_member("acme"), pytest.raises(grpc.aio.AioRpcError) as info:
        await metering.reserve("answer:1", 10)
    code, _, details = from_rpc_error(info.value)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert [d.reason for d in details if isinstance(d, error_details_pb2.ErrorInfo)] == ["TENANT_SUSPENDED"]


# --- retrieval ---------------------------------------------------------------------------------


KYC = ("# KYC policy\n\n## Screening\n\nExisting customers are rescreened daily against the sanctions list.\n\n"
       "## Records\n\nKYC records are kept for five years after the relationship ends.\n")


async def _ingest(peers: Peers, tenant: str) -> None:
    admin = (("x-tenant-id", tenant), ("x-user-id", "admin"), ("x-roles", "admin,ingest"))
    await peers.retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=[
        retrieval_pb2.Document(document_id="kyc", title="KYC policy", text=KYC, source="kyc.md",
                               content_type="text/markdown", metadata={"team": "aml"}),
        retrieval_pb2.Document(document_id="travel", title="Travel", text="Travel is booked through the portal.",
                               metadata={"team": "ops"}),
    ]), metadata=admin)


async def test_search_returns_domain_passages_and_the_mode_that_ran(peers: Peers) -> None:
    await _ingest(peers, "acme")
    retrieval = RetrievalClient(peers.channel)
    with as_member("acme"):
        found = await retrieval.search("how often are customers rescreened", 3, {}, SearchMode.BM25)
        # No embedder in this retrieval: it runs BM25 and says so.
        hybrid = await retrieval.search("how often are customers rescreened", 3, {}, SearchMode.HYBRID)
        filtered = await retrieval.search("portal", 3, {"team": "aml"}, SearchMode.BM25)
    assert found.mode == SearchMode.BM25 and hybrid.mode == SearchMode.BM25
    top = found.passages[0]
    assert (top.document_id, top.title, top.source) == ("kyc", "KYC policy", "kyc.md")
    assert "rescreened daily" in top.text and top.section and top.chunk_id and top.score > 0
    assert [p.document_id for p in hybrid.passages] == [p.document_id for p in found.passages]
    assert filtered.passages == []
    with as_member("globex"):
        assert (await retrieval.search("rescreened", 3, {}, SearchMode.BM25)).passages == []


async def test_a_refused_search_reaches_the_caller_unchanged(peers: Peers) -> None:
    retrieval = RetrievalClient(peers.channel)
    with as_member("acme"), pytest.raises(grpc.aio.AioRpcError) as info:
        await retrieval.search("anything", 1000, {}, SearchMode.BM25)
    code, _, details = from_rpc_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for d in details if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations] == ["top_k"]


# --- audit ---------------------------------------------------------------------------------------


async def test_an_answered_question_reaches_the_audit_trail_as_recorded(peers: Peers, tmp_path: Path) -> None:
    await peers.create("acme")
    trail = AuditTrail("generation", peers.channel, tmp_path / "audit-outbox")
    await trail.start()
    answered = AnsweredQuestion(
        request_id="r-1", question="What about [EMAIL_1]?", answer_sha256="ab" * 32,
        mode_used=RetrievalMode.DECOMPOSED, citations=[AuditCitation(document_id="kyc", chunk_id="kyc#0")],
        provider="extractive", model="extractive-v1", degraded=True, degraded_reason="hybrid search unavailable",
        latency_s=0.25, pii_placeholders=["[EMAIL_1]"], input_tokens=30, output_tokens=12)
    with as_member("acme"):
        assert await QuestionAuditor(trail).record(answered)
    member = (("x-tenant-id", "acme"), ("x-user-id", "alice"), ("x-roles", "admin"))

    async def listed() -> list[audit_pb2.AuditEvent]:
        response = await peers.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(), metadata=member)
        return [e for e in response.events if e.kind == audit_pb2.AUDIT_EVENT_KIND_QUESTION]

    async def arrived() -> bool:
        return bool(await listed())

    await eventually(arrived)
    await trail.stop()
    (event,) = await listed()
    assert (event.actor, event.service) == ("alice", "generation")
    q = event.question
    assert (q.request_id, q.question, q.answer_sha256, q.mode_used) == (
        "r-1", "What about [EMAIL_1]?", "ab" * 32, common_pb2.RETRIEVAL_MODE_DECOMPOSED)
    assert [(c.document_id, c.chunk_id) for c in q.citations] == [("kyc", "kyc#0")]
    assert (q.provider, q.model, q.degraded, q.degraded_reason) == (
        "extractive", "extractive-v1", True, "hybrid search unavailable")
    assert q.latency.ToNanoseconds() == 250_000_000
    assert (list(q.pii_placeholders), q.input_tokens, q.output_tokens) == (["[EMAIL_1]"], 30, 12)


@pytest.fixture(autouse=True)
def _no_identity_leaks() -> Iterator[None]:
    """Each test starts outside any call, as the outbox's redelivery does."""
    assert identity.current_or_none() is None
    yield
