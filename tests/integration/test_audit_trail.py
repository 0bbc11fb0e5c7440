"""The audit trail through the real mesh and Envoy: each auditable action leaves exactly one
event, one tenant never reads another's trail, events written while metering is down arrive
once it is back, an event whose call returned OK survives a SIGKILL of its service right
after, the CLI lists/exports/verifies (and finds a row tampered with directly in the
store), and tenant deletion keeps or erases the trail as configured."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from copilot.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from tests.integration.conftest import RunningMesh, create_tenant, running_mesh

pytestmark = pytest.mark.integration

K = audit_pb2
DOCS = [
    retrieval_pb2.Document(document_id="kyc-policy", title="KYC policy",
                           text="Customer due diligence records are kept for five years after the relationship "
                                "ends. High-risk customers need approval by the MLRO."),
    retrieval_pb2.Document(document_id="sanctions", title="Sanctions screening",
                           text="Every new customer is screened against the consolidated sanctions list before "
                                "onboarding, and again whenever the list changes."),
]


@pytest.fixture(scope="module")
def audit_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """A mesh of its own: its metering is killed and restarted with another deletion setting."""
    with running_mesh(tmp_path_factory, "auditmesh", {"COPILOT_AUDIT_ON_TENANT_DELETE": "keep",
                                                      "COPILOT_ACCESS_LOG": "0"}) as running:
        yield running


@pytest.fixture
async def achannel(audit_mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(audit_mesh.edge) as ch:
        yield ch


def admin(mesh: RunningMesh, tenant: str, user: str = "ada") -> tuple[tuple[str, str]]:
    return mesh.auth(tenant, ("member", "admin"), user=user)


async def events(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str,
                 **filters: object) -> list[audit_pb2.AuditEvent]:
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    found: list[audit_pb2.AuditEvent] = []
    token = ""
    for _ in range(100):
        page = await stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(
            tenant_id=tenant, page_size=7, page_token=token, filter=audit_pb2.AuditFilter(**filters)),  # type: ignore[arg-type]
            metadata=mesh.operator(), timeout=10)
        found.extend(page.events)
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("too many pages")


async def settle(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str, expected: int,
                 rounds: int = 150) -> list[audit_pb2.AuditEvent]:
    """The tenant's events once `expected` of them arrived (they are written off the request
    path), then a little longer to see that no extra one comes."""
    got: list[audit_pb2.AuditEvent] = []
    for _ in range(rounds):
        got = await events(mesh, channel, tenant)
        if len(got) >= expected:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)
    return await events(mesh, channel, tenant)


def kinds(found: list[audit_pb2.AuditEvent]) -> Counter[str]:
    return Counter(audit_pb2.AuditEventKind.Name(e.kind).removeprefix("AUDIT_EVENT_KIND_") for e in found)


async def test_every_auditable_action_leaves_exactly_one_event(audit_mesh: RunningMesh,
                                                               achannel: grpc.aio.Channel) -> None:
    mesh = audit_mesh
    tenant = await create_tenant(mesh, achannel, plan=common_pb2.PLAN_PRO, prefix="aud")
    tenants = tenant_pb2_grpc.TenantServiceStub(achannel)
    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(achannel)
    generation = generation_pb2_grpc.GenerationServiceStub(achannel)

    ingested = await retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=DOCS),
                                               metadata=admin(mesh, tenant), timeout=30)
    answer = await generation.Answer(generation_pb2.AnswerRequest(
        question="How long do we keep KYC records? Reply to jane.doe@example.com"),
        metadata=mesh.auth(tenant, user="bob"), timeout=30)
    await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, config=tenant_pb2.TenantConfig(top_k=4)),
        update_mask=field_mask_pb2.FieldMask(paths=["config.top_k"])), metadata=admin(mesh, tenant), timeout=10)
    await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, plan=common_pb2.PLAN_ENTERPRISE),
        update_mask=field_mask_pb2.FieldMask(paths=["plan"])), metadata=mesh.operator(), timeout=10)
    await retrieval.ConfigureSearch(retrieval_pb2.ConfigureSearchRequest(default_top_k=6),
                                    metadata=admin(mesh, tenant), timeout=10)
    await retrieval.DeleteDocuments(retrieval_pb2.DeleteDocumentsRequest(document_ids=["sanctions", "nope"]),
                                    metadata=admin(mesh, tenant), timeout=10)
    # Refused by the metering service (the edge lets an admin call UpdateTenant): one event.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(tenant_id=tenant, plan=common_pb2.PLAN_FREE),
            update_mask=field_mask_pb2.FieldMask(paths=["plan"])), metadata=admin(mesh, tenant), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Out of tokens: generation refuses (RESOURCE_EXHAUSTED), once per question, each audited once.
    await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(tenant_id=tenant, limits=tenant_pb2.TenantLimits(tokens_per_month=1)),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.tokens_per_month"])), metadata=mesh.operator(),
        timeout=10)
    answered, exhausted = 1, 0
    for _ in range(30):
        try:
            await generation.Answer(generation_pb2.AnswerRequest(question="Who approves high-risk customers?"),
                                    metadata=mesh.auth(tenant, user="bob"), timeout=30)
            answered += 1
            await asyncio.sleep(0.3)  # the new limit reaches metering's tenant cache within its TTL
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            exhausted += 1
            if exhausted == 2:
                break
    assert exhausted == 2

    expected = {"TENANT_CREATED": 1, "DOCUMENTS_INGESTED": 1, "QUESTION": answered, "TENANT_UPDATED": 3,
                "SEARCH_CONFIGURED": 1, "DOCUMENTS_DELETED": 1, "REQUEST_REFUSED": 3}
    found = await settle(mesh, achannel, tenant, sum(expected.values()))
    assert kinds(found) == expected
    assert [e.seq for e in found] == list(range(1, len(found) + 1))
    assert all(e.tenant_id == tenant for e in found)

    by_kind = {audit_pb2.AuditEventKind.Name(e.kind): e for e in found}
    question = next(e for e in found if e.kind == K.AUDIT_EVENT_KIND_QUESTION)
    assert question.actor == "bob" and question.service == "generation"
    assert "jane.doe@example.com" not in question.question.question and "[EMAIL_1]" in question.question.question
    assert question.question.answer_sha256 == hashlib.sha256(answer.answer.encode()).hexdigest()
    assert [(c.document_id, c.chunk_id) for c in question.question.citations] == [
        (c.document_id, c.chunk_id) for c in answer.details.citations]
    assert question.question.provider == answer.details.provider and question.question.model == answer.details.model
    assert question.question.mode_used == answer.details.mode_used
    ingest = by_kind["AUDIT_EVENT_KIND_DOCUMENTS_INGESTED"]
    assert ingest.actor == "ada" and sorted((d.document_id, d.content_hash) for d in ingest.documents.documents) == \
        sorted((r.document_id, r.content_hash) for r in ingested.results)
    deleted = by_kind["AUDIT_EVENT_KIND_DOCUMENTS_DELETED"]
    assert [(d.document_id, d.content_hash) for d in deleted.documents.documents] == [
        (r.document_id, r.content_hash) for r in ingested.results if r.document_id == "sanctions"]
    assert deleted.documents.documents[0].content_hash
    assert list(deleted.documents.not_found) == ["nope"]
    updates = [e for e in found if e.kind == K.AUDIT_EVENT_KIND_TENANT_UPDATED]
    plan_change = next(e for e in updates if list(e.tenant_change.changed_fields) == ["plan"])
    assert plan_change.actor == "ops"
    assert (plan_change.tenant_change.before.plan, plan_change.tenant_change.after.plan) == (
        common_pb2.PLAN_PRO, common_pb2.PLAN_ENTERPRISE)
    top_k = next(e for e in updates if list(e.tenant_change.changed_fields) == ["config.top_k"])
    assert top_k.actor == "ada" and top_k.tenant_change.after.config.top_k == 4
    search = by_kind["AUDIT_EVENT_KIND_SEARCH_CONFIGURED"]
    assert search.search_config.after.default_top_k == 6
    refusals = [e.refusal for e in found if e.kind == K.AUDIT_EVENT_KIND_REQUEST_REFUSED]
    assert sorted((r.code, r.rpc) for r in refusals) == [
        ("PERMISSION_DENIED", "/copilot.v1.TenantService/UpdateTenant"),
        ("RESOURCE_EXHAUSTED", "/copilot.v1.GenerationService/Answer"),
        ("RESOURCE_EXHAUSTED", "/copilot.v1.GenerationService/Answer")]

    # Filters: by actor and kind, and the chain is intact.
    assert {e.actor for e in await events(mesh, achannel, tenant, actor="bob")} == {"bob"}
    only = await events(mesh, achannel, tenant, kinds=[K.AUDIT_EVENT_KIND_DOCUMENTS_DELETED])
    assert [e.kind for e in only] == [K.AUDIT_EVENT_KIND_DOCUMENTS_DELETED]
    verified = await audit_pb2_grpc.AuditServiceStub(achannel).VerifyAuditChain(
        audit_pb2.VerifyAuditChainRequest(tenant_id=tenant), metadata=admin(mesh, tenant), timeout=30)
    assert verified.ok and verified.events_checked == len(found) and verified.head_hash == found[-1].hash


async def test_one_tenant_never_reads_another_tenants_trail(audit_mesh: RunningMesh,
                                                            achannel: grpc.aio.Channel) -> None:
    mesh = audit_mesh
    mine = await create_tenant(mesh, achannel, prefix="audmine")
    theirs = await create_tenant(mesh, achannel, prefix="audtheirs")
    stub = audit_pb2_grpc.AuditServiceStub(achannel)
    calls: list[Callable[[Any], Awaitable[Any]]] = [
        lambda md: stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant_id=theirs), metadata=md, timeout=10),
        lambda md: stub.VerifyAuditChain(audit_pb2.VerifyAuditChainRequest(tenant_id=theirs), metadata=md,
                                         timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call(admin(mesh, mine))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        async for _ in stub.ExportAuditEvents(audit_pb2.ExportAuditEventsRequest(tenant_id=theirs),
                                              metadata=admin(mesh, mine), timeout=10):
            pass
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A member (not admin) is refused by the edge, even for its own trail.
    with pytest.raises(grpc.aio.AioRpcError) as member:
        await stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(), metadata=mesh.auth(mine), timeout=10)
    assert member.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nobody but a platform service writes a trail, operators included.
    for md in (admin(mesh, mine), mesh.operator()):
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await stub.RecordAuditEvents(audit_pb2.RecordAuditEventsRequest(events=[audit_pb2.AuditEvent(
                event_id="forged", kind=K.AUDIT_EVENT_KIND_QUESTION)]), metadata=md, timeout=10)
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The admin's own trail: its reads of the other tenant were refused and audited here, and
    # nothing of the other tenant is in it.
    own = await settle(mesh, achannel, mine, 4)
    assert all(e.tenant_id == mine for e in own)
    assert kinds(own) == {"TENANT_CREATED": 1, "REQUEST_REFUSED": 3}
    assert kinds(await events(mesh, achannel, theirs)) == {"TENANT_CREATED": 1}


async def test_events_written_while_metering_is_down_arrive_after_it_returns(audit_mesh: RunningMesh,
                                                                             achannel: grpc.aio.Channel) -> None:
    mesh = audit_mesh
    tenant = await create_tenant(mesh, achannel, plan=common_pb2.PLAN_ENTERPRISE, prefix="auddown")
    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(achannel)
    generation = generation_pb2_grpc.GenerationServiceStub(achannel)
    await retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=DOCS[:1]),
                                    metadata=admin(mesh, tenant), timeout=30)
    await generation.Answer(generation_pb2.AnswerRequest(question="How long are KYC records kept?"),
                            metadata=mesh.auth(tenant), timeout=30)
    await settle(mesh, achannel, tenant, 3)
    await asyncio.to_thread(mesh.mesh.kill, "metering")
    try:
        # Retrieval needs no metering. Answers need the tenant's config, which generation
        # caches for a second here: some may be answered (and audited), some refused.
        answered_down = 0
        for _ in range(3):
            try:
                await generation.Answer(generation_pb2.AnswerRequest(question="Who screens new customers?"),
                                        metadata=mesh.auth(tenant), timeout=5)
                answered_down += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        await retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=DOCS[1:]),
                                        metadata=admin(mesh, tenant), timeout=30)
        await retrieval.DeleteDocuments(retrieval_pb2.DeleteDocumentsRequest(document_ids=["kyc-policy"]),
                                        metadata=admin(mesh, tenant), timeout=30)
        outboxes = [mesh.settings.data_dir / "generation" / "audit-outbox",
                    mesh.settings.data_dir / "retrieval" / "audit-outbox"]
        waiting = 0
        for _ in range(50):
            # A file holds one event, or a group commit's several under "events".
            files = [json.loads(f.read_text()) for d in outboxes for f in d.glob("*.json")]
            waiting = sum(len(raw.get("events", [raw])) for raw in files)
            if waiting >= 2 + answered_down:
                break
            await asyncio.sleep(0.1)
        assert waiting == 2 + answered_down  # durable on disk, waiting for metering
    finally:
        await asyncio.to_thread(mesh.mesh.respawn, "metering")
    found = await settle(mesh, achannel, tenant, 3 + 2 + answered_down, rounds=300)
    assert kinds(found) == {"TENANT_CREATED": 1, "DOCUMENTS_INGESTED": 2, "DOCUMENTS_DELETED": 1,
                            "QUESTION": 1 + answered_down}
    assert [e.seq for e in found] == list(range(1, len(found) + 1))


async def test_an_event_whose_call_returned_ok_survives_a_crash_right_after(audit_mesh: RunningMesh,
                                                                             achannel: grpc.aio.Channel) -> None:
    """SIGKILL the service the moment its OK arrives: the event was durable in its outbox
    before the OK, so the restarted service delivers it (an fsync takes milliseconds here:
    without that wait the kill lands before it)."""
    mesh = audit_mesh
    tenant = await create_tenant(mesh, achannel, plan=common_pb2.PLAN_ENTERPRISE, prefix="audcrash")
    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(achannel)
    generation = generation_pb2_grpc.GenerationServiceStub(achannel)
    await retrieval.IngestDocuments(retrieval_pb2.IngestDocumentsRequest(documents=DOCS),
                                    metadata=admin(mesh, tenant), timeout=30)
    await settle(mesh, achannel, tenant, 2, rounds=100)

    stream = generation.StreamAnswer(generation_pb2.StreamAnswerRequest(question="How long are KYC records kept?"),
                                     metadata=mesh.auth(tenant), timeout=30)
    messages = [m async for m in stream]
    assert await stream.code() == grpc.StatusCode.OK and messages[-1].HasField("details")
    mesh.mesh.processes["generation"].kill()  # at once, from this thread: no graceful shutdown
    await asyncio.to_thread(mesh.mesh.kill, "generation")
    await asyncio.to_thread(mesh.mesh.respawn, "generation")

    await retrieval.DeleteDocuments(retrieval_pb2.DeleteDocumentsRequest(document_ids=["sanctions"]),
                                    metadata=admin(mesh, tenant), timeout=30)
    mesh.mesh.processes["retrieval"].kill()
    await asyncio.to_thread(mesh.mesh.kill, "retrieval")
    await asyncio.to_thread(mesh.mesh.respawn, "retrieval")

    found = await settle(mesh, achannel, tenant, 4, rounds=300)
    assert kinds(found) == {"TENANT_CREATED": 1, "DOCUMENTS_INGESTED": 1, "QUESTION": 1, "DOCUMENTS_DELETED": 1}
    assert [e.seq for e in found] == list(range(1, len(found) + 1))


def _copilot(mesh: RunningMesh, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COPILOT_EDGE": mesh.edge, "COPILOT_DATA_DIR": str(mesh.settings.data_dir)}
    return subprocess.run([sys.executable, "-m", "copilot_cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120)


async def _tenant_with_four_events(mesh: RunningMesh, channel: grpc.aio.Channel, prefix: str) -> str:
    """A new tenant whose trail holds its creation and three config changes (seq 1..4), stored."""
    tenant = await create_tenant(mesh, channel, prefix=prefix)
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    for top_k in (3, 4, 5):
        await tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(tenant_id=tenant, config=tenant_pb2.TenantConfig(top_k=top_k)),
            update_mask=field_mask_pb2.FieldMask(paths=["config.top_k"])), metadata=admin(mesh, tenant), timeout=10)
    await settle(mesh, channel, tenant, 4)
    return tenant


async def test_cli_lists_exports_and_verifies_and_finds_a_tampered_row(audit_mesh: RunningMesh,
                                                                       achannel: grpc.aio.Channel,
                                                                       tmp_path: Path) -> None:
    mesh = audit_mesh
    tenant = await _tenant_with_four_events(mesh, achannel, "audcli")

    listed = await asyncio.to_thread(_copilot, mesh, "audit", "list", "--tenant", tenant)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 4 and "tenant_updated" in listed.stdout
    out = tmp_path / "trail.jsonl"
    exported = await asyncio.to_thread(_copilot, mesh, "audit", "export", "--tenant", tenant, "--output", str(out),
                                       "--kind", "tenant_updated")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["seq"] for line in lines] == ["2", "3", "4"]
    assert all(line["kind"] == "AUDIT_EVENT_KIND_TENANT_UPDATED" and line["hash"] for line in lines)
    ok = await asyncio.to_thread(_copilot, mesh, "audit", "verify", "--tenant", tenant)
    assert ok.returncode == 0 and "intact, 4 events" in ok.stdout, ok.stdout + ok.stderr

    # Tamper with the store directly: stop metering (chDB holds its data directory), edit
    # seq 3 with chDB, start metering again.
    await asyncio.to_thread(mesh.mesh.kill, "metering")
    try:
        await asyncio.to_thread(_edit_row, mesh.settings.data_dir / "metering" / "chdb", tenant, 3)
    finally:
        await asyncio.to_thread(mesh.mesh.respawn, "metering")
    broken = await asyncio.to_thread(_copilot, mesh, "audit", "verify", "--tenant", tenant)
    assert broken.returncode == 1 and "BROKEN at seq 3 (hash_mismatch)" in broken.stdout, broken.stdout


def _edit_row(path: Path, tenant: str, seq: int) -> None:
    _store_sql(path, f"ALTER TABLE copilot.audit_events UPDATE actor = 'mallory' WHERE tenant_id = '{tenant}' "
                     f"AND seq = {seq} SETTINGS mutations_sync = 2")


def _store_sql(path: Path, sql: str) -> None:
    # A separate process: chDB allows one data directory per process.
    script = "import sys; from chdb import session; s = session.Session(sys.argv[1]); s.query(sys.argv[2]); s.close()"
    subprocess.run([sys.executable, "-c", script, str(path), sql], check=True, timeout=120)


async def test_a_removed_tail_is_reported_after_a_restart_and_against_an_expected_head(
        audit_mesh: RunningMesh, achannel: grpc.aio.Channel) -> None:
    mesh = audit_mesh
    tenant = await _tenant_with_four_events(mesh, achannel, "audtail")
    ok = await asyncio.to_thread(_copilot, mesh, "audit", "verify", "--tenant", tenant)
    assert ok.returncode == 0 and "intact, 4 events" in ok.stdout, ok.stdout + ok.stderr
    head = ok.stdout.split("head ", 1)[1].split()[0]  # "4:<sha256>", kept as an external witness
    assert head.startswith("4:") and f"--expect-head {head}" in ok.stdout

    chdb = mesh.settings.data_dir / "metering" / "chdb"
    # One removal per restart of metering (the store holds its directory): first the newest
    # event, then its head anchor as well.
    for anchor_removed, sql in ((False, f"DELETE FROM copilot.audit_events WHERE tenant_id = '{tenant}' AND seq = 4"),
                                (True, f"DELETE FROM copilot.audit_heads WHERE tenant_id = '{tenant}'")):
        await asyncio.to_thread(mesh.mesh.kill, "metering")
        try:
            await asyncio.to_thread(_store_sql, chdb, sql)
        finally:
            await asyncio.to_thread(mesh.mesh.respawn, "metering")
        verified = await asyncio.to_thread(_copilot, mesh, "audit", "verify", "--tenant", tenant)
        witnessed = await asyncio.to_thread(_copilot, mesh, "audit", "verify", "--tenant", tenant,
                                            "--expect-head", head)
        assert witnessed.returncode == 1 and "BROKEN at seq 4 (missing)" in witnessed.stdout, witnessed.stdout
        if not anchor_removed:
            assert verified.returncode == 1 and "BROKEN at seq 4 (missing): the chain ends at seq 3 but the head " \
                "anchor records seq 4: event 4 was removed" in verified.stdout, verified.stdout
        else:  # the store alone no longer knows; the user's witness does
            assert verified.returncode == 0 and "intact, 3 events" in verified.stdout, verified.stdout
            assert "the expected head records seq 4" in witnessed.stdout


async def test_tenant_deletion_keeps_or_erases_the_trail_as_configured(audit_mesh: RunningMesh,
                                                                       achannel: grpc.aio.Channel) -> None:
    mesh = audit_mesh
    tenants = tenant_pb2_grpc.TenantServiceStub(achannel)
    kept = await create_tenant(mesh, achannel, prefix="audkeep")
    await settle(mesh, achannel, kept, 1)
    await tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id=kept), metadata=mesh.operator(), timeout=30)
    trail = await settle(mesh, achannel, kept, 2)
    assert kinds(trail) == {"TENANT_CREATED": 1, "TENANT_DELETED": 1}
    assert trail[-1].tenant_change.before.tenant_id == kept and trail[-1].actor == "ops"

    mesh.mesh.extra_env["COPILOT_AUDIT_ON_TENANT_DELETE"] = "erase"
    await asyncio.to_thread(mesh.mesh.restart, "metering")
    try:
        erased = await create_tenant(mesh, achannel, prefix="auderase")
        await settle(mesh, achannel, erased, 1)
        await tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id=erased), metadata=mesh.operator(),
                                   timeout=30)
        assert await settle(mesh, achannel, erased, 0, rounds=1) == []
        # The deletion itself stays audited, in the operator's own (platform) trail.
        platform = await events(mesh, achannel, "platform", kinds=[K.AUDIT_EVENT_KIND_TENANT_DELETED])
        assert [e.tenant_change.before.tenant_id for e in platform] == [erased]
        assert kinds(await events(mesh, achannel, kept)) == {"TENANT_CREATED": 1, "TENANT_DELETED": 1}
    finally:
        mesh.mesh.extra_env["COPILOT_AUDIT_ON_TENANT_DELETE"] = "keep"
        await asyncio.to_thread(mesh.mesh.restart, "metering")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
async def test_the_audit_log_on_a_redis_stream_survives_a_crash_before_the_flush(tmp_path: Path) -> None:
    """REDIS_URL: the audit's durable log is a Redis Stream; acknowledged events that never
    reached ClickHouse are replayed by the next metering process, and the chain continues."""
    from datetime import UTC, datetime

    from servers.metering.audit.chain import NewEvent
    from servers.metering.audit.store import AUDIT_CODEC, AuditStore
    from servers.metering.storage.clickhouse import ChdbBackend
    from servers.metering.storage.log import RedisStreamLog
    from tests.integration.test_metering_redis import RedisServer

    def make() -> AuditStore:
        return AuditStore(ChdbBackend(tmp_path / "chdb"), RedisStreamLog(
            redis.url, stream="copilot:audit:log", group="audit", consumer="metering-test", codec=AUDIT_CODEC),
            owns_db=True, flush_interval_s=3600)

    def event(n: int) -> NewEvent:
        return NewEvent("acme", f"e{n}", "question", "alice", "member", "generation", datetime.now(UTC), "{}", 365)

    redis = RedisServer(tmp_path)
    redis.start()
    try:
        first = make()
        await first.open()
        assert await first.record([event(1), event(2)]) == (2, 0)
        await first.abandon()  # a crash: nothing flushed, nothing committed
        await first.log.close()
        await first.db.close()
        second = make()
        await second.open()
        try:
            assert await second.record([event(2), event(3)], check_stored=True) == (1, 1)
            rows = (await second.list_page("acme", after=0, limit=10)).rows
            assert [(r.seq, r.event_id) for r in rows] == [(1, "e1"), (2, "e2"), (3, "e3")]
            assert (await second.verify("acme")).ok
        finally:
            await second.close()
    finally:
        redis.stop()
