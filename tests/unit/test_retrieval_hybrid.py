"""Dense vectors in the embedded store, hybrid search, caches, defaults, unloading, erasure.

Uses the dependency-free hashing embedder: these tests are about the plumbing (vectors
stored, replaced, isolated, erased), not about embedding quality.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from servers.common.errors import InvalidArgument
from servers.retrieval.embedders import HashEmbedder
from servers.retrieval.engine import SETTING_ALPHA, SETTING_MODE, RetrievalEngine
from servers.retrieval.fusion import Fusion, fuse
from servers.retrieval.models import DocumentInput, Hit, IngestStatus, SearchMode, SearchQuery, Vectors
from servers.retrieval.query import MAX_QUERY_PHRASES, query_phrases
from servers.retrieval.stores.sqlite import SqliteFtsStore

A, B = "tenant-a", "tenant-b"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteFtsStore]:
    s = SqliteFtsStore(tmp_path / "tenants", max_open_tenants=8, workers=2)
    yield s
    await s.close()


@pytest.fixture
def engine(store: SqliteFtsStore) -> RetrievalEngine:
    return RetrievalEngine(store, embedder=HashEmbedder())


def doc(doc_id: str, text: str, **kw: object) -> DocumentInput:
    return DocumentInput(document_id=doc_id, title=str(kw.pop("title", "")), text=text, **kw)  # type: ignore[arg-type]


def counts(store: SqliteFtsStore, tenant: str) -> tuple[int, int]:
    with sqlite3.connect(store.path(tenant)) as conn:
        chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        vectors = conn.execute("SELECT count(*) FROM chunk_vectors").fetchone()[0]
    return chunks, vectors


CORPUS = [
    doc("kyc", "Customer due diligence records must be kept for five years.", metadata={"team": "aml"}),
    doc("gifts", "Gifts above 100 EUR must be declared to Compliance.", metadata={"team": "ethics"}),
    doc("leave", "Annual leave requests go to the line manager.", metadata={"team": "hr"}),
]


async def test_vectors_are_stored_replaced_and_reingest_is_idempotent(
        engine: RetrievalEngine, store: SqliteFtsStore) -> None:
    await engine.ingest(A, CORPUS)
    assert counts(store, A) == (3, 3)
    again = await engine.ingest(A, CORPUS)
    assert {r.status for r in again} == {IngestStatus.UNCHANGED}
    assert counts(store, A) == (3, 3)
    long_text = "\n\n".join(f"Rule {i}. Staff must log every gift number {i} in the register." * 8 for i in range(6))
    changed = await engine.ingest(A, [doc("gifts", long_text)])
    assert changed[0].status is IngestStatus.REPLACED and changed[0].chunks > 1
    chunks, vectors = counts(store, A)
    assert chunks == vectors == 2 + changed[0].chunks
    await engine.delete(A, ["gifts"])
    assert counts(store, A) == (2, 2)


async def test_modes_run_and_are_reported(engine: RetrievalEngine) -> None:
    await engine.ingest(A, CORPUS)
    for mode in SearchMode:
        result = await engine.search(A, SearchQuery("gifts declared compliance", mode=mode))
        assert result.mode is mode
        assert result.hits[0].document_id == "gifts"
    default = await engine.search(A, SearchQuery("gifts declared"))
    assert default.mode is SearchMode.HYBRID and default.alpha is not None and default.fusion
    scores = [h.score for h in default.hits]
    assert scores == sorted(scores, reverse=True)


async def test_without_an_embedder_everything_is_bm25_and_says_so(store: SqliteFtsStore) -> None:
    engine = RetrievalEngine(store)
    await engine.ingest(A, CORPUS)
    for mode in (None, SearchMode.DENSE, SearchMode.HYBRID):
        result = await engine.search(A, SearchQuery("gifts", mode=mode))
        assert result.mode is SearchMode.BM25 and result.hits


async def test_dense_and_hybrid_apply_filters(engine: RetrievalEngine) -> None:
    await engine.ingest(A, CORPUS)
    for mode in (SearchMode.DENSE, SearchMode.HYBRID):
        result = await engine.search(A, SearchQuery("must be", mode=mode, filters={"team": "aml"}, top_k=10))
        assert [h.document_id for h in result.hits] == ["kyc"]
        result = await engine.search(A, SearchQuery("must", mode=mode, filters={"document_id": "leave"}))
        assert {h.document_id for h in result.hits} <= {"leave"}
    with pytest.raises(InvalidArgument, match="unknown metadata key 'tema'"):
        await engine.search(A, SearchQuery("must", mode=SearchMode.DENSE, filters={"tema": "aml"}))


async def test_result_cache_hits_and_is_invalidated_by_changes(engine: RetrievalEngine) -> None:
    await engine.ingest(A, CORPUS)
    first = await engine.search(A, SearchQuery("gifts"))
    assert not first.cached
    second = await engine.search(A, SearchQuery("gifts"))
    assert second.cached and second.hits == first.hits
    await engine.ingest(A, [doc("gifts2", "Gifts from suppliers are logged.")])
    third = await engine.search(A, SearchQuery("gifts", top_k=10))
    assert not third.cached and "gifts2" in {h.document_id for h in third.hits}
    # Another tenant asking the same thing never gets A's cached answer.
    with pytest.raises(InvalidArgument):
        await engine.search(B, SearchQuery("gifts", filters={"team": "ethics"}))
    assert (await engine.search(B, SearchQuery("gifts"))).hits == []
    assert all(key[0] in (A, B) for key in engine.results.snapshot())
    # The query embedding is cached once per tenant, never shared.
    assert sorted(key[0] for key in engine.embeddings.snapshot() if key[2] == "gifts") == [A, B]


async def test_concurrent_identical_queries_from_many_tenants_stay_isolated(store: SqliteFtsStore) -> None:
    engine = RetrievalEngine(store, embedder=HashEmbedder())
    tenants = [f"iso-{i:02d}" for i in range(16)]
    await asyncio.gather(*(engine.ingest(t, [
        doc(f"{t}-policy", f"The travel policy of {t}: flights must be booked by {t} staff.",
            metadata={"owner": t}),
        doc(f"{t}-other", "Catering menus for the summer party."),
    ]) for t in tenants))
    queries = [(t, mode) for _ in range(2) for t in tenants for mode in SearchMode]
    results = []
    for _ in range(2):  # the second round is answered from the caches
        results += await asyncio.gather(*(engine.search(t, SearchQuery("travel policy flights booked", mode=mode))
                                          for t, mode in queries))
    queries = queries * 2
    cached = 0
    for (tenant, _), result in zip(queries, results, strict=True):
        assert result.hits
        cached += result.cached
        for h in result.hits:
            assert h.document_id.startswith(f"{tenant}-"), (tenant, h.document_id)
            assert h.metadata in ({"owner": tenant}, {})
            assert all(other not in h.text for other in tenants if other != tenant)
    assert cached > 0  # the repeats were served from the (per-tenant) cache


async def test_idle_tenants_are_unloaded_and_reloaded_on_demand(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path / "tenants", max_open_tenants=2, workers=1)
    engine = RetrievalEngine(store, embedder=HashEmbedder(), result_cache_entries=0)
    try:
        tenants = ["u-1", "u-2", "u-3"]
        for t in tenants:
            await engine.ingest(t, [doc(f"{t}-d", f"Expense claims of {t} need receipts.")])
            assert (await engine.search(t, SearchQuery("expense receipts", mode=SearchMode.DENSE))).hits
        assert len(await store.open_tenants()) <= 2
        assert len(await store.dense_tenants()) <= 2
        hits = (await engine.search("u-1", SearchQuery("expense receipts", mode=SearchMode.DENSE))).hits
        assert [h.document_id for h in hits] == ["u-1-d"]
        assert "u-1" in await store.dense_tenants()
    finally:
        await store.close()


async def test_tenant_defaults(engine: RetrievalEngine) -> None:
    await engine.ingest(A, CORPUS)
    defaults = await engine.configure(A, {SETTING_MODE: "dense", SETTING_ALPHA: "0.7"})
    assert defaults.mode is SearchMode.DENSE and defaults.alpha == 0.7
    assert (await engine.search(A, SearchQuery("gifts"))).mode is SearchMode.DENSE
    assert (await engine.search(B, SearchQuery("gifts"))).mode is SearchMode.HYBRID
    await engine.configure(A, {SETTING_MODE: None})
    hybrid = await engine.search(A, SearchQuery("gifts"))
    assert hybrid.mode is SearchMode.HYBRID and hybrid.alpha == 0.7
    assert hybrid.fusion == engine.default_fusion.value
    rrf = await engine.search(A, SearchQuery("gifts", fusion=Fusion.RRF.value, alpha=0.2))
    assert (rrf.fusion, rrf.alpha) == ("rrf", 0.2)


async def test_erase_leaves_nothing_on_disk_or_in_caches(engine: RetrievalEngine, store: SqliteFtsStore) -> None:
    await engine.ingest(A, CORPUS)
    await engine.ingest(B, CORPUS)
    await engine.configure(A, {SETTING_ALPHA: "0.2"})
    for mode in SearchMode:
        await engine.search(A, SearchQuery("gifts", mode=mode))
    await engine.erase(A)
    leftovers = [p for p in store.root.rglob("*") if A in p.name]
    assert leftovers == []
    assert not any(key[0] == A for key in engine.results.snapshot())
    assert not any(key[0] == A for key in engine.embeddings.snapshot())
    assert A not in await store.open_tenants() and A not in await store.dense_tenants()
    assert (await engine.search(A, SearchQuery("gifts"))).hits == []
    assert (await engine.search(B, SearchQuery("gifts"))).hits  # B untouched
    # Erasing again, or a tenant that never existed, is fine.
    await engine.erase(A)
    await engine.erase("never-was")


async def test_hash_embedder_is_normalised_and_deterministic() -> None:
    embedder = HashEmbedder(dimension=64)
    vectors = await embedder.embed(["Gifts must be declared", "Gifts must be declared", ""])
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors[:2], axis=1), 1.0)
    assert np.array_equal(vectors[0], vectors[1])
    assert not vectors[2].any()


class RecordingEmbedder(HashEmbedder):
    """The hashing embedder, remembering every text it was asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.texts.extend(texts)
        return await super().embed(texts)


