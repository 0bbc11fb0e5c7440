"""Lexical search in process: FTS5's bm25() in SQL against the in-memory `LexicalIndex`.

  python -m bench.lexical --index DIR --tenant obliqa-dev [--queries FILE] [--latency-queries 500]

DIR holds `<tenant>.sqlite` as the retrieval service writes it (e.g. an ObliQA tenant built
by `copilot ingest`); it is copied to a temporary folder first, so the bench never writes to
it. Reports, for one tenant:

1. the in-memory index's build time (best and median of 3) and size (its arrays, and the
   Python heap it keeps and peaks at while building, by tracemalloc);
2. `SqliteFtsStore.search_lexical` latency p50/p99 per question, one at a time, with FTS5 and
   with the in-memory index, at top_k 100 (hybrid's candidate depth) and 10 (BM25 mode);
   and the in-memory ranking alone (tokenize + score, without reading the hits' rows);
3. top-100 agreement over every question: the same chunks in the same score order (only the
   order within runs of equal scores may differ), and the largest relative score difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import shutil
import sqlite3
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

from servers.retrieval.lexical import LexicalIndex, QueryTokenizer
from servers.retrieval.models import Hit
from servers.retrieval.stores.sqlite import SqliteFtsStore, match_phrases

DEFAULT_QUERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "obliqa-dev" / "queries.jsonl"


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000

    return {"p50_ms": round(at(0.50), 3), "p99_ms": round(at(0.99), 3),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 3)}


def build_figures(path: Path) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            LexicalIndex.load(conn, (1.0, 1.0, 1.0))
            times.append(time.perf_counter() - started)
        tracemalloc.start()
        index = LexicalIndex.load(conn, (1.0, 1.0, 1.0))
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"build_best_s": round(min(times), 3), "build_median_s": round(statistics.median(times), 3),
                "rows": len(index.rowids), "terms": len(index.terms), "unigram_postings": len(index.unigrams.rows),
                "bigram_postings": len(index.bigrams.rows), "arrays_mb": round(index.nbytes / 1e6, 1),
                "heap_kept_mb": round(kept / 1e6, 1), "heap_peak_during_build_mb": round(peak / 1e6, 1)}
    finally:
        conn.close()


def ranking_only(path: Path, texts: Sequence[str], top_k: int) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        index = LexicalIndex.load(conn, (1.0, 1.0, 1.0))
        tokenizer = QueryTokenizer()
        for text in texts:  # warm the tokenizer's cache as a running server's would be
            tokenizer.tokens(match_phrases(text))
        samples = []
        for text in texts:
            started = time.perf_counter()
            index.search(tokenizer.tokens(match_phrases(text)), top_k)
            samples.append(time.perf_counter() - started)
        tokenizer.close()
        return percentiles(samples)
    finally:
        conn.close()


async def latency(store: SqliteFtsStore, tenant: str, texts: Sequence[str], top_k: int) -> dict[str, float]:
    samples = []
    for text in texts:
        started = time.perf_counter()
        await store.search_lexical(tenant, text, top_k, {})
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def runs(hits: Sequence[Hit]) -> list[set[str]]:
    grouped: list[tuple[float, set[str]]] = []
    for hit in hits:
        if grouped and math.isclose(grouped[-1][0], hit.score, rel_tol=1e-9, abs_tol=1e-12):
            grouped[-1][1].add(hit.chunk_id)
        else:
            grouped.append((hit.score, {hit.chunk_id}))
    return [ids for _, ids in grouped]


async def agreement(memory: SqliteFtsStore, fts: SqliteFtsStore, tenant: str, texts: Sequence[str],
                    top_k: int) -> dict[str, float]:
    same = same_ids = exact_scores = 0
    worst = 0.0
    for text in texts:
        got = await memory.search_lexical(tenant, text, top_k, {})
        want = await fts.search_lexical(tenant, text, top_k, {})
        got_runs, want_runs = runs(got), runs(want)
        # A run of ties cut at top_k may hold different members on each side.
        whole = len(want_runs) - (1 if len(want) == top_k else 0)
        if (len(got) == len(want) and [len(r) for r in got_runs] == [len(r) for r in want_runs]
                and got_runs[:whole] == want_runs[:whole]):
            same += 1
        same_ids += [h.chunk_id for h in got] == [h.chunk_id for h in want]
        if len(got) == len(want):
            exact_scores += all(g.score == w.score for g, w in zip(got, want, strict=True))
            for g, w in zip(got, want, strict=True):
                worst = max(worst, abs(g.score - w.score) / max(abs(w.score), 1e-300))
    return {"queries": len(texts), "same_ranking_ignoring_ties": same, "identical_id_order": same_ids,
            "bit_identical_scores": exact_scores, "max_relative_score_difference": worst}


async def bench(args: argparse.Namespace) -> dict[str, object]:
    with args.queries.open(encoding="utf-8") as file:
        texts = [json.loads(line)["text"] for line in file]
    with tempfile.TemporaryDirectory(prefix="bench-lexical-") as scratch:
        root = Path(scratch)
        source = args.index / f"{args.tenant}.sqlite"
        if not source.exists():
            raise SystemExit(f"{source} does not exist")
        for suffix in ("", "-wal"):
            if (args.index / f"{args.tenant}.sqlite{suffix}").exists():
                shutil.copy2(args.index / f"{args.tenant}.sqlite{suffix}", root / f"{args.tenant}.sqlite{suffix}")
        path = root / f"{args.tenant}.sqlite"

        report: dict[str, object] = {"machine": f"{platform.machine()} {platform.python_version()}",
                                     "sqlite": sqlite3.sqlite_version, "tenant": args.tenant}
        report["build"] = await asyncio.to_thread(build_figures, path)

        sample = texts[:args.latency_queries]
        fts = SqliteFtsStore(root, in_memory_lexical=False)
        memory = SqliteFtsStore(root, lexical_settle_seconds=0)
        try:
            for store in (fts, memory):  # open the file, build the index, warm the caches
                for text in sample[:20]:
                    await store.search_lexical(args.tenant, text, 100, {})
            lat: dict[str, object] = {}
            for top_k in (100, 10):
                lat[f"fts5_top{top_k}"] = await latency(fts, args.tenant, sample, top_k)
                lat[f"memory_top{top_k}"] = await latency(memory, args.tenant, sample, top_k)
            lat["memory_ranking_only_top100"] = await asyncio.to_thread(ranking_only, path, sample, 100)
            report["latency_in_process"] = lat
            report["agreement_top100"] = await agreement(memory, fts, args.tenant, texts, 100)
        finally:
            await memory.close()
            await fts.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="folder holding <tenant>.sqlite")
    parser.add_argument("--tenant", default="obliqa-dev")
    parser.add_argument("--queries", type=Path, default=DEFAULT_QUERIES, help="BEIR queries.jsonl")
    parser.add_argument("--latency-queries", type=int, default=500)
    print(json.dumps(asyncio.run(bench(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
