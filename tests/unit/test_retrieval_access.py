"""Document access labels, enforced inside each store (embedded SQLite, Weaviate on the fake
and, with WEAVIATE_URL, a real one) through the RetrievalEngine: a restricted document never
takes a top_k place from a permitted one, in every mode; users and groups; no labels = the
whole tenant; relabelling without re-embedding, applied on the next search."""

from __future__ import annotations

from pathlib import Path

import pytest

from servers.retrieval.access import AccessLabelError, Reader, parse_labels
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.models import DocumentInput, IngestStatus, SearchMode, SearchQuery
from servers.retrieval.stores.base import DocumentStore
from servers.retrieval.stores.sqlite import SqliteFtsStore
from tests.unit.retrieval_support import hash_engine
from tests.unit.test_retrieval_store_contract import engine, fake, store  # noqa: F401  (fixtures)

A = "tenant-a"
NOBODY = Reader("bob")
HR = Reader("carol", frozenset({"hr"}))
ALICE = Reader("alice")
MODES = [SearchMode.BM25, SearchMode.DENSE, SearchMode.HYBRID]

# The investigation is the best match for "misconduct investigation" in every mode: it repeats
# the query's words; the two public documents each mention them once.
CORPUS = [
    DocumentInput("investigation", text="Misconduct investigation: misconduct investigation of the trading desk.",
                  title="Misconduct investigation", access=frozenset({"group:hr", "user:alice"})),
    DocumentInput("policy", text="The misconduct policy explains how staff report concerns.", title="Policy"),
    DocumentInput("handbook", text="An investigation follows every report under the handbook.", title="Handbook"),
]
QUERY = "misconduct investigation"


async def found(searcher: RetrievalEngine, reader: Reader, mode: SearchMode, top_k: int = 2,
                text: str = QUERY) -> tuple[list[str], int]:
    result = await searcher.search(A, SearchQuery(text, top_k=top_k, mode=mode), reader)
    return [hit.document_id for hit in result.hits], result.withheld


@pytest.mark.parametrize("mode", MODES)
async def test_restricted_best_match_takes_no_slot(engine: RetrievalEngine, mode: SearchMode) -> None:  # noqa: F811
    await engine.ingest(A, CORPUS)
    hits, withheld = await found(engine, NOBODY, mode)
    assert sorted(hits) == ["handbook", "policy"]  # both places go to permitted documents
    assert withheld == 1
    for reader in (HR, ALICE):  # a group of the label, or the user it names
        hits, withheld = await found(engine, reader, mode)
        assert hits[0] == "investigation" and len(hits) == 2 and withheld == 0


@pytest.mark.parametrize("mode", MODES)
async def test_no_labels_is_the_whole_tenant(engine: RetrievalEngine, mode: SearchMode) -> None:  # noqa: F811
    await engine.ingest(A, [DocumentInput(d.document_id, text=d.text, title=d.title) for d in CORPUS])
    hits, withheld = await found(engine, NOBODY, mode, top_k=3)
    assert sorted(hits) == ["handbook", "investigation", "policy"] and withheld == 0
    # A reader that names nobody (tools) reads the unrestricted documents too.
    assert len((await engine.search(A, SearchQuery(QUERY, top_k=3, mode=mode))).hits) == 3


async def test_hits_carry_their_labels(engine: RetrievalEngine) -> None:  # noqa: F811
    await engine.ingest(A, CORPUS)
    hits = (await engine.search(A, SearchQuery(QUERY, top_k=3, mode=SearchMode.BM25), HR)).hits
    labels = {hit.document_id: hit.access for hit in hits}
    assert labels["investigation"] == ("group:hr", "user:alice") and labels["policy"] == ()


