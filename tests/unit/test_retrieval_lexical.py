"""The in-memory lexical index (`servers/retrieval/lexical.py`) against FTS5's own bm25().

Every comparison runs the same query through two stores over the same files: one answering
from `LexicalIndex`, one (`in_memory_lexical=False`) from FTS5 in SQL. The top k must hold the
same chunks with the same scores; only the order among equal scores may differ, so results
are compared as runs of tied scores. The ObliQA check skips where the data folder is absent.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from copilot_cli.documents import read_corpus
from servers.retrieval.chunker import Chunk
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.lexical import LexicalIndex, QueryTokenizer
from servers.retrieval.models import DocumentInput, Hit, PreparedDocument
from servers.retrieval.stores.base import Bm25Params
from servers.retrieval.stores.sqlite import FTS5_BM25, SqliteFtsStore

A, B = "tenant-a", "tenant-b"
DATA = Path(os.environ.get("COPILOT_OBLIQA_DIR")
            or Path(__file__).resolve().parents[3] / "shared" / "data" / "obliqa-dev")
# A letter Python counts as one (so a query word spans it) but SQLite's unicode61 splits at.
SPLITTER = "\u19b0"


def prepared(doc_id: str, chunks: Sequence[tuple[tuple[str, ...], str]], title: str = "",
             metadata: Mapping[str, str] | None = None) -> PreparedDocument:
    """A document with exactly these chunks (section path, text): empty and heading-only
    chunks included, which the chunker itself would never produce."""
    document = DocumentInput(doc_id, title, "\n".join(text for _, text in chunks), metadata=dict(metadata or {}))
    return PreparedDocument(document, document.content_hash(), "test",
                            tuple(Chunk(doc_id, i, section, text) for i, (section, text) in enumerate(chunks)))


WORDS = ("report reports reporting reported suspicious transaction transactions money laundering launder"
         " customer customers due diligence audit audits auditor risk risky assessment firm firms shall must"
         " may record records keep kept five years café cafe Über uber naïve straße ΣΟΦΙΑ σοφία 2024 x²"
         f" a{SPLITTER}b exit facility operator pfp").split()
STOP = "the of and to in a is what which for".split()
SECTIONS = ((), ("Part 1",), ("Part 1", "Reporting"), ("Customer Due Diligence",), ("Café Rules", "Über"))


def synthetic_corpus(seed: int) -> list[PreparedDocument]:
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) if rng.random() < 0.75 else rng.choice(STOP)
                        for _ in range(rng.randint(low, high)))

    docs = [
        prepared("empty", [((), ""), (("Only a heading",), "")], title=""),
        prepared("heading-only", [(("Suspicious Transaction Reporting",), "")], title="Reporting"),
        prepared("repeats", [((), "audit " * 30 + "risk"), (("Audit", "Audit"), "audit audit")], title="Audit audit"),
        prepared("phrases", [(("Exit facility",), "The PFP operator offers an exit facility; exit, then facility.")],
                 title="PFP exit facility"),
        prepared("diacritics", [(("Café Rules",), "Über naïve Straße café CAFE Cafe σοφία ΣΟΦΙΑ")], title="Café"),
        prepared("split", [((), f"a{SPLITTER}b c{SPLITTER}d a b c d")]),
    ]
    for i in range(300):
        chunks = [(rng.choice(SECTIONS), sentence(0, 40) if rng.random() > 0.05 else "")
                  for _ in range(rng.randint(1, 3))]
        docs.append(prepared(f"d{i:03d}", chunks, title=sentence(0, 5) if rng.random() > 0.3 else "",
                             metadata={"group": f"g{i % 3}", **({"lang": "en"} if i % 5 == 0 else {})}))
    return docs


def queries(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "What must a firm report about suspicious transactions?", "reporting reported reports",
        "run running runs", "exit facility", "PFP operator exit facility", "facility exit",
        "cafe", "CAFÉ über", "naive strasse", "Straße", "σοφια", "audit audit audit", "the of and",
        "what is it", '"AND" OR NEAR( * -report', "x² 2024", f"a{SPLITTER}b", f"a{SPLITTER}b c{SPLITTER}d",
        SPLITTER, "zzz unknownword", "Customer Due Diligence records kept five years",
    ]
    generated = [" ".join(rng.choice(WORDS + STOP) for _ in range(rng.randint(1, 8))) for _ in range(count)]
    return fixed + generated


def tie_runs(hits: Sequence[Hit]) -> list[tuple[float, set[str]]]:
    runs: list[tuple[float, set[str]]] = []
    for hit in hits:
        if runs and math.isclose(runs[-1][0], hit.score, rel_tol=1e-9, abs_tol=1e-12):
            runs[-1][1].add(hit.chunk_id)
        else:
            runs.append((hit.score, {hit.chunk_id}))
    return runs


def assert_same_ranking(got: Sequence[Hit], want: Sequence[Hit], top_k: int, label: str) -> None:
    assert len(got) == len(want), label
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-6), label
    got_runs, want_runs = tie_runs(got), tie_runs(want)
    assert [len(ids) for _, ids in got_runs] == [len(ids) for _, ids in want_runs], label
    # A run cut by top_k may hold different members of the tie on each side.
    whole = len(got_runs) if len(got) < top_k else len(got_runs) - 1
    assert [ids for _, ids in got_runs[:whole]] == [ids for _, ids in want_runs[:whole]], label
    for hit in got:
        assert hit.text is not None and hit.document_id and hit.chunk_id.startswith(hit.document_id), label


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteFtsStore, SqliteFtsStore]]:
    root = tmp_path / "tenants"
    # The in-memory store scores with FTS5's own k1 and b, so the two must agree exactly.
    memory = SqliteFtsStore(root, max_open_tenants=8, workers=2, bm25=FTS5_BM25, lexical_settle_seconds=0)
    fts = SqliteFtsStore(root, max_open_tenants=8, workers=2, in_memory_lexical=False)
    yield memory, fts
    await memory.close()
    await fts.close()


async def compare(memory: SqliteFtsStore, fts: SqliteFtsStore, tenant: str, texts: Sequence[str],
                  top_ks: Sequence[int], filters: Mapping[str, str] | None = None) -> int:
    compared = 0
    for text in texts:
        for top_k in top_ks:
            got = await memory.search_lexical(tenant, text, top_k, filters or {})
            want = await fts.search_lexical(tenant, text, top_k, filters or {})
            assert_same_ranking(got, want, top_k, f"{text!r} top {top_k} {filters}")
            compared += bool(want)
    return compared


async def test_in_memory_ranking_equals_fts5(stores: tuple[SqliteFtsStore, SqliteFtsStore]) -> None:
    memory, fts = stores
    await memory.upsert(A, synthetic_corpus(1))
    texts = queries(2, 150)
    matched = await compare(memory, fts, A, texts, (1, 7, 50, 10_000))
    assert matched > 400  # the queries do find things: the comparison is not vacuous
    assert await memory.lexical_tenants() == [A]
    # Phrases and stemming rank as FTS5 ranks them (spot checks that the data means something).
    hits = await memory.search_lexical(A, "exit facility", 3, {})
    assert hits[0].document_id == "phrases"
    assert {h.document_id for h in await memory.search_lexical(A, "cafe", 50, {})} >= {"diacritics"}
    assert await memory.search_lexical(A, "zzz unknownword", 10, {}) == []
    # More hits than one IN (...) list reads at once.
    many = "report audit risk firm customer shall must records"
    hits = await memory.search_lexical(A, many, 10_000, {})
    assert len(hits) > 500 and len({h.chunk_id for h in hits}) == len(hits)
    assert_same_ranking(hits, await fts.search_lexical(A, many, 10_000, {}), 10_000, many)


async def test_in_memory_filters_mask_rows_but_keep_whole_table_idf(
        stores: tuple[SqliteFtsStore, SqliteFtsStore]) -> None:
    memory, fts = stores
    await memory.upsert(A, synthetic_corpus(3))
    texts = queries(4, 40)
    for filters in ({"group": "g1"}, {"group": "g2", "lang": "en"}, {"document_id": "phrases"},
                    {"group": "nope"}):
        await compare(memory, fts, A, texts, (5, 100), filters)
    assert await memory.lexical_tenants() == [A]


async def test_column_weights_rank_as_fts5(tmp_path: Path) -> None:
    weights = Bm25Params(title=1.3, section=2.0, text=0.7, k1=FTS5_BM25.k1, b=FTS5_BM25.b)
    memory = SqliteFtsStore(tmp_path, bm25=weights, lexical_settle_seconds=0)
    fts = SqliteFtsStore(tmp_path, bm25=weights, in_memory_lexical=False)
    try:
        await memory.upsert(A, synthetic_corpus(5))
        assert await compare(memory, fts, A, queries(6, 60), (10, 1000)) > 50
    finally:
        await memory.close()
        await fts.close()


async def test_index_reads_what_fts5_stores_and_refuses_long_phrases(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path)
    await store.upsert(A, synthetic_corpus(7))
    await store.close()
    conn = sqlite3.connect(tmp_path / f"{A}.sqlite", isolation_level=None)
    try:
        index = LexicalIndex.load(conn, (1.0, 1.0, 1.0))
        (rows,) = conn.execute("SELECT count(*) FROM chunks").fetchone()
        assert index.total_rows == rows == len(index.rowids)
        vocabulary = {term for (term,) in conn.execute(
            "SELECT term FROM temp.lexical_instances GROUP BY term")}
        assert set(index.terms) == vocabulary and "report" in vocabulary and "cafe" in vocabulary
        tokenizer = QueryTokenizer()
        assert tokenizer.tokens(["Reporting", "CAFÉ", f"a{SPLITTER}b", SPLITTER, "report"]) == [
            ("report",), ("cafe",), ("a", "b"), (), ("report",)]
        # Three tokens in one phrase: not answerable from pairs, the caller must ask FTS5.
        assert index.search([("report",), ("a", "b", "c")], 10) is None
        assert index.search([("report",)], 0) == []
        tokenizer.close()
    finally:
        conn.close()


async def test_a_table_made_with_another_tokenizer_is_searched_with_its_own(tmp_path: Path) -> None:
    # A file whose FTS table predates a tokenizer change: no stemming, no diacritic folding.
    conn = sqlite3.connect(tmp_path / f"{A}.sqlite")
    conn.execute("CREATE VIRTUAL TABLE chunks_fts USING fts5(title, section, text, content='chunks',"
                 " content_rowid='id', tokenize='unicode61 remove_diacritics 0')")
    conn.close()
    memory = SqliteFtsStore(tmp_path, bm25=FTS5_BM25, lexical_settle_seconds=0)
    fts = SqliteFtsStore(tmp_path, in_memory_lexical=False)
    try:
        await memory.upsert(A, synthetic_corpus(11))
        assert await compare(memory, fts, A, queries(12, 40), (10, 1000)) > 30
        found = await memory.search_lexical(A, "reporting café", 1000, {})
        assert found and all("reporting" in f"{h.title} {h.section} {h.text}".lower()
                             or "café" in f"{h.title} {h.section} {h.text}".lower() for h in found)
    finally:
        await memory.close()
        await fts.close()


async def test_changes_are_seen_and_the_index_is_rebuilt(
        stores: tuple[SqliteFtsStore, SqliteFtsStore]) -> None:
    memory, fts = stores
    await memory.upsert(A, synthetic_corpus(8))
    assert await memory.search_lexical(A, "zeppelin", 5, {}) == []
    assert await memory.lexical_tenants() == [A]

    await memory.upsert(A, [prepared("new", [(("Airships",), "A zeppelin must report its audit.")])])
    assert await memory.lexical_tenants() == []  # dropped with the write
    hits = await memory.search_lexical(A, "zeppelin audit", 10, {})
    assert hits[0].document_id == "new" and await memory.lexical_tenants() == [A]
    assert_same_ranking(hits, await fts.search_lexical(A, "zeppelin audit", 10, {}), 10, "after upsert")

    await memory.delete(A, ["new", "phrases"])
    assert await memory.lexical_tenants() == []
    assert await memory.search_lexical(A, "zeppelin", 5, {}) == []
    assert "phrases" not in {h.document_id for h in await memory.search_lexical(A, "exit facility", 100, {})}
    await compare(memory, fts, A, queries(9, 20), (10,))

    # A write by another connection (another process) is noticed too: data_version moves.
    await fts.upsert(A, [prepared("elsewhere", [((), "a blimp wrote this")])])
    assert [h.document_id for h in await memory.search_lexical(A, "blimp", 5, {})] == ["elsewhere"]


async def test_a_changing_tenant_is_served_by_fts5_until_it_settles(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path, lexical_settle_seconds=0.3)
    try:
        await store.upsert(A, synthetic_corpus(10))
        # Just written: answered by FTS5 (correctly), no rebuild mid-ingest.
        assert [h.document_id for h in await store.search_lexical(A, "exit facility", 1, {})] == ["phrases"]
        assert await store.lexical_tenants() == []
        await asyncio.sleep(0.35)
        assert [h.document_id for h in await store.search_lexical(A, "exit facility", 1, {})] == ["phrases"]
        assert await store.lexical_tenants() == [A]
    finally:
        await store.close()


async def test_erase_drops_the_index_and_tenants_stay_apart(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path, max_open_tenants=2, workers=1, lexical_settle_seconds=0)
    try:
        await store.upsert(A, [prepared("a1", [((), "alpha audit record")])])
        await store.upsert(B, [prepared("b1", [((), "bravo audit record")])])
        assert [h.document_id for h in await store.search_lexical(A, "audit", 10, {})] == ["a1"]
        assert [h.document_id for h in await store.search_lexical(B, "audit", 10, {})] == ["b1"]
        assert await store.search_lexical(A, "bravo", 10, {}) == []
        assert await store.search_lexical(B, "alpha", 10, {}) == []
        assert sorted(await store.lexical_tenants()) == [A, B]

        await store.erase(A)
        assert await store.lexical_tenants() == [B]
        assert not any(path.exists() for path in store.files(A))
        assert await store.search_lexical(A, "audit", 10, {}) == []
        assert await store.lexical_tenants() == [B]  # a read never re-creates an erased tenant

        # Memory follows the open tenants: an evicted tenant's index goes with its connection.
        for name in ("c-1", "c-2"):
            await store.upsert(name, [prepared("x", [((), "charlie audit")])])
            await store.search_lexical(name, "audit", 1, {})
        assert B not in await store.lexical_tenants() and len(await store.lexical_tenants()) <= 2
    finally:
        await store.close()


@pytest.mark.skipif(not (DATA / "corpus.jsonl").exists(), reason="ObliQA data not present")
async def test_obliqa_top_100_equals_fts5(tmp_path: Path) -> None:
    passages = (await asyncio.to_thread(read_corpus, DATA / "corpus.jsonl"))[:2000]
    with (DATA / "queries.jsonl").open(encoding="utf-8") as file:
        texts = [json.loads(line)["text"] for line in file][:200]
    memory = SqliteFtsStore(tmp_path, bm25=FTS5_BM25, lexical_settle_seconds=0)
    fts = SqliteFtsStore(tmp_path, in_memory_lexical=False)
    engine = RetrievalEngine(memory)  # no embedder: the lexical index is under test
    try:
        await engine.ingest("obliqa", [DocumentInput(p.doc_id, p.title, p.text, metadata=p.metadata)
                                       for p in passages])
        assert await compare(memory, fts, "obliqa", texts, (100,)) > 150
        assert await memory.lexical_tenants() == ["obliqa"]
    finally:
        await engine.close()
        await memory.close()
        await fts.close()


async def test_default_k1_and_b_score_by_the_bm25_formula(tmp_path: Path) -> None:
    """The store's own k1 0.9 and b 0.4 (not FTS5's): scores recomputed here from counts."""
    store = SqliteFtsStore(tmp_path, lexical_settle_seconds=0)
    texts = {"short": "audit", "long": "audit risk firm firm firm firm firm firm", "none": "risk firm",
             "twice": "audit audit risk"}
    try:
        await store.upsert(A, [prepared(doc_id, [((), text)]) for doc_id, text in texts.items()])
        hits = await store.search_lexical(A, "audit", 10, {})
        k1, b = 0.9, 0.4
        lengths = {doc_id: len(text.split()) for doc_id, text in texts.items()}
        avgdl = sum(lengths.values()) / len(lengths)
        idf = math.log((4 - 3 + 0.5) / (3 + 0.5))  # negative: floored to 1e-6 as in FTS5
        idf = idf if idf > 0 else 1e-6
        want = {doc_id: idf * (tf * (k1 + 1)) / (tf + k1 * (1 - b + b * lengths[doc_id] / avgdl))
                for doc_id, tf in (("short", 1), ("long", 1), ("twice", 2))}
        assert {hit.document_id: hit.score for hit in hits} == pytest.approx(want, rel=1e-9)
        # A rarer term, where idf is positive and length normalisation orders the hits.
        hits = await store.search_lexical(A, "audit risk", 10, {})
        assert [hit.document_id for hit in hits][:1] == ["twice"]
        fts_store = SqliteFtsStore(tmp_path, in_memory_lexical=False)
        try:
            fts = await fts_store.search_lexical(A, "audit", 10, {})
        finally:
            await fts_store.close()
        # FTS5's bm25() (k1 1.2, b 0.75) ranks the same rows with other scores.
        assert {hit.document_id for hit in fts} == set(want)
        assert {hit.document_id: hit.score for hit in fts} != pytest.approx(want, rel=1e-6)
    finally:
        await store.close()


def test_bm25_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="k1"):
        Bm25Params(k1=-1)
    with pytest.raises(ValueError, match="b=2"):
        Bm25Params(b=2)


async def test_a_provisioned_tenant_without_documents_finds_nothing(tmp_path: Path) -> None:
    store = SqliteFtsStore(tmp_path, lexical_settle_seconds=0)
    try:
        await store.provision(A)
        assert await store.search_lexical(A, "anything at all", 10, {}) == []
        assert await store.rank_lexical(A, "anything", 10, {}) == []
        # And after its only document is deleted again.
        await store.upsert(A, [prepared("d", [((), "audit risk")])])
        await store.delete(A, ["d"])
        assert await store.search_lexical(A, "audit", 10, {}) == []
    finally:
        await store.close()
