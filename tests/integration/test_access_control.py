"""Document access control through the real edge (Envoy + the four services): the groups
come only from the verified token's claim, a forged x-groups header is ignored, a group
removed (a new token) applies at once, a restricted best match is neither returned nor cited
in an answer (every retrieval mode, streaming too), a result cache warmed by a privileged
caller is not served to an unprivileged one, relabelling needs admin and applies on the next
request, and the answer's audit event counts what was withheld."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from copilot.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration

SECRET = "Quarterly misconduct investigation: the misconduct investigation of the trading desk found breaches."
DOCS = [
    retrieval_pb2.Document(document_id="investigation", title="Misconduct investigation", text=SECRET,
                           access=["group:hr", "user:dana"]),
    retrieval_pb2.Document(document_id="policy", title="Misconduct policy",
                           text="The misconduct policy explains how staff report concerns to compliance."),
    retrieval_pb2.Document(document_id="handbook", title="Handbook",
                           text="An investigation follows every report made under the staff handbook."),
]
QUERY = "misconduct investigation"


def groups(mesh: RunningMesh, tenant: str, *names: str, user: str = "bob",
           roles: tuple[str, ...] = ("member",)) -> tuple[tuple[str, str], ...]:
    """A caller's metadata: a token whose groups claim lists `names` (no claim when none)."""
    extra = {mesh.settings.groups_claim: list(names)} if names else None
    return mesh.auth(tenant, roles, user=user, extra=extra)


async def hit_ids(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], mode: int = 0,
                  top_k: int = 2) -> list[str]:
    response = await retrieval_pb2_grpc.RetrievalServiceStub(channel).Search(
        retrieval_pb2.SearchRequest(query=QUERY, top_k=top_k, mode=mode),  # type: ignore[arg-type]
        metadata=metadata, timeout=10)
    return [hit.document_id for hit in response.hits]


async def test_groups_come_only_from_the_verified_claim(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, documents=DOCS, prefix="acl")
    nobody = groups(mesh, tenant)
    # No groups claim: only unrestricted documents, and they fill every place.
    assert sorted(await hit_ids(channel, nobody)) == ["handbook", "policy"]
    # A client's own x-groups (and the internal marker) are stripped by the edge.
    forged = (*nobody, ("x-groups", "hr"), ("x-copilot-internal", "1"))
    call = retrieval_pb2_grpc.RetrievalServiceStub(channel).Search(
        retrieval_pb2.SearchRequest(query=QUERY, top_k=2), metadata=forged, timeout=10)
    response = await call
    assert "investigation" not in [h.document_id for h in response.hits]
    assert all(key != "x-copilot-withheld" for key, _ in (await call.trailing_metadata()) or ())
    # The group in a verified token: the best match comes first, labels shown.
    for mode in (retrieval_pb2.SEARCH_MODE_BM25, retrieval_pb2.SEARCH_MODE_DENSE, retrieval_pb2.SEARCH_MODE_HYBRID):
        assert (await hit_ids(channel, groups(mesh, tenant, "hr"), mode))[0] == "investigation"
        assert "investigation" not in await hit_ids(channel, nobody, mode)
    # The user the label names, without the group.
    assert (await hit_ids(channel, groups(mesh, tenant, user="dana")))[0] == "investigation"
    # Group removed: the next token, at once (its results were cached for the other view).
    assert "investigation" not in await hit_ids(channel, groups(mesh, tenant, "sales"))


async def test_cache_warmed_by_a_privileged_caller_is_not_served(mesh: RunningMesh,
                                                                 channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, documents=DOCS, prefix="aclc")
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    request = retrieval_pb2.SearchRequest(query=QUERY, top_k=2)
    first = await stub.Search(request, metadata=groups(mesh, tenant, "hr"), timeout=10)
    again = await stub.Search(request, metadata=groups(mesh, tenant, "hr"), timeout=10)
    assert first.hits[0].document_id == "investigation" and again.cached
    other = await stub.Search(request, metadata=groups(mesh, tenant), timeout=10)
    assert not other.cached and "investigation" not in [h.document_id for h in other.hits]


