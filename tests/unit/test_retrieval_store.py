"""SqliteFtsStore through the RetrievalEngine: ingest semantics, search, filters, isolation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servers.common.errors import InvalidArgument
from servers.retrieval import engine as engine_module
from servers.retrieval.chunker import ChunkingConfig
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.models import DocumentInput, IngestStatus, SearchMode, SearchQuery
from servers.retrieval.query import query_terms
from servers.retrieval.stores.sqlite import SqliteFtsStore, match_expression

A, B = "tenant-a", "tenant-b"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteFtsStore]:
    s = SqliteFtsStore(tmp_path / "tenants", max_open_tenants=8, workers=2)
    yield s
    await s.close()


@pytest.fixture
def engine(store: SqliteFtsStore) -> RetrievalEngine:
    return RetrievalEngine(store)


def doc(doc_id: str, text: str, **kw: object) -> DocumentInput:
    return DocumentInput(document_id=doc_id, title=str(kw.pop("title", "")), text=text, **kw)  # type: ignore[arg-type]


async def ids(engine: RetrievalEngine, tenant: str, text: str, **kw: object) -> list[str]:
    result = await engine.search(tenant, SearchQuery(text, **kw))  # type: ignore[arg-type]
    return [hit.document_id for hit in result.hits]


async def test_ingest_is_idempotent_and_unchanged_does_no_work(
        engine: RetrievalEngine, store: SqliteFtsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    first = await engine.ingest(A, [doc("d1", "Firms must report suspicious transactions.")])
    assert first[0].status is IngestStatus.CREATED and first[0].chunks == 1
    assert len(first[0].content_hash) == 64

    calls: list[str] = []

    def no_chunking(*args: object, **kw: object) -> list[object]:
        calls.append("chunk")
        return []

    async def no_upsert(*args: object, **kw: object) -> list[object]:
        calls.append("upsert")
        return []

    monkeypatch.setattr(engine_module, "chunk_document", no_chunking)
    monkeypatch.setattr(store, "upsert", no_upsert)
    again = await engine.ingest(A, [doc("d1", "Firms must report suspicious transactions.")])
    assert again[0].status is IngestStatus.UNCHANGED
    assert again[0].chunks == 1 and again[0].content_hash == first[0].content_hash
    assert calls == []


async def test_changed_document_replaces_old_chunks(engine: RetrievalEngine) -> None:
    big = "\n\n".join(f"Paragraph {i} about zebra governance controls." * 8 for i in range(12))
    created = await engine.ingest(A, [doc("d1", big)])
    assert created[0].chunks > 2
    replaced = await engine.ingest(A, [doc("d1", "Now only about giraffe reporting.")])
    assert replaced[0].status is IngestStatus.REPLACED and replaced[0].chunks == 1
    assert await ids(engine, A, "zebra") == []
    assert await ids(engine, A, "giraffe") == ["d1"]
    # Metadata is part of the content hash: a metadata change replaces too.
    meta = await engine.ingest(A, [doc("d1", "Now only about giraffe reporting.", metadata={"k": "v"})])
    assert meta[0].status is IngestStatus.REPLACED
    assert await ids(engine, A, "giraffe", filters={"k": "v"}) == ["d1"]


async def test_changed_chunking_reindexes_unchanged_documents(store: SqliteFtsStore) -> None:
    first = RetrievalEngine(store)
    await first.ingest(A, [doc("d1", "Text about capital adequacy.")])
    other = RetrievalEngine(store, chunking=ChunkingConfig(max_chars=600, overlap_chars=100))
    result = await other.ingest(A, [doc("d1", "Text about capital adequacy.")])
    assert result[0].status is IngestStatus.REPLACED


async def test_empty_documents(engine: RetrievalEngine, store: SqliteFtsStore) -> None:
    results = await engine.ingest(A, [doc("e1", ""), doc("e2", "# Heading only", content_type="text/markdown"),
                                      doc("ok", "Real content here.")])
    assert [r.status for r in results] == [IngestStatus.EMPTY, IngestStatus.EMPTY, IngestStatus.CREATED]
    assert results[0].chunks == 0
    # An indexed document that becomes empty is removed, not left stale.
    await engine.ingest(A, [doc("d1", "Unique walrus clause.")])
    emptied = await engine.ingest(A, [doc("d1", "   ")])
    assert emptied[0].status is IngestStatus.EMPTY
    assert await ids(engine, A, "walrus") == []
    assert (await store.delete(A, ["d1"])).not_found == ("d1",)


async def test_results_keep_input_order_across_write_batches(engine: RetrievalEngine) -> None:
    docs = [doc(f"d{i}", f"Document number {i} on liquidity.") for i in range(150)]
    first = await engine.ingest(A, docs[:75])
    results = await engine.ingest(A, docs)
    assert [r.document_id for r in results] == [d.document_id for d in docs]
    assert [r.status for r in results[:75]] == [IngestStatus.UNCHANGED] * 75
    assert [r.status for r in results[75:]] == [IngestStatus.CREATED] * 75
    assert len(first) == 75


async def test_delete(engine: RetrievalEngine) -> None:
    long_text = "\n\n".join(f"Section {i}: otter retention rules apply here. " * 10 for i in range(6))
    created = await engine.ingest(A, [doc("d1", long_text), doc("d2", "Otter notes.")])
    result = await engine.delete(A, ["d1", "missing", "d1"])
    assert result.deleted_documents == 1
    assert result.deleted_chunks == created[0].chunks
    assert result.not_found == ("missing",)
    assert await ids(engine, A, "otter") == ["d2"]
    # Deleting for a tenant that has no index yet creates nothing.
    result = await engine.delete("tenant-new", ["x"])
    assert result.not_found == ("x",)


async def test_filters(engine: RetrievalEngine) -> None:
    await engine.ingest(A, [
        doc("p1", "Privacy policy on consent.", source="handbook.md", metadata={"team": "legal", "year": "2024"}),
        doc("p2", "Privacy policy on retention.", source="wiki", metadata={"team": "ops", "year": "2024"}),
        doc("p3", "Privacy notice for staff.", source="wiki", metadata={"team": "legal", "year": "2023"}),
    ])
    assert sorted(await ids(engine, A, "privacy")) == ["p1", "p2", "p3"]
    assert sorted(await ids(engine, A, "privacy", filters={"team": "legal"})) == ["p1", "p3"]
    assert await ids(engine, A, "privacy", filters={"team": "legal", "year": "2024"}) == ["p1"]
    assert sorted(await ids(engine, A, "privacy", filters={"source": "wiki"})) == ["p2", "p3"]
    assert await ids(engine, A, "privacy", filters={"document_id": "p2"}) == ["p2"]
    # A key no document of the tenant carries is a mistake (a typo), not an empty result.
    with pytest.raises(InvalidArgument, match="unknown metadata key 'unknown'"):
        await ids(engine, A, "privacy", filters={"unknown": "x"})
    assert await ids(engine, A, "privacy", filters={"team": "nobody"}) == []
    assert await ids(engine, A, "privacy", filters={"team": "LEGAL"}) == []  # exact match


async def test_stemming_stop_words_and_ranking(engine: RetrievalEngine) -> None:
    await engine.ingest(A, [
        doc("r", "The firm reports incidents to the regulator.", title="Incident policy"),
        doc("x", "Unrelated text about catering menus."),
        doc("m", "Reporting obligations: reporting reports reported daily.", title="Reporting"),
    ])
    assert "r" in await ids(engine, A, "reporting")
    assert "r" in await ids(engine, A, "What is the reporting rule?")
    result = await engine.search(A, SearchQuery("reporting"))
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert result.hits[0].document_id == "m"
    # A query of stop words only still searches instead of failing or matching nothing.
    assert query_terms("what is the") == ["what", "is", "the"]
    assert query_terms("What is THE reporting-rule_x?") == ["reporting", "rule", "x"]


async def test_sections_and_titles_are_searchable(engine: RetrievalEngine) -> None:
    text = "# Outsourcing\n\n## Cloud providers\n\nA firm needs board approval first."
    await engine.ingest(A, [doc("o", text, title="Handbook", content_type="text/markdown", source="h.md")])
    hit = (await engine.search(A, SearchQuery("cloud"))).hits[0]
    assert hit.section == "Outsourcing > Cloud providers"
    assert hit.chunk_id == "o#0" and hit.title == "Handbook" and hit.source == "h.md"
    assert (await engine.search(A, SearchQuery("handbook"))).hits[0].document_id == "o"


NASTY_QUERIES = [
    '"', '""', '"unterminated', "*", "report*", "NEAR(", "NEAR(a b", "NEAR(report, 5)", "AND", "OR", "NOT",
    "a AND", "AND OR NOT", "-", "-report", "report -policy", "title:report", "{title}: x", "^report",
    "(", ")", "((report", "report)", "'", "\\", "%", "_", ";", "report; DROP TABLE chunks; --",
    "\x00", "\u200b", "💥", "：", "col:", "+", "report + policy", "a OR b AND NOT c", "NEAR/3",
]


async def test_fts_syntax_in_queries_never_errors(engine: RetrievalEngine) -> None:
    await engine.ingest(A, [doc("d", "The report policy covers NEAR misses and AND gates.")])
    for query in NASTY_QUERIES:
        await engine.search(A, SearchQuery(query))
    assert "d" in await ids(engine, A, '"report" AND NEAR(policy')
    rng = random.Random(7)
    alphabet = '"*()-^:{}+ANDORNEAT \'\\\u00e9\u4e2d\U0001f4a5\u0301_.,;'
    for _ in range(300):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        await engine.search(A, SearchQuery(query))
    assert match_expression("!!!") is None
    # Terms, then adjacent pairs as phrases: operators typed by a user stay plain words.
    assert match_expression('say "hi" NEAR(x') == ('"say" OR "hi" OR "near" OR "x"'
                                                   ' OR "say hi" OR "hi near" OR "near x"')


async def test_top_k(engine: RetrievalEngine) -> None:
    await engine.ingest(A, [doc(f"d{i}", f"Common term number {i}.") for i in range(30)])
    assert len(await ids(engine, A, "common")) == engine.default_top_k
    assert len(await ids(engine, A, "common", top_k=3)) == 3
    assert len(await ids(engine, A, "common", top_k=100)) == 30


async def test_dense_and_hybrid_report_bm25(engine: RetrievalEngine) -> None:
    await engine.ingest(A, [doc("d", "Sanctions screening.")])
    for mode in SearchMode:
        result = await engine.search(A, SearchQuery("sanctions", mode=mode, alpha=0.5))
        assert result.mode is SearchMode.BM25 and result.hits


async def test_tenants_are_physically_isolated(engine: RetrievalEngine, store: SqliteFtsStore) -> None:
    await engine.ingest(A, [doc("shared-id", "Alpha secret about capital buffers.", metadata={"t": "a"})])
    await engine.ingest(B, [doc("shared-id", "Beta secret about capital buffers.", metadata={"t": "b"}),
                            doc("b-only", "Capital planning for beta.")])
    assert store.path(A).exists() and store.path(B).exists() and store.path(A) != store.path(B)

    async def check(tenant: str) -> None:
        result = await engine.search(tenant, SearchQuery("capital buffers secret", top_k=100))
        assert result.hits
        for hit in result.hits:
            assert hit.metadata.get("t", "b") == tenant[-1]
            assert ("Alpha" in hit.text) == (tenant == A)

    # Many identical queries from both tenants at once.
    await asyncio.gather(*(check(A if i % 2 else B) for i in range(200)))
    assert (await engine.delete(A, ["b-only"])).not_found == ("b-only",)
    # A tenant that never ingested sees nothing and gets no file.
    assert await ids(engine, "tenant-c", "capital") == []
    assert not store.path("tenant-c").exists()


async def test_many_tenants_concurrently_with_bounded_connections(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path, max_open_tenants=4, workers=2)
    engine = RetrievalEngine(store)
    tenants = [f"tenant-{i:02d}" for i in range(12)]
    try:
        await asyncio.gather(*(engine.ingest(t, [doc("d", f"Shared words and marker {t}.")]) for t in tenants))
        assert len(await store.open_tenants()) <= 4

        async def check(tenant: str) -> None:
            hits = (await engine.search(tenant, SearchQuery("shared words marker"))).hits
            assert [h.text for h in hits] == [f"Shared words and marker {tenant}."]

        await asyncio.gather(*(check(tenants[i % len(tenants)]) for i in range(240)))
        assert len(await store.open_tenants()) <= 4
    finally:
        await store.close()


async def test_durable_across_restart_and_erase(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path)
    engine = RetrievalEngine(store)
    await engine.provision(A)
    assert store.path(A).exists()
    await engine.ingest(A, [doc("d", "Durable pelican rule.")])
    await store.close()

    store = SqliteFtsStore(tmp_path)
    engine = RetrievalEngine(store)
    try:
        assert await ids(engine, A, "pelican") == ["d"]
        assert store.path(A).with_name(f"{A}.sqlite-wal").exists()
        await engine.ingest(B, [doc("d", "Other pelican.")])
        await engine.erase(A)
        assert not any(path.exists() for path in store.files(A))
        leftovers = await asyncio.to_thread(lambda: [p.name for p in tmp_path.iterdir() if p.name.startswith(A)])
        assert leftovers == []
        assert await ids(engine, A, "pelican") == []
        assert await ids(engine, B, "pelican") == ["d"]
        await engine.erase(A)  # idempotent
    finally:
        await store.close()


async def test_tenant_ids_cannot_escape_the_directory(store: SqliteFtsStore) -> None:
    for bad in ["../etc", "a/b", "", "A", "x", "tenant.sqlite"]:
        with pytest.raises(ValueError):
            store.path(bad)
    with pytest.raises(ValueError):
        await store.search_lexical("../../x", "q", 5, {})


async def test_health_and_close(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path / "data")
    assert await store.healthy()
    await store.close()
    assert not await store.healthy()
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    other = SqliteFtsStore(blocked / "tenants")
    assert not await other.healthy()
    await other.close()