async def test_vectors_encode_the_chunk_text_without_its_headings(store: SqliteFtsStore) -> None:
    embedder = RecordingEmbedder()
    engine = RetrievalEngine(store, embedder=embedder)
    text = "Records of identity checks must be kept for five years."
    await engine.ingest(A, [doc("p1", text, title="AML > Customer Due Diligence")])
    assert embedder.texts == [text]
    # The heading path still ranks on the lexical side.
    hits = (await engine.search(A, SearchQuery("customer due diligence", mode=SearchMode.BM25))).hits
    assert [hit.document_id for hit in hits] == ["p1"]
    # What vectors encode is part of the index signature: a change re-embeds stored chunks.
    assert "text-v" in engine.index_signature


def test_query_phrases_are_adjacent_content_word_pairs() -> None:
    assert query_phrases("If a PFP Client intends to use the exit facility?") == [
        "pfp client", "client intends", "exit facility"]
    assert query_phrases("what is the") == []
    assert query_phrases("exit facility, exit facility") == ["exit facility", "facility exit"]
    assert len(query_phrases(" ".join(f"w{i}" for i in range(200)))) == MAX_QUERY_PHRASES


async def test_bm25_ranks_a_phrase_found_as_written_first(store: SqliteFtsStore) -> None:
    engine = RetrievalEngine(store)
    await engine.ingest(A, [
        doc("apart", "Exit rules differ: an exit needs notice, and the facility then closes for good."),
        doc("phrase", "Clients may use the exit facility at any time after the first year ends."),
        doc("other", "Annual leave requests go to the line manager."),
    ])
    hits = (await engine.search(A, SearchQuery("exit facility", mode=SearchMode.BM25))).hits
    assert [hit.document_id for hit in hits] == ["phrase", "apart"]