async def test_relabelling_applies_on_the_next_search_and_keys_the_cache(
        engine: RetrievalEngine, store: DocumentStore) -> None:  # noqa: F811
    await engine.ingest(A, CORPUS)
    # Warmed by a privileged reader first: an unprivileged one must not get that entry.
    assert (await found(engine, HR, SearchMode.BM25))[0][0] == "investigation"
    hits, withheld = await found(engine, NOBODY, SearchMode.BM25)
    assert "investigation" not in hits and withheld == 1
    # SetDocumentAccess: no labels (the whole tenant), then only legal.
    change = await engine.set_access(A, {"investigation": frozenset(), "missing": frozenset()})
    assert change.updated == ("investigation",) and change.not_found == ("missing",)
    assert (await found(engine, NOBODY, SearchMode.BM25))[0][0] == "investigation"
    await engine.set_access(A, {"investigation": frozenset({"group:legal"})})
    assert "investigation" not in (await found(engine, HR, SearchMode.BM25))[0]
    assert (await engine.set_access(A, {"investigation": frozenset({"group:legal"})})).unchanged == ("investigation",)


async def test_reingest_with_other_labels_relabels_without_reindexing(engine: RetrievalEngine) -> None:  # noqa: F811
    await engine.ingest(A, CORPUS)
    opened = DocumentInput(CORPUS[0].document_id, text=CORPUS[0].text, title=CORPUS[0].title)
    results = await engine.ingest(A, [opened])
    assert results[0].status is IngestStatus.UNCHANGED
    assert (await found(engine, NOBODY, SearchMode.BM25))[0][0] == "investigation"
    versions = await engine.store.indexed_versions(A, ["investigation"])
    assert versions["investigation"].access == frozenset()


async def test_fts5_fallback_enforces_access_too(tmp_path: Path) -> None:
    embedded = SqliteFtsStore(tmp_path / "tenants", in_memory_lexical=False)
    try:
        searcher = hash_engine(embedded)
        await searcher.ingest(A, CORPUS)
        hits, withheld = await found(searcher, NOBODY, SearchMode.BM25)
        assert sorted(hits) == ["handbook", "policy"] and withheld == 1
        assert (await found(searcher, HR, SearchMode.BM25))[0][0] == "investigation"
    finally:
        await embedded.close()


async def test_the_result_cache_keys_on_the_readers_view(tmp_path: Path) -> None:
    embedded = SqliteFtsStore(tmp_path / "tenants")
    try:
        searcher = RetrievalEngine(embedded)  # with its result cache
        await searcher.ingest(A, CORPUS)
        # Warmed by a privileged reader first: not served to an unprivileged one.
        assert (await found(searcher, HR, SearchMode.BM25))[0][0] == "investigation"
        result = await searcher.search(A, SearchQuery(QUERY, top_k=2, mode=SearchMode.BM25), NOBODY)
        assert not result.cached and "investigation" not in [h.document_id for h in result.hits]
        await found(searcher, Reader("dave", frozenset({"sales"})), SearchMode.BM25)
        # Another user, with groups no document names: the same documents, the same entry.
        result = await searcher.search(A, SearchQuery(QUERY, top_k=2, mode=SearchMode.BM25),
                                     Reader("erin", frozenset({"ops"})))
        assert result.cached and result.withheld == 1
        # A label change moves the revision: no entry of before is served.
        await searcher.set_access(A, {"investigation": frozenset()})
        again = await searcher.search(A, SearchQuery(QUERY, top_k=2, mode=SearchMode.BM25), NOBODY)
        assert not again.cached and again.hits[0].document_id == "investigation"
    finally:
        await embedded.close()


def test_labels_are_validated() -> None:
    assert parse_labels([" group:hr ", "user:alice"]) == {"group:hr", "user:alice"}
    for bad in ("hr", "group:", "role:admin", "group:a,b", "user:\x00x"):
        with pytest.raises(AccessLabelError):
            parse_labels([bad])
    assert Reader("", frozenset()).may_read(frozenset()) and not Reader("").may_read(frozenset({"user:"}))
