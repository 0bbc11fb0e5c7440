"""`make bench-retrieval`: retrieval quality and speed on a BEIR folder, one run.

  python -m bench.retrieval [--data ../shared/data/obliqa-dev] [--split dev] [--limit N]

1. The embedding model's own throughput, alone: MiniLM encodes a fixed sample of the
   corpus's passages in this process before anything else runs (sentences/s).
2. A fresh mesh (Envoy included) on free ports with the default embedder and the result
   and embedding caches switched off, so every search below does the full work.
3. Ingestion of the whole corpus through the edge (StreamIngestDocuments), timed; the
   pipeline's chunks/s against the model's sentences/s from step 1.
4. BM25, dense and hybrid side by side: nDCG@10, Recall@10/100, MRR@10 over the split's
   queries (top 100 each), then search latency p50/p99 through the edge at one client
   with top_k 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from copilot_cli import eval as beir
from copilot_cli.client import Client
from copilot_cli.documents import Passage, read_corpus
from copilot_cli.supervisor import Mesh, settings_on_free_ports
from servers.common.settings import Settings
from servers.retrieval.chunker import chunk_document
from servers.retrieval.embedders import MiniLmEmbedder
from servers.retrieval.engine import embedding_text

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "obliqa-dev"
MODES = ("bm25", "dense", "hybrid")


async def model_throughput(passages: list[Passage], sample: int) -> dict[str, float]:
    # Exactly the texts the pipeline embeds: the chunks' own text.
    texts = [embedding_text(c.text) for p in passages for c in chunk_document(p.doc_id, p.text)]
    chosen = random.Random(7).sample(texts, min(sample, len(texts)))
    embedder = MiniLmEmbedder()
    started = time.perf_counter()
    await embedder.embed(["warm up"])
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    await embedder.embed(chosen)
    elapsed = time.perf_counter() - started
    await embedder.close()
    return {"model_load_s": round(load_s, 1), "model_sentences": len(chosen),
            "model_sentences_per_s": round(len(chosen) / elapsed, 1), "corpus_chunks": len(texts)}


async def latency(client: Client, queries: list[str], mode: str, top_k: int) -> dict[str, float]:
    times: list[float] = []
    for text in queries:
        started = time.perf_counter()
        await client.retrieval.Search(beir.search_request(text, mode, top_k), metadata=client.metadata, timeout=30)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(beir.percentile(times, 50), 2), "p99_ms": round(beir.percentile(times, 99), 2),
            "n": len(times)}


async def bench(args: argparse.Namespace) -> dict[str, object]:
    folder = beir.BeirFolder.at(args.data, args.split)
    passages = read_corpus(folder.corpus)
    queries = beir.read_queries(folder.queries)
    qrels = beir.read_qrels(folder.qrels)
    report: dict[str, object] = {"machine": f"{platform.machine()}, {platform.python_version()}",
                                 "data": str(args.data), "split": args.split}
    report.update(await model_throughput(passages, args.model_sample))
    print(json.dumps(report), flush=True)

    with tempfile.TemporaryDirectory(prefix="copilot-bench-retrieval-") as tmp:
        settings = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=2.0)
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0", "COPILOT_RETRIEVAL_RESULT_CACHE": "0",
                                         "COPILOT_RETRIEVAL_EMBEDDING_CACHE": "0"})
        issuer = mesh.start(timeout_s=180)
        try:
            tenant = "bench-retrieval"
            operator = Client.connect(issuer.mint("platform", "bench", ["operator"]), mesh.edge_address)
            try:
                await beir.ensure_tenant(operator, tenant)
            finally:
                await operator.close()
            await asyncio.sleep(settings.tenant_cache_ttl_s + 1)  # the edge picks up the raised limits
            client = Client.connect(issuer.mint(tenant, "bench", ["member", "admin"]), mesh.edge_address)
            try:
                started = time.perf_counter()
                counts = await beir.ingest(client, passages, folder.corpus.name, progress=args.progress)
                ingest_s = time.perf_counter() - started
                report["ingest"] = counts
                report["ingest_s"] = round(ingest_s, 1)
                pipeline = report["corpus_chunks"] / ingest_s  # type: ignore[operator]
                report["pipeline_chunks_per_s"] = round(pipeline, 1)
                report["pipeline_vs_model"] = round(pipeline / report["model_sentences_per_s"], 3)  # type: ignore[operator]
                print(json.dumps({k: report[k] for k in ("ingest", "ingest_s", "pipeline_chunks_per_s",
                                                         "pipeline_vs_model")}), flush=True)
                results: dict[str, object] = {}
                for mode in MODES:
                    results[mode] = await beir.evaluate(client, queries, qrels, mode, limit=args.limit,
                                                        progress=args.progress)
                    print(json.dumps(results[mode]), flush=True)
                for spec in filter(None, args.sweep.split(",")):
                    fusion, _, alpha = spec.partition(":")
                    name = f"hybrid-{fusion}-{alpha}"
                    row = await beir.evaluate(client, queries, qrels, "hybrid", float(alpha), fusion,
                                              limit=args.limit, progress=args.progress)
                    results[name] = row
                    print(json.dumps({"config": name, **row}), flush=True)
                report["quality"] = results
                sample = [queries[q] for q in sorted(qrels) if q in queries]
                sample = random.Random(11).sample(sample, min(args.latency_queries, len(sample)))
                report["latency_top10"] = {mode: await latency(client, sample, mode, 10) for mode in MODES}
            finally:
                await client.close()
        finally:
            mesh.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, help="evaluate only the first N queries")
    parser.add_argument("--model-sample", type=int, default=1500, help="passages for the model-alone throughput")
    parser.add_argument("--latency-queries", type=int, default=500)
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--sweep", default="", help="extra hybrid configs, e.g. relative:0.3,rrf:0.5")
    report = asyncio.run(bench(parser.parse_args()))
    quality = report.pop("quality")
    lat = report.pop("latency_top10")
    print("\nconfig  nDCG@10  R@10    R@100   MRR@10  p50 ms  p99 ms   (latency: top_k 10, one client, via Envoy)")
    for mode, q in quality.items():  # type: ignore[attr-defined]
        lm = lat.get(mode, {"p50_ms": float("nan"), "p99_ms": float("nan")})  # type: ignore[attr-defined]
        print(f"{mode:7} {q['ndcg@10']:.4f}   {q['recall@10']:.4f}  {q['recall@100']:.4f}  {q['mrr@10']:.4f}  "
              f"{lm['p50_ms']:6.2f}  {lm['p99_ms']:6.2f}")
    print(json.dumps({**report, "quality": quality, "latency_top10": lat}))


if __name__ == "__main__":
    main()