async def test_relabelling_needs_admin_and_applies_on_the_next_request(mesh: RunningMesh,
                                                                       channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, documents=DOCS, prefix="aclr")
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    nobody = groups(mesh, tenant)
    assert "investigation" not in await hit_ids(channel, nobody)  # warms the cache
    opening = retrieval_pb2.SetDocumentAccessRequest(documents=[
        retrieval_pb2.DocumentAccess(document_id="investigation", access=[])])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SetDocumentAccess(opening, metadata=nobody, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as ingest_only:
        await stub.SetDocumentAccess(opening, metadata=groups(mesh, tenant, roles=("ingest",)), timeout=10)
    assert ingest_only.value.code() == grpc.StatusCode.PERMISSION_DENIED
    done = await stub.SetDocumentAccess(opening, metadata=groups(mesh, tenant, roles=("member", "admin")), timeout=10)
    assert done.updated == 1
    assert (await hit_ids(channel, nobody))[0] == "investigation"
    bad = retrieval_pb2.SetDocumentAccessRequest(documents=[
        retrieval_pb2.DocumentAccess(document_id="investigation", access=["hr"])])
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.SetDocumentAccess(bad, metadata=groups(mesh, tenant, roles=("member", "admin")), timeout=10)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_answers_never_cite_a_withheld_document_and_audit_the_count(mesh: RunningMesh,
                                                                          channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, documents=DOCS, prefix="acla", plan=common_pb2.PLAN_ENTERPRISE)
    generation = generation_pb2_grpc.GenerationServiceStub(channel)
    nobody = groups(mesh, tenant)
    question = "What did the misconduct investigation find?"
    for mode in (common_pb2.RETRIEVAL_MODE_BASIC, common_pb2.RETRIEVAL_MODE_HYBRID,
                 common_pb2.RETRIEVAL_MODE_DECOMPOSED, common_pb2.RETRIEVAL_MODE_AGENTIC):
        answer = await generation.Answer(generation_pb2.AnswerRequest(question=question, top_k=2, mode=mode),
                                         metadata=nobody, timeout=30)
        assert "investigation" not in [c.document_id for c in answer.details.citations]
        assert "breaches" not in answer.answer
        text: list[str] = []
        async for event in generation.StreamAnswer(generation_pb2.StreamAnswerRequest(
                question=question, top_k=2, mode=mode), metadata=nobody, timeout=30):
            if event.HasField("details"):
                assert "investigation" not in [c.document_id for c in event.details.citations]
            else:
                text.append(event.delta)
        assert "breaches" not in "".join(text)
    privileged = await generation.Answer(generation_pb2.AnswerRequest(
        question=question, top_k=2, mode=common_pb2.RETRIEVAL_MODE_BASIC),
        metadata=groups(mesh, tenant, "hr", user="carol"), timeout=30)
    assert "investigation" in [c.document_id for c in privileged.details.citations]
    # The citation says who may read what it cites.
    cited = {c.document_id: list(c.access) for c in privileged.details.citations}
    assert sorted(cited["investigation"]) == ["group:hr", "user:dana"], cited

    # The audit trail: every one of bob's answers withheld the investigation, hr's none.
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    admin = groups(mesh, tenant, roles=("member", "admin"), user="admin")
    questions: list[audit_pb2.AuditEvent] = []
    for _ in range(100):  # written off the request path: up to ~10 s
        page = await audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(
            page_size=100, filter=audit_pb2.AuditFilter(kinds=[audit_pb2.AUDIT_EVENT_KIND_QUESTION])),
            metadata=admin, timeout=10)
        questions = list(page.events)
        if len(questions) >= 9:
            break
        await asyncio.sleep(0.1)
    assert len(questions) == 9
    by_actor: dict[str, list[int]] = {}
    for recorded in questions:
        by_actor.setdefault(recorded.actor, []).append(recorded.question.withheld_documents)
    assert len(by_actor["bob"]) == 8 and all(count >= 1 for count in by_actor["bob"]), by_actor
    assert by_actor["carol"] == [0]
