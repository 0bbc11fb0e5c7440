"""`copilot eval DIR --split dev|test`: retrieval quality on a BEIR folder, through the edge.

Ingests DIR/corpus.jsonl into a tenant through the public API (StreamIngestDocuments;
documents already indexed with the same content come back UNCHANGED and cost nothing),
runs the split's queries (DIR/qrels/SPLIT.tsv) through Search one at a time, and prints
nDCG@10, Recall@10, Recall@100, MRR@10 and latency p50/p99 as one JSON object on the last
line. Relevance is judged per document: hits of several chunks of one document count once.

The corpus is read by `copilot_cli.documents.read_corpus`, the reader `copilot ingest` uses
(heading-path titles for passage corpora such as ObliQA), so the evaluated index is the one a
user's ingest would build.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from copilot.v1 import common_pb2, retrieval_pb2, tenant_pb2
from copilot_cli.client import Client, CliError, operator_token, token_for
from copilot_cli.documents import Passage, read_corpus
from servers.common.retry import Backoff, retry, transient
from servers.common.settings import Settings

MODES = {"bm25": retrieval_pb2.SEARCH_MODE_BM25, "dense": retrieval_pb2.SEARCH_MODE_DENSE,
         "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID, "default": retrieval_pb2.SEARCH_MODE_UNSPECIFIED}
FUSIONS = {"rrf": retrieval_pb2.FUSION_METHOD_RECIPROCAL_RANK,
           "relative": retrieval_pb2.FUSION_METHOD_RELATIVE_SCORE}
DEFAULT_TENANT = "eval-beir"
DEPTH = 100
# Searches refused by a rate limit the edge has not yet seen raised: retried for ten seconds or so.
RATE_LIMIT_RETRY = Backoff(base_s=0.25, cap_s=1.0, max_attempts=21)


# -- data ---------------------------------------------------------------------------------------

def read_queries(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8") as fh:
        return {str(row["_id"]): str(row["text"]) for row in map(json.loads, filter(str.strip, fh))}


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3 or (number == 0 and not fields[2].lstrip("-").isdigit()):
                continue
            if int(fields[2]) > 0:
                qrels.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    return qrels


# -- metrics ------------------------------------------------------------------------------------

def ranked_documents(document_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(document_ids))


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum((2 ** relevant.get(doc, 0) - 1) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal_gains = sorted(relevant.values(), reverse=True)[:k]
    ideal = sum((2 ** gain - 1) / math.log2(rank + 2) for rank, gain in enumerate(ideal_gains))
    return dcg / ideal if ideal else 0.0


def recall_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    return len(set(ranked[:k]) & relevant.keys()) / len(relevant) if relevant else 0.0


def mrr_at(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    for rank, doc in enumerate(ranked[:k], start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


@dataclass
class Scores:
    ndcg10: float = 0.0
    recall10: float = 0.0
    recall100: float = 0.0
    mrr10: float = 0.0
    count: int = 0

    def add(self, ranked: list[str], relevant: dict[str, int]) -> None:
        self.ndcg10 += ndcg_at(ranked, relevant, 10)
        self.recall10 += recall_at(ranked, relevant, 10)
        self.recall100 += recall_at(ranked, relevant, 100)
        self.mrr10 += mrr_at(ranked, relevant, 10)
        self.count += 1

    def summary(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"ndcg@10": round(self.ndcg10 / n, 4), "recall@10": round(self.recall10 / n, 4),
                "recall@100": round(self.recall100 / n, 4), "mrr@10": round(self.mrr10 / n, 4)}


# -- through the edge ---------------------------------------------------------------------------

async def ensure_tenant(operator: Client, tenant: str) -> bool:
    """Creates the eval tenant on the enterprise plan if missing, with limits far above
    what one client sends (evaluation must measure retrieval, not the rate limiter)."""
    try:
        response = await operator.tenants.CreateTenant(
            tenant_pb2.CreateTenantRequest(tenant_id=tenant, display_name="retrieval evaluation",
                                           plan=common_pb2.PLAN_ENTERPRISE), metadata=operator.metadata, timeout=10)
        record = response.tenant
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        record = (await operator.tenants.GetTenant(tenant_pb2.GetTenantRequest(tenant_id=tenant),
                                                   metadata=operator.metadata, timeout=10)).tenant
    wanted = {"requests_per_second": 1_000_000, "requests_per_minute": 60_000_000,
              "requests_per_hour": 1_000_000_000, "max_documents": 10_000_000}
    paths = [f"limits.{name}" for name, value in wanted.items() if getattr(record.limits, name) < value]
    if not paths:
        return False
    if paths:
        for name, value in wanted.items():
            setattr(record.limits, name, value)
        await operator.tenants.UpdateTenant(
            tenant_pb2.UpdateTenantRequest(tenant=record, update_mask=field_mask_pb2.FieldMask(paths=paths)),
            metadata=operator.metadata, timeout=10)
    return True


async def ingest(client: Client, passages: list[Passage], source: str, batch: int = 256,
                 progress: bool = True) -> dict[str, int]:
    from tqdm import tqdm

    counts: dict[str, int] = {}
    bar = tqdm(total=len(passages), unit="doc", disable=not progress, file=sys.stderr, desc="ingest")

    async def batches() -> AsyncIterator[retrieval_pb2.StreamIngestDocumentsRequest]:
        for start in range(0, len(passages), batch):
            yield retrieval_pb2.StreamIngestDocumentsRequest(
                documents=[p.to_document(source) for p in passages[start:start + batch]])

    try:
        async for ack in client.retrieval.StreamIngestDocuments(batches(), metadata=client.metadata):
            for result in ack.results:
                name = retrieval_pb2.IngestStatus.Name(result.status).removeprefix("INGEST_STATUS_").lower()
                counts[name] = counts.get(name, 0) + 1
            bar.update(len(ack.results))
    finally:
        bar.close()
    return counts


def search_request(query: str, mode: str, top_k: int, alpha: float | None = None,
                   fusion: str | None = None) -> retrieval_pb2.SearchRequest:
    request = retrieval_pb2.SearchRequest(query=query, top_k=top_k, mode=MODES[mode])
    if alpha is not None:
        request.alpha = alpha
    if fusion is not None:
        request.fusion = FUSIONS[fusion]
    return request


async def evaluate(client: Client, queries: dict[str, str], qrels: dict[str, dict[str, int]], mode: str,
                   alpha: float | None = None, fusion: str | None = None, limit: int | None = None,
                   progress: bool = True) -> dict[str, object]:
    from tqdm import tqdm

    scores = Scores()
    latencies: list[float] = []
    modes_seen: set[str] = set()
    ids = [query_id for query_id in sorted(qrels) if query_id in queries][:limit]
    for query_id in tqdm(ids, unit="q", disable=not progress, file=sys.stderr, desc=f"search {mode}"):
        request = search_request(queries[query_id], mode, DEPTH, alpha, fusion)
        async def timed(request: retrieval_pb2.SearchRequest = request) -> tuple[retrieval_pb2.SearchResponse, float]:
            # The attempt that answered: waits for the rate limit are not latency.
            began = time.perf_counter()
            response = await client.retrieval.Search(request, metadata=client.metadata, timeout=30)
            return response, (time.perf_counter() - began) * 1000

        # The edge may still apply the limits it cached before they were raised.
        response, latency_ms = await retry(timed, RATE_LIMIT_RETRY,
                                           retryable=transient({grpc.StatusCode.RESOURCE_EXHAUSTED}))
        latencies.append(latency_ms)
        modes_seen.add(retrieval_pb2.SearchMode.Name(response.mode).removeprefix("SEARCH_MODE_").lower())
        scores.add(ranked_documents(hit.document_id for hit in response.hits), qrels[query_id])
    return {"mode": mode, "mode_ran": sorted(modes_seen), "queries": scores.count, **scores.summary(),
            "latency_p50_ms": round(percentile(latencies, 50), 2),
            "latency_p99_ms": round(percentile(latencies, 99), 2)}


@dataclass(frozen=True, slots=True)
class BeirFolder:
    corpus: Path
    queries: Path
    qrels: Path

    @classmethod
    def at(cls, directory: Path, split: str) -> BeirFolder:
        folder = cls(directory / "corpus.jsonl", directory / "queries.jsonl", directory / "qrels" / f"{split}.tsv")
        for path in (folder.corpus, folder.queries, folder.qrels):
            if not path.is_file():
                raise CliError(f"{path}: missing (expected a BEIR folder with corpus.jsonl, queries.jsonl,"
                               f" qrels/{split}.tsv)")
        return folder

    def passages(self) -> Iterator[Passage]:
        yield from read_corpus(self.corpus)


# -- CLI ----------------------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("eval", help="retrieval quality on a BEIR folder, through the edge (JSON last line)")
    parser.add_argument("directory", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")
    parser.add_argument("--tenant", default=DEFAULT_TENANT, help=f"tenant to ingest into (default: {DEFAULT_TENANT})")
    parser.add_argument("--mode", choices=["bm25", "dense", "hybrid"], default="hybrid")
    parser.add_argument("--alpha", type=float, help="dense weight for hybrid (default: the tenant's)")
    parser.add_argument("--fusion", choices=sorted(FUSIONS), help="hybrid fusion (default: the tenant's)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N queries (by id)")
    parser.add_argument("--no-ingest", action="store_true", help="search only; the corpus is already ingested")
    parser.add_argument("--token", help="use this JWT (roles member,admin) instead of minting one")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    folder = BeirFolder.at(args.directory, args.split)
    passages, queries, qrels = await asyncio.to_thread(
        lambda: (read_corpus(folder.corpus), read_queries(folder.queries), read_qrels(folder.qrels)))
    if not qrels:
        raise CliError(f"{folder.qrels}: no relevance judgements")
    result: dict[str, object] = {"tenant": args.tenant, "split": args.split}
    if not args.token:
        operator = Client.connect(operator_token(settings))
        try:
            raised = await ensure_tenant(operator, args.tenant)
        finally:
            await operator.close()
        if raised:  # the edge caches plan limits for this long
            await asyncio.sleep(settings.tenant_cache_ttl_s + 1)
    client = Client.connect(token_for(settings, args.tenant, "cli-eval", ["member", "admin"], args.token))
    try:
        if not args.no_ingest:
            started = time.perf_counter()
            result["ingest"] = await ingest(client, passages, folder.corpus.name)
            result["ingest_s"] = round(time.perf_counter() - started, 1)
        result.update(await evaluate(client, queries, qrels, args.mode, args.alpha, args.fusion, args.limit))
    finally:
        await client.close()
    print(json.dumps(result))
    return 0
