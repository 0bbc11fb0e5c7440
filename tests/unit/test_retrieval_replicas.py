"""Retrieval replicas over ONE data directory (docs/retrieval-replicas.md): two stores and
engines on the same tenant files, each with its own connections, in-memory indexes and
caches, must answer as one process would, whatever the other wrote a moment before.

Two `SqliteFtsStore`s in one process hold separate SQLite connections, as two processes do
(tests/integration/test_retrieval_replicas_processes.py runs real processes)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from copilot.v1 import retrieval_pb2 as pb
from copilot.v1 import retrieval_pb2_grpc as pb_grpc
from copilot.v1 import tenant_pb2_grpc
from servers.common.channels import CLIENT_OPTIONS, SERVER_OPTIONS
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.settings import Settings
from servers.retrieval.config import RetrievalConfig
from servers.retrieval.embedders import HashEmbedder
from servers.retrieval.engine import SETTING_MODE, SETTING_TOP_K, RetrievalEngine, TenantDefaults
from servers.retrieval.models import DocumentInput, SearchMode, SearchQuery, SearchResult
from servers.retrieval.server import audit_outbox_dir, build
from servers.retrieval.stores.sqlite import _SCHEMA_V1, _SCHEMA_V2, SqliteFtsStore
from tests.unit.test_retrieval_service import Registry, document, expect_error, who

T = "tenant-a"
MODES = list(SearchMode)


def doc(doc_id: str, text: str) -> DocumentInput:
    return DocumentInput(document_id=doc_id, title=doc_id.title(), text=text)


@dataclasses.dataclass
class Replica:
    store: SqliteFtsStore
    engine: RetrievalEngine

    async def search(self, text: str, mode: SearchMode | None = None, top_k: int = 0) -> SearchResult:
        return await self.engine.search(T, SearchQuery(text, mode=mode, top_k=top_k))

    async def ids(self, text: str, mode: SearchMode | None = None) -> list[str]:
        return [hit.document_id for hit in (await self.search(text, mode)).hits]

    async def top(self, text: str, mode: SearchMode | None = None) -> str | None:
        """The best hit's document (dense search ranks every chunk, relevant or not)."""
        return next(iter(await self.ids(text, mode)), None)


def replica(root: Path, settle: float = 0) -> Replica:
    store = SqliteFtsStore(root, max_open_tenants=8, workers=2, lexical_settle_seconds=settle)
    return Replica(store, RetrievalEngine(store, embedder=HashEmbedder(), shared=True))


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Replica, Replica]]:
    a, b = replica(tmp_path / "tenants"), replica(tmp_path / "tenants")
    yield a, b
    await a.engine.close()
    await b.engine.close()


CORPUS = [doc("gifts", "Gifts above fifty euros must be declared to compliance."),
          doc("travel", "Business travel is booked through the travel desk.")]


