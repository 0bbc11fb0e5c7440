"""Bounds on what one client may cost, through the real Envoy and on the services themselves:
per-RPC request sizes, per-tenant open streams, idle uploads, and thousands of abandoned
calls. A mesh of its own with small bounds, so each is reached in a bounded test."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2

from bench.bounds import abandon_calls
from copilot.v1 import common_pb2, generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from servers.common.errors import from_rpc_error
from servers.common.settings import KIB, MIB, Bounds
from servers.edge import envoy_config
from tests.integration.conftest import RunningMesh, create_tenant, running_mesh

pytestmark = pytest.mark.integration

BOUNDS = Bounds(query_request_bytes=4 * KIB, default_request_bytes=128 * KIB, ingest_request_bytes=1 * MIB,
                ingest_stream_message_bytes=256 * KIB, streams_per_tenant=3, streams_per_server=64,
                ingest_idle_s=4.0, edge_stream_window_bytes=64 * KIB)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    with running_mesh(tmp_path_factory, "boundsmesh", bounds=BOUNDS) as running:
        yield running


async def _ack(call: grpc.aio.StreamStreamCall[Any, retrieval_pb2.StreamIngestDocumentsResponse],
               ) -> retrieval_pb2.StreamIngestDocumentsResponse:
    """The next acknowledgement of an upload (`read()` is typed to return EOF too)."""
    return cast(retrieval_pb2.StreamIngestDocumentsResponse, await call.read())


def _reason(details: list[object]) -> str:
    return next(d.reason for d in details if isinstance(d, error_details_pb2.ErrorInfo))


def _tenant_streams(mesh: RunningMesh, service: str, tenant: str) -> float:
    url = f"http://{mesh.settings.host}:{mesh.settings.metrics_port(service)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf'^copilot_streams_open_by_tenant{{tenant="{tenant}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _no_streams_left(mesh: RunningMesh, tenants: list[str]) -> dict[str, float]:
    """Open streams of `tenants` per service, once all are 0 or after 15 s."""
    left: dict[str, float] = {}
    for _ in range(60):
        left = {f"{service}/{tenant}": await asyncio.to_thread(_tenant_streams, mesh, service, tenant)
                for service in ("retrieval", "generation") for tenant in tenants}
        if not any(left.values()):
            break
        await asyncio.sleep(0.25)
    return left


async def test_an_oversized_query_is_refused_at_the_edge_and_by_the_service(bounded: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(bounded.edge) as channel:
        tenant = await create_tenant(bounded, channel)
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        member = bounded.auth(tenant)
        await stub.Search(retrieval_pb2.SearchRequest(query="x" * 1500), metadata=member, timeout=30)
        # Envoy's buffer filter checks a body only while it buffers it: one that arrives in a
        # single read with its end (a few KiB) passes on, and the service refuses it with the
        # same code; a larger one never reaches the service.
        oversized = retrieval_pb2.SearchRequest(query="x" * 5000)
        with pytest.raises(grpc.aio.AioRpcError) as small:
            await stub.Search(oversized, metadata=member, timeout=30)
        assert small.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as at_edge:
            await stub.Search(retrieval_pb2.SearchRequest(query="x" * 200_000), metadata=member, timeout=30)
        assert at_edge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        limit = envoy_config.body_limit(BOUNDS.query_request_bytes)
        assert f"request larger than this RPC's limit at the edge ({limit} bytes" in (at_edge.value.details() or "")
        # A larger limit where the RPC needs one: an ingest batch over the default limit and
        # many times the stream window passes the edge whole.
        admin = bounded.auth(tenant, ("member", "admin"))
        words = " ".join(f"retention{i}" for i in range(16_000))
        batch = retrieval_pb2.IngestDocumentsRequest(documents=[retrieval_pb2.Document(document_id="big", text=words)])
        assert BOUNDS.default_request_bytes < batch.ByteSize() < BOUNDS.ingest_request_bytes
        done = await stub.IngestDocuments(batch, metadata=admin, timeout=120)
        assert done.results[0].document_id == "big"

    # Straight to the retrieval service, past Envoy: the service refuses it too.
    identity = (("x-tenant-id", tenant), ("x-user-id", "mallory"), ("x-roles", "member"))
    async with grpc.aio.insecure_channel(bounded.settings.address("retrieval")) as direct:
        with pytest.raises(grpc.aio.AioRpcError) as at_service:
            await retrieval_pb2_grpc.RetrievalServiceStub(direct).Search(oversized, metadata=identity, timeout=30)
    code, message, details = from_rpc_error(at_service.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over this RPC's limit of {BOUNDS.query_request_bytes} bytes (COPILOT_MAX_QUERY_REQUEST_BYTES)" in message
    assert _reason(details) == "MESSAGE_TOO_LARGE"


async def test_a_tenant_over_its_stream_limit_is_refused_while_another_streams(bounded: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(bounded.edge) as channel:
        greedy = await create_tenant(bounded, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="greedy")
        other = await create_tenant(bounded, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="other")
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        admin = bounded.auth(greedy, ("member", "admin"))
        held = []
        for _ in range(BOUNDS.streams_per_tenant):
            upload = stub.StreamIngestDocuments(None, metadata=admin, timeout=60)
            await upload.write(retrieval_pb2.StreamIngestDocumentsRequest())
            assert (await _ack(upload)).documents_done == 0
            held.append(upload)
        refused = stub.StreamIngestDocuments(None, metadata=admin, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused.write(retrieval_pb2.StreamIngestDocumentsRequest())
            await refused.read()
        code, message, details = from_rpc_error(err.value)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"already has {BOUNDS.streams_per_tenant} open streams" in message
        assert _reason(details) == "TOO_MANY_STREAMS"
        assert any(isinstance(d, error_details_pb2.QuotaFailure) for d in details)
        assert any(isinstance(d, error_details_pb2.RetryInfo) for d in details)

        # Another tenant is not held up by it.
        theirs = stub.StreamIngestDocuments(None, metadata=bounded.auth(other, ("member", "admin")), timeout=30)
        await theirs.write(retrieval_pb2.StreamIngestDocumentsRequest())
        assert (await _ack(theirs)).documents_done == 0
        await theirs.done_writing()
        assert await theirs.read() == grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

        # Streams closed (one finished, the others cancelled) are streams free again.
        await held[0].done_writing()
        assert await held[0].read() == grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
        for upload in held[1:]:
            upload.cancel()
        assert await _no_streams_left(bounded, [greedy]) == {f"{s}/{greedy}": 0.0 for s in ("retrieval", "generation")}
        again = stub.StreamIngestDocuments(None, metadata=admin, timeout=30)
        await again.write(retrieval_pb2.StreamIngestDocumentsRequest())
        assert (await _ack(again)).documents_done == 0
        again.cancel()


async def test_an_idle_upload_is_ended_by_the_service(bounded: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(bounded.edge) as channel:
        tenant = await create_tenant(bounded, channel, prefix="idle")
        upload = retrieval_pb2_grpc.RetrievalServiceStub(channel).StreamIngestDocuments(
            None, metadata=bounded.auth(tenant, ("member", "admin")), timeout=60)
        await upload.write(retrieval_pb2.StreamIngestDocumentsRequest(
            documents=[retrieval_pb2.Document(document_id="a", text="records are kept for seven years")]))
        assert (await _ack(upload)).documents_done == 1
        # Then nothing: the service ends the stream after its idle limit, well before the deadline.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload.read()
    code, message, details = from_rpc_error(err.value)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"for {BOUNDS.ingest_idle_s:g} s (COPILOT_INGEST_IDLE_S)" in message
    assert _reason(details) == "STREAM_IDLE"


async def test_abandoned_calls_leave_the_mesh_serving_with_no_streams_held(bounded: RunningMesh) -> None:
    async with grpc.aio.insecure_channel(bounded.edge) as channel:
        tenants = [await create_tenant(bounded, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="abandon")
                   for _ in range(5)]
    outcomes = await abandon_calls(bounded.edge, [bounded.auth(t, ("member", "admin")) for t in tenants], 900,
                                   hold_s=2.0)
    assert sum(outcomes.values()) == 900
    # The stream limits refused the excess at once rather than holding it.
    assert outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes
    assert await _no_streams_left(bounded, tenants) == {
        f"{s}/{t}": 0.0 for s in ("retrieval", "generation") for t in tenants}
    # Every one of those tenants, and a new one, is served normally afterwards.
    async with grpc.aio.insecure_channel(bounded.edge) as channel:
        fresh = await create_tenant(bounded, channel, prefix="after")
        for tenant in [*tenants, fresh]:
            metadata = bounded.auth(tenant)
            await retrieval_pb2_grpc.RetrievalServiceStub(channel).Search(
                retrieval_pb2.SearchRequest(query="retention"), metadata=metadata, timeout=30)
            answer = generation_pb2_grpc.GenerationServiceStub(channel).StreamAnswer(
                generation_pb2.StreamAnswerRequest(question="how long are records kept?"), metadata=metadata,
                timeout=60)
            assert [m async for m in answer]
