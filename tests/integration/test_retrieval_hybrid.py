"""Hybrid retrieval through the real edge: modes reported honestly, per-tenant defaults,
isolation under concurrent identical queries, erasure on tenant deletion, `copilot eval`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from copilot.v1 import common_pb2, retrieval_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from copilot.v1 import retrieval_pb2 as pb
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration


def _docs(tenant: str) -> list[pb.Document]:
    return [
        pb.Document(document_id="travel", title="Travel policy", metadata={"owner": tenant},
                    text=f"Flights for {tenant} must be booked through the travel desk at least 14 days ahead."),
        pb.Document(document_id="gifts", title="Gifts and hospitality",
                    text="Gifts above 100 EUR must be declared to Compliance within five working days."),
    ]


def _direct(tenant: str, roles: str = "member") -> tuple[tuple[str, str], ...]:
    """Identity headers as Envoy sets them, for calls straight to the retrieval server
    (ConfigureSearch is not routed by the edge's RBAC policy yet)."""
    return (("x-tenant-id", tenant), ("x-user-id", "alice"), ("x-roles", roles))


async def _dense_available(direct: retrieval_pb2_grpc.RetrievalServiceAsyncStub, tenant: str) -> bool:
    # The mesh waits for retrieval to be SERVING, which needs the embedder loaded.
    response = await direct.ConfigureSearch(pb.ConfigureSearchRequest(), metadata=_direct(tenant), timeout=10)
    return response.dense_available


async def test_modes_defaults_and_isolation(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    # Enterprise: the concurrent rounds below stay far under its per-second limit.
    tenants = [await create_tenant(mesh, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="hyb") for _ in range(6)]
    for tenant in tenants:
        await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=_docs(tenant)),
                                   metadata=mesh.auth(tenant, ("member", "admin")), timeout=60)
    direct_channel = grpc.aio.insecure_channel(f"{mesh.settings.host}:{mesh.settings.retrieval_port}")
    direct: retrieval_pb2_grpc.RetrievalServiceAsyncStub = retrieval_pb2_grpc.RetrievalServiceStub(
        direct_channel)
    dense = await _dense_available(direct, tenants[0])
    expected = pb.SEARCH_MODE_HYBRID if dense else pb.SEARCH_MODE_BM25

    # Identical queries from every tenant at once, twice (the second round from the caches),
    # a second apart: a tenant created moments ago may still get the free plan's 5/s at the edge.
    for round_number in range(2):
        if round_number:
            await asyncio.sleep(1.1)
        calls = [(tenant, mode) for tenant in tenants
                 for mode in (pb.SEARCH_MODE_UNSPECIFIED, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID)]
        responses = await asyncio.gather(*(
            stub.Search(pb.SearchRequest(query="booking flights travel desk", mode=mode, top_k=5),
                        metadata=mesh.auth(tenant), timeout=10) for tenant, mode in calls))
        for (tenant, mode), response in zip(calls, responses, strict=True):
            assert response.hits[0].document_id == "travel"
            assert response.mode == (expected if mode != pb.SEARCH_MODE_DENSE or not dense else pb.SEARCH_MODE_DENSE)
            for hit in response.hits:
                assert all(other not in hit.text for other in tenants if other != tenant)
                assert hit.metadata.get("owner", tenant) == tenant

    # A tenant default, read back and applied; members may read but not change it.
    await asyncio.sleep(1.1)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await direct.ConfigureSearch(pb.ConfigureSearchRequest(default_alpha=0.9), metadata=_direct(tenants[0]))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        configured = await direct.ConfigureSearch(
            pb.ConfigureSearchRequest(default_alpha=0.25, default_fusion=pb.FUSION_METHOD_RECIPROCAL_RANK),
            metadata=_direct(tenants[0], "member,admin"), timeout=10)
        assert configured.settings.default_alpha == pytest.approx(0.25)
        assert configured.effective.default_fusion == pb.FUSION_METHOD_RECIPROCAL_RANK
        other = await direct.ConfigureSearch(pb.ConfigureSearchRequest(), metadata=_direct(tenants[1]), timeout=10)
        assert not other.settings.HasField("default_alpha")
    finally:
        await direct_channel.close(None)
    response = await stub.Search(pb.SearchRequest(query="gifts declared"), metadata=mesh.auth(tenants[0]), timeout=10)
    if dense:
        assert response.fusion == pb.FUSION_METHOD_RECIPROCAL_RANK and response.alpha == pytest.approx(0.25)

    # Bad requests: unknown filter key, out-of-range top_k, empty query.
    for request, field in ((pb.SearchRequest(query="x", filters={"ownr": "a"}), "ownr"),
                           (pb.SearchRequest(query="x", top_k=10_000), "top_k"),
                           (pb.SearchRequest(query="  "), "query")):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Search(request, metadata=mesh.auth(tenants[1]), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (bad.value.details() or "")


async def test_tenant_deletion_erases_chunks_and_vectors_on_disk(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    tenant = await create_tenant(mesh, channel, prefix="gone")
    await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=_docs(tenant)),
                               metadata=mesh.auth(tenant, ("member", "admin")), timeout=60)
    await stub.Search(pb.SearchRequest(query="gifts"), metadata=mesh.auth(tenant), timeout=10)
    root = mesh.settings.data_dir / "retrieval"
    assert [p for p in root.rglob("*") if tenant in p.name]
    await tenant_pb2_grpc.TenantServiceStub(channel).DeleteTenant(
        tenant_pb2.DeleteTenantRequest(tenant_id=tenant), metadata=mesh.operator(), timeout=10)
    assert [p for p in root.rglob("*") if tenant in p.name] == []


def _write_beir(folder: Path) -> None:
    (folder / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "h1", "title": "", "text": "Customer Due Diligence", "metadata": {"DocumentID": 1, "PassageID": "1."}},
        {"_id": "p1", "title": "", "text": "Records of identity checks must be kept for five years.",
         "metadata": {"DocumentID": 1, "PassageID": "1.1"}},
        {"_id": "p2", "title": "", "text": "Gifts above 100 EUR must be declared.",
         "metadata": {"DocumentID": 2, "PassageID": "1.1"}},
    ]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    (folder / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "How long are due diligence records kept?"}) + "\n"
        + json.dumps({"_id": "q2", "text": "Which gifts must be declared?"}) + "\n")
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tp1\t1\nq2\tp2\t1\n")


async def test_copilot_eval_prints_metrics_as_json(mesh: RunningMesh, tmp_path: Path) -> None:
    folder = tmp_path / "beir"
    _write_beir(folder)
    env = {**os.environ, "COPILOT_EDGE": mesh.edge, "COPILOT_DATA_DIR": str(mesh.settings.data_dir),
           "COPILOT_JWT_ISSUER": mesh.settings.jwt_issuer, "COPILOT_JWT_AUDIENCE": mesh.settings.jwt_audience,
           "COPILOT_TENANT_CACHE_TTL_S": str(mesh.settings.tenant_cache_ttl_s)}
    for _ in range(2):  # the second run finds everything already ingested
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "copilot_cli.main", "eval", str(folder), "--split", "dev",
                             "--tenant", "eval-small", "--mode", "hybrid"],
            capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["queries"] == 2 and report["ndcg@10"] == 1.0 and report["recall@100"] == 1.0
        assert {"mrr@10", "recall@10", "latency_p50_ms", "latency_p99_ms"} <= report.keys()
    assert report["ingest"] == {"unchanged": 2, "empty": 1}