async def test_a_write_on_one_replica_is_found_on_the_other_in_every_mode(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    await a.engine.ingest(T, CORPUS)
    # B warms everything it holds: its connection, in-memory BM25 and vectors, results cache.
    for mode in MODES:
        assert "sanctions" not in await b.ids("sanctions screening of new clients", mode)
        assert await b.top("declare gifts", mode) == "gifts"
        assert (await b.search("declare gifts", mode)).cached
    assert sorted(await b.store.lexical_tenants()) == [T] and sorted(await b.store.dense_tenants()) == [T]

    await a.engine.ingest(T, [doc("sanctions", "Sanctions screening runs for every new client.")])
    for mode in MODES:
        result = await b.search("sanctions screening of new clients", mode)
        assert not result.cached and result.hits[0].document_id == "sanctions", mode
        # Unrelated entries are not served from before the write either.
        assert not (await b.search("declare gifts", mode)).cached
    # And A, which wrote, agrees with B hit for hit.
    for mode in MODES:
        assert [h.chunk_id for h in (await a.search("screening gifts travel", mode)).hits] == \
               [h.chunk_id for h in (await b.search("screening gifts travel", mode)).hits]


async def test_a_delete_on_one_replica_is_gone_on_the_other(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    await a.engine.ingest(T, CORPUS)
    for mode in MODES:
        assert "gifts" in await b.ids("declare gifts", mode)
    assert (await a.engine.delete(T, ["gifts"])).deleted_documents == 1
    for mode in MODES:
        assert "gifts" not in await b.ids("declare gifts", mode), mode
    # Replaced content too: the old text is not found, the new is.
    await a.engine.ingest(T, [doc("travel", "Business trips need a manager's approval.")])
    assert await b.ids("desk", SearchMode.BM25) == []  # the title stays "Travel"
    assert await b.ids("manager approval", SearchMode.BM25) == ["travel"]


async def test_search_settings_put_on_one_replica_apply_on_the_other(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    await a.engine.ingest(T, CORPUS)
    first = await b.search("gifts travel")
    assert first.mode is SearchMode.HYBRID and len(first.hits) == 2
    assert (await b.engine.defaults(T)).top_k is None
    await a.engine.configure(T, {SETTING_MODE: SearchMode.BM25.value, SETTING_TOP_K: "1"})
    after = await b.search("gifts travel")
    assert after.mode is SearchMode.BM25 and len(after.hits) == 1 and not after.cached
    assert (await b.engine.defaults(T)).top_k == 1
    await b.engine.configure(T, {SETTING_MODE: None, SETTING_TOP_K: None})
    assert (await a.search("gifts travel")).mode is SearchMode.HYBRID


async def test_a_tenant_erased_on_one_replica_is_gone_everywhere(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    await a.engine.ingest(T, CORPUS)
    await a.engine.configure(T, {SETTING_TOP_K: "1"})
    for mode in MODES:
        assert await b.top("declare gifts", mode) == "gifts"
    assert T in await b.store.open_tenants()

    await a.engine.erase(T)
    assert not any(f.exists() for f in a.store.files(T))
    for mode in MODES:
        assert await b.ids("declare gifts", mode) == [], mode
    assert (await b.engine.defaults(T)).top_k is None
    # B let go of the unlinked file and of everything it had derived from it.
    assert T not in await b.store.open_tenants()
    assert not any(key[0] == T for key in b.engine.results.snapshot())
    assert not any(f.exists() for f in b.store.files(T))  # the read created nothing


async def test_a_tenant_re_provisioned_after_an_erase_starts_empty_on_every_replica(
        pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    await b.engine.ingest(T, CORPUS)
    await b.engine.configure(T, {SETTING_TOP_K: "1"})
    for mode in MODES:
        assert await b.top("declare gifts", mode) == "gifts"
        assert await a.top("declare gifts", mode) == "gifts"
    # Erased on A and re-created on A before B looks again: B still holds the old file open.
    await a.engine.erase(T)
    await a.engine.provision(T)
    for replica_ in (b, a):
        for mode in MODES:
            assert await replica_.ids("declare gifts", mode) == [], mode
        assert await replica_.engine.defaults(T) == TenantDefaults()
    # Re-provisioned on B after an erase on A: B writes the new file, A sees it, not the old one.
    await a.engine.erase(T)
    await b.engine.provision(T)
    await b.engine.ingest(T, [doc("fresh", "A fresh start for the travel policy.")])
    for mode in MODES:
        assert await a.ids("travel", mode) == ["fresh"]
        assert await b.ids("travel", mode) == ["fresh"]


async def test_a_stale_connection_closing_leaves_the_new_file_intact(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    await b.engine.ingest(T, CORPUS)
    assert await b.ids("declare gifts", SearchMode.BM25) == ["gifts"]
    await a.engine.erase(T)
    await a.engine.ingest(T, [doc("fresh", "New gifts rules.")])
    # B closes its connection to the unlinked file (SQLite must not checkpoint into, or
    # delete, the WAL of the file now at that path)...
    assert await b.store.sweep() == [T]
    # ...and a third process opening the path afterwards sees A's write whole.
    third = replica(a.store.root)
    try:
        assert await third.ids("gifts", SearchMode.BM25) == ["fresh"]
    finally:
        await third.engine.close()


async def test_concurrent_writes_from_both_replicas_all_land(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    await asyncio.gather(
        *(a.engine.ingest(T, [doc(f"a{i}", f"Rule a{i}: keep ledger {i} for audits.")]) for i in range(10)),
        *(b.engine.ingest(T, [doc(f"b{i}", f"Rule b{i}: keep ledger {i} for audits.")]) for i in range(10)))
    want = sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    for r in (a, b):
        assert sorted((await r.engine.store.indexed_versions(T, want)).keys()) == want
        hits = (await r.engine.search(T, SearchQuery("ledger audits", top_k=50, mode=SearchMode.BM25))).hits
        assert sorted(h.document_id for h in hits) == want


async def test_replicas_agree_on_when_a_written_tenant_has_settled(tmp_path: Path) -> None:
    """The lexical index is rebuilt once a tenant's file has been quiet for the settle time;
    before that FTS5 answers. Quiet is the file's, so a replica that never saw the write
    (and has no index yet) waits like the writer."""
    a, b = replica(tmp_path / "tenants", settle=600), replica(tmp_path / "tenants", settle=600)
    try:
        await a.engine.ingest(T, CORPUS)
        assert await b.ids("declare gifts", SearchMode.BM25) == ["gifts"]
        assert await a.ids("declare gifts", SearchMode.BM25) == ["gifts"]
        assert await a.store.lexical_tenants() == [] == await b.store.lexical_tenants()
    finally:
        await a.engine.close()
        await b.engine.close()
    c = replica(tmp_path / "tenants", settle=0)
    try:
        assert await c.ids("declare gifts", SearchMode.BM25) == ["gifts"]
        assert await c.store.lexical_tenants() == [T]
    finally:
        await c.engine.close()


async def test_a_tenant_file_of_the_previous_schema_gets_a_revision(tmp_path: Path) -> None:
    root = tmp_path / "tenants"
    root.mkdir()
    old = sqlite3.connect(root / f"{T}.sqlite", isolation_level=None)
    old.executescript(f"PRAGMA journal_mode=WAL; BEGIN; {_SCHEMA_V1}{_SCHEMA_V2} PRAGMA user_version=2; COMMIT;")
    old.close()
    a, b = replica(root), replica(root)
    try:
        first = await a.store.revision(T)
        assert first is not None and first == await b.store.revision(T)
        await b.engine.ingest(T, CORPUS)
        moved = await a.store.revision(T)
        assert moved is not None and moved != first and moved.incarnation == first.incarnation
        assert await a.top("declare gifts") == "gifts"
    finally:
        await a.engine.close()
        await b.engine.close()


async def test_revisions_survive_an_evicted_connection(tmp_path: Path) -> None:
    """A tenant's cached results stay valid when its connection is closed and reopened (LRU)."""
    store = SqliteFtsStore(tmp_path / "tenants", max_open_tenants=1, workers=1)
    engine = RetrievalEngine(store, shared=True)
    try:
        await engine.ingest(T, CORPUS)
        assert not (await engine.search(T, SearchQuery("declare gifts"))).cached
        await engine.ingest("tenant-b", CORPUS)  # evicts T's connection
        assert await store.open_tenants() == ["tenant-b"]
        assert (await engine.search(T, SearchQuery("declare gifts"))).cached
    finally:
        await engine.close()


# -- two retrieval servers built by the service's own build function -------------------------


async def test_two_built_servers_over_one_directory(tmp_path: Path) -> None:
    registry = Registry({T, "tenant-b"})
    metering = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(registry, metering)
    metering_port = metering.add_insecure_port("127.0.0.1:0")
    await metering.start()
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []
    stops = []
    stubs: list[pb_grpc.RetrievalServiceAsyncStub] = []
    base = dataclasses.replace(Settings.from_env(), data_dir=tmp_path, metering_port=metering_port,
                               audit_enabled=False, replicas=2)
    try:
        for index in range(2):
            settings = dataclasses.replace(base, replica=index)
            service = build(settings, RetrievalConfig(workers=1, embedder="hash"))
            for start in service.on_start:
                await start()
            stops.extend(service.on_stop)
            server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)],
                                     options=SERVER_OPTIONS)
            service.register(server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS))
            stubs.append(pb_grpc.RetrievalServiceStub(channels[-1]))
        # Replicas share the tenant files, never an audit outbox.
        assert audit_outbox_dir(dataclasses.replace(base, replica=0)) != \
               audit_outbox_dir(dataclasses.replace(base, replica=1))
        a, b = stubs
        admin, member = who(T, "admin"), who(T)
        onboarding = who(T, "service", user="service:metering")

        async def found(stub: pb_grpc.RetrievalServiceAsyncStub, query: str,
                        mode: pb.SearchMode = pb.SEARCH_MODE_UNSPECIFIED) -> list[str]:
            response = await stub.Search(pb.SearchRequest(query=query, mode=mode), metadata=member)
            return [hit.document_id for hit in response.hits]

        await a.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=onboarding)
        await a.IngestDocuments(pb.IngestDocumentsRequest(documents=[
            document("gifts", "Gifts above fifty euros must be declared.")]), metadata=admin)
        for mode in (pb.SEARCH_MODE_BM25, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID):
            assert await found(b, "declare gifts", mode) == ["gifts"]
            assert "travel" not in await found(b, "travel desk bookings", mode)  # warmed on B
        await a.IngestDocuments(pb.IngestDocumentsRequest(documents=[
            document("travel", "Bookings go through the travel desk.")]), metadata=admin)
        for mode in (pb.SEARCH_MODE_BM25, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID):
            assert (await found(b, "travel desk bookings", mode))[0] == "travel"

        # Settings put on B apply on A's next search.
        await b.ConfigureSearch(pb.ConfigureSearchRequest(default_mode=pb.SEARCH_MODE_BM25, default_top_k=1),
                                metadata=admin)
        response = await a.Search(pb.SearchRequest(query="travel gifts"), metadata=member)
        assert response.mode == pb.SEARCH_MODE_BM25 and len(response.hits) == 1
        read = await a.ConfigureSearch(pb.ConfigureSearchRequest(), metadata=member)
        assert read.settings.default_top_k == 1

        # Deleted on B: gone on A.
        await b.DeleteDocuments(pb.DeleteDocumentsRequest(document_ids=["travel"]), metadata=admin)
        assert "travel" not in await found(a, "travel desk bookings", pb.SEARCH_MODE_HYBRID)

        # The tenant deleted in metering and erased through B: A finds nothing, and a write
        # through A (which confirmed the tenant a moment ago) asks metering again and is
        # refused instead of re-creating the erased tenant's index.
        registry.tenants.discard(T)
        await b.EraseTenant(pb.EraseTenantRequest(), metadata=onboarding)
        assert await found(a, "declare gifts", pb.SEARCH_MODE_HYBRID) == []
        asked = registry.asked.count(T)
        await expect_error(a.IngestDocuments(pb.IngestDocumentsRequest(documents=[
            document("gifts", "Gifts above fifty euros must be declared.")]), metadata=admin),
            grpc.StatusCode.FAILED_PRECONDITION)
        assert registry.asked.count(T) == asked + 1
        assert not list((tmp_path / "retrieval" / "tenants").glob(f"{T}*"))

        # Re-created in metering and provisioned through A: B starts from an empty index.
        registry.tenants.add(T)
        await a.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=onboarding)
        assert await found(b, "declare gifts", pb.SEARCH_MODE_HYBRID) == []
        read = await b.ConfigureSearch(pb.ConfigureSearchRequest(), metadata=member)
        assert read.settings.default_top_k == 0
    finally:
        for channel in channels:
            await channel.close(None)
        for server in servers:
            await server.stop(None)
        for stop in stops:
            await stop()
        await metering.stop(None)
