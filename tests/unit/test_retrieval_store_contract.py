"""The DocumentStore contract, run against every backend through the RetrievalEngine:
the embedded SQLite store, the Weaviate store on the local fake Weaviate (the real
weaviate-client over the wire), and, when WEAVIATE_URL is set, a real Weaviate server
(its collections get a unique prefix and are dropped afterwards)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from servers.common.errors import InvalidArgument
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.models import DocumentInput, IngestStatus, SearchMode, SearchQuery
from servers.retrieval.stores.base import DocumentStore
from servers.retrieval.stores.sqlite import SqliteFtsStore
from servers.retrieval.stores.weaviate import WeaviateConfig, WeaviateStore
from tests.fakes.weaviate_server import FakeWeaviate
from tests.unit.retrieval_support import hash_engine

A, B = "tenant-a", "tenant-b"
BACKENDS = ["embedded", "weaviate-fake", "weaviate-real"]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeWeaviate]:
    with FakeWeaviate() as server:
        yield server


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DocumentStore]:
    backend = request.param
    if backend == "embedded":
        embedded = SqliteFtsStore(tmp_path / "tenants", max_open_tenants=4, workers=2)
        yield embedded
        await embedded.close()
        return
    if backend == "weaviate-fake":
        server: FakeWeaviate = request.getfixturevalue("fake")
        url, grpc_port, api_key = server.url, server.grpc_port, None
    else:
        if not os.environ.get("WEAVIATE_URL"):
            pytest.skip("WEAVIATE_URL is not set (a real Weaviate server to run the contract against)")
        url = os.environ["WEAVIATE_URL"]
        grpc_port = int(os.environ.get("WEAVIATE_GRPC_PORT", "50051"))
        api_key = os.environ.get("WEAVIATE_API_KEY") or None
    prefix = f"Contract{uuid.uuid4().hex[:10]}"
    weaviate_store = WeaviateStore(WeaviateConfig(url=url, grpc_port=grpc_port, api_key=api_key, timeout_s=20,
                                                  collection_prefix=prefix))
    try:
        yield weaviate_store
    finally:
        try:
            await weaviate_store.drop_collections()
        finally:
            await weaviate_store.close()


@pytest.fixture
def engine(store: DocumentStore) -> RetrievalEngine:
    return hash_engine(store)


def doc(doc_id: str, text: str, *, title: str = "", source: str = "", **metadata: str) -> DocumentInput:
    return DocumentInput(document_id=doc_id, title=title, text=text, source=source, metadata=metadata)


async def ids(engine: RetrievalEngine, tenant: str, text: str, **kw: object) -> list[str]:
    result = await engine.search(tenant, SearchQuery(text, **kw))  # type: ignore[arg-type]
    return [hit.document_id for hit in result.hits]


CORPUS = [
    doc("aml", "Firms must report suspicious transactions to the financial intelligence unit.",
        title="Anti money laundering", source="rulebook", topic="aml"),
    doc("kyc", "Customer due diligence is required before a business relationship starts.",
        title="Know your customer", source="rulebook", topic="kyc"),
    doc("gdpr", "Personal data must be processed lawfully, fairly and transparently.",
        title="Data protection", source="regulation", topic="privacy"),
]


async def test_ingest_statuses_and_idempotency(engine: RetrievalEngine, store: DocumentStore) -> None:
    await store.provision(A)
    first = await engine.ingest(A, CORPUS)
    assert [r.status for r in first] == [IngestStatus.CREATED] * 3
    again = await engine.ingest(A, CORPUS)
    assert [r.status for r in again] == [IngestStatus.UNCHANGED] * 3
    assert [r.chunks for r in again] == [r.chunks for r in first]
    versions = await store.indexed_versions(A, ["aml", "kyc", "missing"])
    assert set(versions) == {"aml", "kyc"}
    assert versions["aml"].content_hash == first[0].content_hash

    big = "\n\n".join(f"Paragraph {i} about zebra governance controls." * 8 for i in range(12))
    replaced = await engine.ingest(A, [doc("aml", big)])
    assert replaced[0].status is IngestStatus.REPLACED and replaced[0].chunks > 2
    assert set(await ids(engine, A, "zebra", mode=SearchMode.BM25)) == {"aml"}
    # Back to one chunk: the old version's chunks are all gone.
    small = await engine.ingest(A, [doc("aml", "Now only about giraffe reporting.")])
    assert small[0].status is IngestStatus.REPLACED and small[0].chunks == 1
    assert await ids(engine, A, "zebra", mode=SearchMode.BM25) == []
    assert (await store.indexed_versions(A, ["aml"]))["aml"].chunks == 1

    empty = await engine.ingest(A, [doc("kyc", "   ")])
    assert empty[0].status is IngestStatus.EMPTY
    assert "kyc" not in await store.indexed_versions(A, ["kyc"])
    assert await ids(engine, A, "diligence", mode=SearchMode.BM25) == []


async def test_delete_by_document_id(engine: RetrievalEngine, store: DocumentStore) -> None:
    await store.provision(A)
    await engine.ingest(A, CORPUS)
    result = await engine.delete(A, ["aml", "nope"])
    assert (result.deleted_documents, result.deleted_chunks, result.not_found) == (1, 1, ("nope",))
    assert await ids(engine, A, "suspicious transactions", mode=SearchMode.BM25) == []
    assert await ids(engine, A, "customer diligence", mode=SearchMode.BM25) == ["kyc"]
    again = await engine.delete(A, ["aml"])
    assert (again.deleted_documents, again.not_found) == (0, ("aml",))


@pytest.mark.parametrize("mode", list(SearchMode))
async def test_every_mode_finds_the_matching_document(engine: RetrievalEngine, store: DocumentStore,
                                                      mode: SearchMode) -> None:
    await store.provision(A)
    await engine.ingest(A, CORPUS)
    result = await engine.search(A, SearchQuery("suspicious transactions financial intelligence", mode=mode))
    assert result.mode is mode
    assert result.hits and result.hits[0].document_id == "aml"
    hit = result.hits[0]
    assert hit.title == "Anti money laundering" and hit.source == "rulebook"
    assert dict(hit.metadata) == {"topic": "aml"}
    assert "suspicious" in hit.text
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)


async def test_filters(engine: RetrievalEngine, store: DocumentStore) -> None:
    await store.provision(A)
    await engine.ingest(A, CORPUS)
    query = "must"  # in aml and gdpr
    assert sorted(await ids(engine, A, query, mode=SearchMode.BM25)) == ["aml", "gdpr"]
    assert await ids(engine, A, query, mode=SearchMode.BM25, filters={"source": "regulation"}) == ["gdpr"]
    assert await ids(engine, A, query, mode=SearchMode.BM25, filters={"document_id": "aml"}) == ["aml"]
    assert await ids(engine, A, query, mode=SearchMode.BM25, filters={"topic": "privacy"}) == ["gdpr"]
    assert await ids(engine, A, query, mode=SearchMode.DENSE, filters={"topic": "privacy"}) == ["gdpr"]
    assert await ids(engine, A, query, mode=SearchMode.HYBRID, filters={"topic": "privacy"}) == ["gdpr"]
    assert await ids(engine, A, query, mode=SearchMode.BM25, filters={"topic": "nobody"}) == []
    assert await ids(engine, A, query, mode=SearchMode.BM25,
                     filters={"topic": "aml", "source": "regulation"}) == []
    with pytest.raises(InvalidArgument, match="unknown metadata key 'topik'"):
        await engine.search(A, SearchQuery(query, filters={"topik": "aml"}))


async def test_tenants_are_isolated(engine: RetrievalEngine, store: DocumentStore) -> None:
    await store.provision(A)
    await store.provision(B)
    await engine.ingest(A, CORPUS)
    await engine.ingest(B, [doc("aml", "Tenant B writes about penguins only.", kind="birds")])
    for mode in SearchMode:
        assert await ids(engine, B, "suspicious transactions", mode=mode) in ([], ["aml"])
        hits = (await engine.search(B, SearchQuery("suspicious transactions", mode=mode))).hits
        assert all("penguins" in h.text for h in hits)
        assert "penguins" not in " ".join(h.text for h in (await engine.search(A, SearchQuery("penguins",
                                                                                               mode=mode))).hits)
    assert (await store.indexed_versions(B, ["aml"]))["aml"].content_hash != \
        (await store.indexed_versions(A, ["aml"]))["aml"].content_hash
    with pytest.raises(InvalidArgument):
        await engine.search(B, SearchQuery("x", filters={"topic": "aml"}))  # A's metadata key unknown to B
    await engine.delete(B, ["aml"])
    assert await ids(engine, A, "suspicious", mode=SearchMode.BM25) == ["aml"]


async def test_settings_round_trip(store: DocumentStore) -> None:
    await store.provision(A)
    assert await store.get_settings(A) == {}
    assert await store.put_settings(A, {"default_mode": "bm25", "default_top_k": "5"}) == \
        {"default_mode": "bm25", "default_top_k": "5"}
    assert await store.put_settings(A, {"default_mode": None, "default_alpha": "0.3"}) == \
        {"default_top_k": "5", "default_alpha": "0.3"}
    assert await store.get_settings(B) == {}


async def test_unknown_tenants_read_as_empty(store: DocumentStore) -> None:
    assert await store.search_lexical("tenant-none", "anything", 5, {}) == []
    assert await store.indexed_versions("tenant-none", ["x"]) == {}
    assert await store.get_settings("tenant-none") == {}
    assert await store.unknown_metadata_keys("tenant-none", ["k"]) == {"k"}
    deleted = await store.delete("tenant-none", ["x"])
    assert (deleted.deleted_documents, deleted.not_found) == (0, ("x",))


async def test_erase_removes_everything(engine: RetrievalEngine, store: DocumentStore) -> None:
    await store.provision(A)
    await engine.ingest(A, CORPUS)
    await store.put_settings(A, {"default_mode": "bm25"})
    await engine.erase(A)
    await engine.erase(A)  # idempotent
    assert await ids(engine, A, "suspicious", mode=SearchMode.BM25) == []
    assert await store.indexed_versions(A, ["aml", "kyc", "gdpr"]) == {}
    assert await store.get_settings(A) == {}
    # A re-created tenant starts empty.
    await store.provision(A)
    assert (await engine.ingest(A, CORPUS[:1]))[0].status is IngestStatus.CREATED


async def test_healthy(store: DocumentStore) -> None:
    assert await store.healthy()


@pytest.mark.parametrize("mode", list(SearchMode))
async def test_hits_carry_their_place_in_the_original_text(engine: RetrievalEngine, store: DocumentStore,
                                                           mode: SearchMode) -> None:
    # CRLF line ends, a decomposed accent, runs of spaces and a markdown rule the chunker drops:
    # the location still reproduces the original exactly.
    original = ("# Records\r\n\r\nThe re\u0301gime says firms keep   zebra records for seven years.\r\n\r\n---\r\n\r\n"
                "Zebra records are stored\r\nsecurely by the MLRO.\r\n")
    await store.provision(A)
    await engine.ingest(A, [DocumentInput(document_id="rec", title="Records", text=original,
                                          content_type="text/markdown")])
    result = await engine.search(A, SearchQuery("zebra records", mode=mode))
    assert result.hits
    for hit in result.hits:
        assert hit.location is not None
        assert hit.location.original_text(hit.text) == original[hit.location.start:hit.location.end]
        assert "zebra records" in original[hit.location.start:hit.location.end]