class CountingStore(SqliteFtsStore):
    """The embedded store, counting the rows hybrid search reads."""

    fetched: list[int]

    async def fetch(self, tenant: str, ranked: list[tuple[int, float]]) -> list[Hit]:
        self.fetched.append(len(ranked))
        return await super().fetch(tenant, ranked)


async def test_hybrid_fuses_rankings_and_reads_only_the_rows_it_returns(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "tenants", lexical_settle_seconds=0)
    store.fetched = []
    engine = RetrievalEngine(store, embedder=HashEmbedder(), result_cache_entries=0)
    try:
        corpus = [doc(f"d{i}", f"Rule {i}: the firm must keep {word} records for {i % 7 + 1} years.")
                  for i, word in enumerate(["customer", "transaction", "gift", "sanctions", "audit"] * 12)]
        await engine.ingest(A, corpus)
        for query, top_k in (("customer records years", 5), ("sanctions audit", 3), ("gift", 8)):
            for fusion, alpha in ((Fusion.RELATIVE_SCORE, 0.4), (Fusion.RRF, 0.5)):
                result = await engine.search(A, SearchQuery(query, top_k=top_k, mode=SearchMode.HYBRID,
                                                            alpha=alpha, fusion=fusion.value))
                # The same as fusing the two full hit lists (what stores without rankings get).
                vector = (await engine.embedder.embed([query]))[0]  # type: ignore[union-attr]
                want = fuse(await store.search_lexical(A, query, 100, {}), await store.search_dense(A, vector, 100, {}),
                            alpha=alpha, method=fusion, top_k=top_k)
                assert [h.score for h in result.hits] == pytest.approx([h.score for h in want])
                # Equal scores may order differently (row key vs chunk id as the last tie-break).
                by_score: dict[float, set[tuple[str, str]]] = {round(h.score, 9): set() for h in want}
                for h in want:
                    by_score[round(h.score, 9)].add((h.chunk_id, h.text))
                cut = round(want[-1].score, 9)
                for h in result.hits:
                    assert (h.chunk_id, h.text) in by_score[round(h.score, 9)] or round(h.score, 9) == cut
                # Only the returned rows were read, not the 2 x 100 candidates.
                assert store.fetched[-1] == len(result.hits) == top_k
    finally:
        await engine.close()
