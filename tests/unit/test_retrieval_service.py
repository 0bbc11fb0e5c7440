"""RetrievalService over a real grpc.aio server with the identity interceptor, called with
the metadata Envoy sets after verifying a token."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2

from copilot.v1 import retrieval_pb2 as pb
from copilot.v1 import retrieval_pb2_grpc as pb_grpc
from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common import identity
from servers.common.channels import CLIENT_OPTIONS, SERVER_OPTIONS
from servers.common.errors import NotFound, PermissionDenied, from_rpc_error
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.lifecycle import connect
from servers.common.settings import Settings
from servers.retrieval.config import RetrievalConfig
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.server import SERVICE_NAME, build, tenants_dir
from servers.retrieval.service import RetrievalServiceServicer
from servers.retrieval.stores.sqlite import SqliteFtsStore
from servers.retrieval.tenants import TenantRegistry


def who(tenant: str | None, roles: str = "member", user: str = "u1") -> tuple[tuple[str, str], ...]:
    headers = [("x-user-id", user), ("x-roles", roles)]
    if tenant is not None:
        headers.append(("x-tenant-id", tenant))
    return tuple(headers)


ADMIN_A = who("tenant-a", "admin")
MEMBER_A = who("tenant-a", "member")
INGEST_B = who("tenant-b", "member,ingest")
MEMBER_B = who("tenant-b")


@dataclasses.dataclass
class Rig:
    stub: pb_grpc.RetrievalServiceAsyncStub
    store: SqliteFtsStore


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = SqliteFtsStore(tmp_path / "tenants")
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)], options=SERVER_OPTIONS)
    pb_grpc.add_RetrievalServiceServicer_to_server(RetrievalServiceServicer(RetrievalEngine(store)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
    try:
        yield Rig(pb_grpc.RetrievalServiceStub(channel), store)
    finally:
        await channel.close(None)
        await server.stop(None)
        await store.close()


def document(doc_id: str, text: str, **kw: Any) -> pb.Document:
    return pb.Document(document_id=doc_id, text=text, **kw)


async def expect_error(call: Any, code: grpc.StatusCode) -> tuple[str, list[object]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    got, message, details = from_rpc_error(info.value)
    assert got == code, message
    return message, details


def violations(details: list[object]) -> list[str]:
    return [v.field for d in details if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations]


async def test_ingest_search_delete_round_trip(rig: Rig) -> None:
    response = await rig.stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[
        document("kyc", "# KYC\n\n## Reporting\n\nFirms must file reports of suspicious activity.",
                 title="KYC manual", source="kyc.md", metadata={"team": "aml"}, content_type="text/markdown"),
        document("blank", "   "),
    ]), metadata=ADMIN_A)
    assert [(r.document_id, r.status, r.chunks) for r in response.results] == [
        ("kyc", pb.INGEST_STATUS_CREATED, 1), ("blank", pb.INGEST_STATUS_EMPTY, 0)]
    again = await rig.stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[
        document("kyc", "# KYC\n\n## Reporting\n\nFirms must file reports of suspicious activity.",
                 title="KYC manual", source="kyc.md", metadata={"team": "aml"}, content_type="text/markdown"),
    ]), metadata=ADMIN_A)
    assert again.results[0].status == pb.INGEST_STATUS_UNCHANGED
    assert again.results[0].content_hash == response.results[0].content_hash

    found = await rig.stub.Search(pb.SearchRequest(query="reporting obligations", filters={"team": "aml"}),
                                  metadata=MEMBER_A)
    assert found.mode == pb.SEARCH_MODE_BM25
    hit = found.hits[0]
    assert (hit.document_id, hit.chunk_id, hit.title, hit.section, hit.source) == (
        "kyc", "kyc#0", "KYC manual", "KYC > Reporting", "kyc.md")
    assert hit.text == "Firms must file reports of suspicious activity."
    assert dict(hit.metadata) == {"team": "aml"} and hit.score > 0

    for mode in (pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID):
        honest = await rig.stub.Search(pb.SearchRequest(query="reports", mode=mode, alpha=0.4), metadata=MEMBER_A)
        assert honest.mode == pb.SEARCH_MODE_BM25 and honest.hits

    deleted = await rig.stub.DeleteDocuments(pb.DeleteDocumentsRequest(document_ids=["kyc", "nope"]),
                                             metadata=ADMIN_A)
    assert (deleted.deleted_documents, deleted.deleted_chunks, list(deleted.not_found)) == (1, 1, ["nope"])
    assert not (await rig.stub.Search(pb.SearchRequest(query="reports"), metadata=MEMBER_A)).hits


async def test_stream_ingest_acknowledges_each_batch_in_order(rig: Rig) -> None:
    batches = [[document(f"d{b}-{i}", f"Batch {b} item {i} about leverage.") for i in range(n)]
               for b, n in enumerate([2, 3, 1])]

    async def requests() -> AsyncIterator[pb.StreamIngestDocumentsRequest]:
        for batch in batches:
            yield pb.StreamIngestDocumentsRequest(documents=batch)

    responses = [r async for r in rig.stub.StreamIngestDocuments(requests(), metadata=INGEST_B)]
    assert [r.documents_done for r in responses] == [2, 5, 6]
    assert [[x.document_id for x in r.results] for r in responses] == [
        [d.document_id for d in batch] for batch in batches]
    assert all(x.status == pb.INGEST_STATUS_CREATED for r in responses for x in r.results)
    hits = (await rig.stub.Search(pb.SearchRequest(query="leverage", top_k=10), metadata=MEMBER_B)).hits
    assert len(hits) == 6


async def test_stream_ingest_rejects_a_bad_batch_after_acknowledging_earlier_ones(rig: Rig) -> None:
    async def requests() -> AsyncIterator[pb.StreamIngestDocumentsRequest]:
        yield pb.StreamIngestDocumentsRequest(documents=[document("ok", "Fine text.")])
        yield pb.StreamIngestDocumentsRequest(documents=[document("", "No id.")])

    call = rig.stub.StreamIngestDocuments(requests(), metadata=ADMIN_A)
    first = cast(pb.StreamIngestDocumentsResponse, await call.read())
    assert first.documents_done == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[0].document_id" in (info.value.details() or "")
    assert "stream batch 1" in (info.value.details() or "")


async def test_tenants_never_see_each_other(rig: Rig) -> None:
    await rig.stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[
        document("same", "Tenant A confidential margin policy.")]), metadata=ADMIN_A)
    await rig.stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[
        document("same", "Tenant B confidential margin policy.")]), metadata=INGEST_B)

    async def search(headers: tuple[tuple[str, str], ...], own: str) -> None:
        response = await rig.stub.Search(pb.SearchRequest(query="confidential margin policy"), metadata=headers)
        assert [h.text for h in response.hits] == [f"Tenant {own} confidential margin policy."]

    await asyncio.gather(*(search(MEMBER_A, "A") if i % 2 else search(MEMBER_B, "B") for i in range(100)))


async def test_identity_is_required_and_roles_enforced(rig: Rig) -> None:
    await expect_error(rig.stub.Search(pb.SearchRequest(query="x"), metadata=who(None)),
                       grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(rig.stub.Search(pb.SearchRequest(query="x")), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(rig.stub.Search(pb.SearchRequest(query="x"), metadata=who("../etc")),
                       grpc.StatusCode.UNAUTHENTICATED)
    ingest = pb.IngestDocumentsRequest(documents=[document("d", "Some rule text.")])
    message, details = await expect_error(rig.stub.IngestDocuments(ingest, metadata=MEMBER_A),
                                          grpc.StatusCode.PERMISSION_DENIED)
    assert "admin" in message and any(isinstance(d, error_details_pb2.ErrorInfo) for d in details)
    await expect_error(rig.stub.DeleteDocuments(pb.DeleteDocumentsRequest(document_ids=["d"]), metadata=MEMBER_A),
                       grpc.StatusCode.PERMISSION_DENIED)

    async def one() -> AsyncIterator[pb.StreamIngestDocumentsRequest]:
        yield pb.StreamIngestDocumentsRequest(documents=[document("d", "text")])

    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [r async for r in rig.stub.StreamIngestDocuments(one(), metadata=MEMBER_A)]
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was written for the refused caller.
    assert not rig.store.path("tenant-a").exists()
    # Operators hold every role.
    ok = await rig.stub.IngestDocuments(ingest, metadata=who("tenant-a", "operator"))
    assert ok.results[0].status == pb.INGEST_STATUS_CREATED


BAD_SEARCHES: list[tuple[pb.SearchRequest, str]] = [
    (pb.SearchRequest(query=""), "query"),
    (pb.SearchRequest(query=" \t\n"), "query"),
    (pb.SearchRequest(query="x" * 2001), "query"),
    (pb.SearchRequest(query="ok", top_k=-1), "top_k"),
    (pb.SearchRequest(query="ok", top_k=101), "top_k"),
    (pb.SearchRequest(query="ok", top_k=10_000), "top_k"),
    (pb.SearchRequest(query="ok", mode=7), "mode"),  # type: ignore[arg-type]
    (pb.SearchRequest(query="ok", alpha=1.5), "alpha"),
    (pb.SearchRequest(query="ok", filters={"": "x"}), "filters"),
    (pb.SearchRequest(query="ok", filters={f"k{i}": "v" for i in range(17)}), "filters"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_SEARCHES)
async def test_bad_searches_are_invalid_argument(rig: Rig, request_: pb.SearchRequest, field: str) -> None:
    message, details = await expect_error(rig.stub.Search(request_, metadata=MEMBER_A),
                                          grpc.StatusCode.INVALID_ARGUMENT)
    assert message.startswith(field)
    assert violations(details)[0] == field


async def test_search_accepts_limits(rig: Rig) -> None:
    for request in (pb.SearchRequest(query="x" * 2000, top_k=100), pb.SearchRequest(query="ok", top_k=0),
                    pb.SearchRequest(query='"NEAR( AND * -x', alpha=0.0)):
        await rig.stub.Search(request, metadata=MEMBER_A)


BAD_DOCUMENTS: list[tuple[list[pb.Document], str]] = [
    ([document("", "text")], "documents[0].document_id"),
    ([document("   ", "text")], "documents[0].document_id"),
    ([document("x" * 257, "text")], "documents[0].document_id"),
    ([document("a\nb", "text")], "documents[0].document_id"),
    ([document("ok", "text"), document("big", "é" * (512 * 1024 + 1))], "documents[1].text"),
    ([document("a", "t"), document("a", "t")], "documents[1].document_id"),
    ([document("a", "t", content_type="application/pdf")], "documents[0].content_type"),
    ([document("a", "t", metadata={"source": "x"})], "documents[0].metadata['source']"),
    ([document("a", "t", title="t" * 2001)], "documents[0].title"),
    ([document(f"d{i}", "t") for i in range(1001)], "documents"),
]


@pytest.mark.parametrize(("documents", "field"), BAD_DOCUMENTS)
async def test_bad_ingests_are_invalid_argument(rig: Rig, documents: list[pb.Document], field: str) -> None:
    message, details = await expect_error(
        rig.stub.IngestDocuments(pb.IngestDocumentsRequest(documents=documents), metadata=ADMIN_A),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(details)[0] == field
    assert message.startswith(field)
    assert not rig.store.path("tenant-a").exists()  # nothing of a rejected batch is written


async def test_boundary_sizes_are_accepted(rig: Rig) -> None:
    documents = [document("x" * 256, "y" * (1024 * 1024)),
                 document("ok", "A rule.", content_type="text/markdown; charset=utf-8")]
    response = await rig.stub.IngestDocuments(pb.IngestDocumentsRequest(documents=documents), metadata=ADMIN_A)
    assert [r.status for r in response.results] == [pb.INGEST_STATUS_CREATED] * 2


async def test_all_violations_of_a_batch_are_reported(rig: Rig) -> None:
    documents = [document("", "a"), document("ok", "b"), document("y" * 300, "c")]
    message, details = await expect_error(
        rig.stub.IngestDocuments(pb.IngestDocumentsRequest(documents=documents), metadata=ADMIN_A),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(details) == ["documents[0].document_id", "documents[2].document_id"]
    assert "and 1 more problem" in message


@pytest.mark.parametrize(("ids", "field"), [([], "document_ids"), ([""], "document_ids[0]"),
                                            (["ok", "z" * 257], "document_ids[1]"),
                                            ([f"d{i}" for i in range(1001)], "document_ids")])
async def test_bad_deletes_are_invalid_argument(rig: Rig, ids: list[str], field: str) -> None:
    _, details = await expect_error(
        rig.stub.DeleteDocuments(pb.DeleteDocumentsRequest(document_ids=ids), metadata=ADMIN_A),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(details)[0] == field


async def test_build_wires_the_service(tmp_path: Path) -> None:
    settings = dataclasses.replace(Settings.from_env(), data_dir=tmp_path, retrieval_port=0)
    service = build(settings, RetrievalConfig(max_open_tenants=4, workers=1, embedder="hash"))
    assert service.name == "retrieval"
    assert service.service_names == [SERVICE_NAME] == ["copilot.v1.RetrievalService"]
    assert service.identity_required
    check = service.dependencies["data_dir_writable"]
    for start in service.on_start:
        await start()
    assert await service.dependencies["embedder_ready"]()
    assert await check()
    assert tenants_dir(settings).is_dir()
    server = grpc.aio.server()
    service.register(server)
    for stop in service.on_stop:
        await stop()
    assert not await check()


async def test_health_fails_when_data_dir_is_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    settings = dataclasses.replace(Settings.from_env(), data_dir=blocker)
    service = build(settings, RetrievalConfig(workers=1, embedder="none"))
    check = service.dependencies["data_dir_writable"]
    assert not await check()
    for stop in service.on_stop:
        await stop()


def test_config_from_env() -> None:
    config = RetrievalConfig.from_env({"COPILOT_RETRIEVAL_MAX_OPEN_TENANTS": "10",
                                       "COPILOT_RETRIEVAL_WORKERS": "3", "COPILOT_RETRIEVAL_DEFAULT_TOP_K": "5"})
    assert (config.max_open_tenants, config.workers, config.default_top_k) == (10, 3, 5)
    with pytest.raises(ValueError, match="COPILOT_RETRIEVAL_DEFAULT_TOP_K"):
        RetrievalConfig.from_env({"COPILOT_RETRIEVAL_DEFAULT_TOP_K": "500"})
    with pytest.raises(ValueError, match="integer"):
        RetrievalConfig.from_env({"COPILOT_RETRIEVAL_WORKERS": "many"})


async def test_provision_and_erase_need_the_service_role(tmp_path: Path) -> None:
    from servers.common import identity

    store = SqliteFtsStore(tmp_path)
    servicer = RetrievalServiceServicer(RetrievalEngine(store))
    admin = identity.Identity("erase-me", "alice", frozenset({"admin"}))
    service = identity.Identity("erase-me", "service:metering", frozenset({identity.SERVICE}))
    try:
        with identity.acting_as(admin), pytest.raises(PermissionDenied):
            await servicer.EraseTenant(pb.EraseTenantRequest(), None)  # type: ignore[arg-type]
        with identity.acting_as(service):
            await servicer.ProvisionTenant(pb.ProvisionTenantRequest(), None)  # type: ignore[arg-type]
            assert store.path("erase-me").exists()
            await servicer.EraseTenant(pb.EraseTenantRequest(), None)  # type: ignore[arg-type]
        assert not any(f.exists() for f in store.files("erase-me"))
    finally:
        await store.close()


class Registry(tenant_pb2_grpc.TenantServiceServicer):
    """Metering's tenant registry, as retrieval asks it: GetTenant of the caller's own tenant."""

    def __init__(self, tenants: set[str]) -> None:
        self.tenants = tenants
        self.asked: list[str] = []

    async def GetTenant(self, request: tenant_pb2.GetTenantRequest,
                        context: grpc.aio.ServicerContext) -> tenant_pb2.GetTenantResponse:
        caller = identity.current()
        self.asked.append(caller.tenant_id)
        if caller.tenant_id not in self.tenants:
            raise NotFound(f"tenant {caller.tenant_id} not found")
        return tenant_pb2.GetTenantResponse(tenant=tenant_pb2.Tenant(tenant_id=caller.tenant_id))


async def test_nothing_is_stored_for_a_tenant_the_registry_does_not_know(tmp_path: Path) -> None:
    registry = Registry({"tenant-a"})
    metering = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(registry, metering)
    metering_port = metering.add_insecure_port("127.0.0.1:0")
    await metering.start()
    store = SqliteFtsStore(tmp_path / "tenants")
    to_metering = connect(f"127.0.0.1:{metering_port}")
    servicer = RetrievalServiceServicer(RetrievalEngine(store), registry=TenantRegistry.over(to_metering, 60))
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)], options=SERVER_OPTIONS)
    pb_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
    stub = pb_grpc.RetrievalServiceStub(channel)
    docs = pb.IngestDocumentsRequest(documents=[document("p", "Two signatures are needed.")])
    try:
        for caller in (who("ghost", "admin"), who("ghost", "member")):  # refused before the role is checked
            message, _ = await expect_error(stub.IngestDocuments(docs, metadata=caller),
                                            grpc.StatusCode.FAILED_PRECONDITION)
            assert "tenant ghost does not exist" in message
        await expect_error(stub.ConfigureSearch(pb.ConfigureSearchRequest(default_top_k=3),
                                                metadata=who("ghost", "admin")), grpc.StatusCode.FAILED_PRECONDITION)
        await expect_error(stub.DeleteDocuments(pb.DeleteDocumentsRequest(document_ids=["p"]),
                                                metadata=who("ghost", "admin")), grpc.StatusCode.FAILED_PRECONDITION)
        assert not list((tmp_path / "tenants").glob("ghost*"))
        # A registered tenant: asked once, then remembered.
        for _ in range(2):
            await stub.IngestDocuments(docs, metadata=ADMIN_A)
        assert registry.asked.count("tenant-a") == 1
        # A tenant provisioned here (by metering's onboarding) needs no question at all.
        onboarding = who("tenant-b", "service", user="service:metering")
        await stub.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=onboarding)
        await stub.IngestDocuments(docs, metadata=who("tenant-b", "admin"))
        assert "tenant-b" not in registry.asked
        # Erased: forgotten, so the registry is asked again (and no longer knows it).
        await stub.EraseTenant(pb.EraseTenantRequest(), metadata=onboarding)
        await expect_error(stub.IngestDocuments(docs, metadata=who("tenant-b", "admin")),
                           grpc.StatusCode.FAILED_PRECONDITION)
    finally:
        await channel.close(None)
        await server.stop(None)
        await to_metering.close(None)
        await metering.stop(None)
        await store.close()
