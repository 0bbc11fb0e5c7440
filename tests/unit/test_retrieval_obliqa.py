"""BM25 quality guard on real regulatory passages (ObliQA dev, BEIR layout), and the BEIR
reader that `copilot ingest`, `copilot eval` and the retrieval bench share.

The ObliQA test is skipped where the data folder is absent. A sample of the questions keeps
it fast; the full-split figures come from `make bench-retrieval` / `copilot eval` (issue 3).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import pytest

from copilot_cli.documents import DocumentError, read, read_corpus
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.models import DocumentInput, IngestStatus, SearchQuery
from servers.retrieval.stores.sqlite import SqliteFtsStore

DATA = Path(os.environ.get("COPILOT_OBLIQA_DIR")
            or Path(__file__).resolve().parents[3] / "shared" / "data" / "obliqa-dev")
SAMPLE = 400

needs_data = pytest.mark.skipif(not (DATA / "corpus.jsonl").exists(), reason="ObliQA data not present")


def _load() -> tuple[list[DocumentInput], dict[str, str], dict[str, set[str]]]:
    # The same reader as `copilot ingest` (heading-path titles from the passage ids).
    documents = [DocumentInput(document_id=p.doc_id, title=p.title, text=p.text, metadata=p.metadata)
                 for p in read_corpus(DATA / "corpus.jsonl")]
    with (DATA / "queries.jsonl").open(encoding="utf-8") as queries_file:
        queries = {row["_id"]: row["text"] for row in map(json.loads, queries_file)}
    qrels: dict[str, set[str]] = {}
    with (DATA / "qrels" / "dev.tsv").open(encoding="utf-8") as qrels_file:
        next(qrels_file)
        for line in qrels_file:
            query_id, doc_id, _ = line.rstrip("\n").split("\t")
            qrels.setdefault(query_id, set()).add(doc_id)
    return documents, queries, qrels


def test_beir_reader_titles_passages_with_their_heading_path(tmp_path: Path) -> None:
    rows = [
        {"_id": "h1", "text": "PART 1 - Customer Due Diligence", "metadata": {"DocumentID": 1, "PassageID": "1."}},
        {"_id": "h2", "text": "Records", "metadata": {"DocumentID": 1, "PassageID": "1.1"}},
        {"_id": "p1", "text": "Records must be kept for five years.",
         "metadata": {"DocumentID": 1, "PassageID": "1.1.1"}},
        {"_id": "h3", "text": "Gifts", "metadata": {"DocumentID": 1, "PassageID": "2."}},
        {"_id": "p2", "text": "Gifts above 100 EUR must be declared.",
         "metadata": {"DocumentID": 1, "PassageID": "2.1"}},
        # Another document's hierarchy starts afresh; a corpus title is kept as it is.
        {"_id": "p3", "text": "Leave goes to the manager.", "metadata": {"DocumentID": 2, "PassageID": "1.1"}},
        {"_id": "p4", "title": "Own title", "text": "Expenses need receipts.",
         "metadata": {"DocumentID": 1, "PassageID": "2.2", "source": "reserved"}},
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    titles = {p.doc_id: p.title for p in read_corpus(corpus)}
    # (A heading passage's own path ends with itself; the store drops it as heading-only.)
    assert titles == {"h1": "PART 1 - Customer Due Diligence", "h2": "PART 1 - Customer Due Diligence > Records",
                      "p1": "PART 1 - Customer Due Diligence > Records", "h3": "Gifts", "p2": "Gifts", "p3": "",
                      "p4": "Own title"}
    # `copilot ingest` reads the same passages, titles included; reserved keys are dropped.
    documents = {d.document_id: d for d in read([corpus])}
    assert documents["p1"].title == titles["p1"] and documents["p1"].source == "corpus.jsonl#p1"
    assert dict(documents["p4"].metadata) == {"DocumentID": "1", "PassageID": "2.2"}
    corpus.write_text('{"title": "no id"}\n')
    with pytest.raises(DocumentError, match=r"corpus\.jsonl:1: not a BEIR corpus line"):
        read_corpus(corpus)


@needs_data
async def test_bm25_ndcg_on_obliqa_sample(tmp_path: Path) -> None:
    documents, queries, qrels = await asyncio.to_thread(_load)
    store = SqliteFtsStore(tmp_path)
    engine = RetrievalEngine(store)
    try:
        statuses: dict[IngestStatus, int] = {}
        for start in range(0, len(documents), 1000):
            for result in await engine.ingest("eval", documents[start:start + 1000]):
                statuses[result.status] = statuses.get(result.status, 0) + 1
        # Empty and heading-only passages are reported, not indexed.
        assert statuses[IngestStatus.EMPTY] > 700

        total = 0.0
        sample = sorted(qrels)[:SAMPLE]
        for query_id in sample:
            relevant = qrels[query_id]
            hits = (await engine.search("eval", SearchQuery(queries[query_id], top_k=10))).hits
            ranked = list(dict.fromkeys(hit.document_id for hit in hits))
            dcg = sum(1 / math.log2(rank + 2) for rank, doc_id in enumerate(ranked) if doc_id in relevant)
            ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(relevant), 10)))
            total += dcg / ideal
        ndcg = total / len(sample)
        # Plain BM25 is about 0.66 on the whole split (dataset README); this fixed sample
        # measured 0.73. The margin catches a chunking or scoring regression, not noise.
        assert ndcg >= 0.68, f"nDCG@10 {ndcg:.3f}"
    finally:
        await store.close()
