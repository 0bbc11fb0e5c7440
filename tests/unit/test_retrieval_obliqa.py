"""BM25 quality guard on real regulatory passages (ObliQA dev, BEIR layout).

Skipped where the data folder is absent. A sample of the questions keeps it fast; the
full-split figures come from `copilot eval` (issue 3).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import pytest

from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.models import DocumentInput, IngestStatus, SearchQuery
from servers.retrieval.store import SqliteFtsStore

DATA = Path(os.environ.get("COPILOT_OBLIQA_DIR")
            or Path(__file__).resolve().parents[3] / "shared" / "data" / "obliqa-dev")
SAMPLE = 400

pytestmark = pytest.mark.skipif(not (DATA / "corpus.jsonl").exists(), reason="ObliQA data not present")


def _load() -> tuple[list[DocumentInput], dict[str, str], dict[str, set[str]]]:
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as corpus:
        documents = [
            DocumentInput(document_id=row["_id"], title=row.get("title", ""), text=row["text"],
                          metadata={k: str(v) for k, v in row.get("metadata", {}).items()})
            for row in map(json.loads, corpus)
        ]
    with (DATA / "queries.jsonl").open(encoding="utf-8") as queries_file:
        queries = {row["_id"]: row["text"] for row in map(json.loads, queries_file)}
    qrels: dict[str, set[str]] = {}
    with (DATA / "qrels" / "dev.tsv").open(encoding="utf-8") as qrels_file:
        next(qrels_file)
        for line in qrels_file:
            query_id, doc_id, _ = line.rstrip("\n").split("\t")
            qrels.setdefault(query_id, set()).add(doc_id)
    return documents, queries, qrels


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
