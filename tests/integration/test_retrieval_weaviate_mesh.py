"""The whole mesh with COPILOT_STORE=weaviate, against the local fake Weaviate (served from
this test process; the retrieval server's real weaviate-client reaches it over REST and
gRPC): onboarding creates the tenant's shard, ingest and search through Envoy land in it,
and deleting the tenant drops it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from copilot.v1 import common_pb2, retrieval_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from copilot.v1 import retrieval_pb2 as pb
from tests.fakes.weaviate_server import FakeWeaviate
from tests.integration.conftest import RunningMesh, create_tenant, running_mesh

pytestmark = pytest.mark.integration

CHUNKS = "CopilotChunk"


@pytest.fixture(scope="module")
def fake_weaviate() -> Iterator[FakeWeaviate]:
    with FakeWeaviate() as server:
        yield server


@pytest.fixture(scope="module")
def weaviate_mesh(tmp_path_factory: pytest.TempPathFactory, fake_weaviate: FakeWeaviate) -> Iterator[RunningMesh]:
    with running_mesh(tmp_path_factory, "mesh-weaviate", {
            "COPILOT_STORE": "weaviate", "WEAVIATE_URL": fake_weaviate.url,
            "WEAVIATE_GRPC_PORT": str(fake_weaviate.grpc_port),
            # Feature hashing: this test is about the store, not the model.
            "COPILOT_EMBEDDER": "hash"}) as running:
        yield running


@pytest.fixture
async def edge(weaviate_mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(weaviate_mesh.edge) as ch:
        yield ch


async def test_tenant_lifecycle_through_the_edge_on_weaviate(
        weaviate_mesh: RunningMesh, edge: grpc.aio.Channel, fake_weaviate: FakeWeaviate) -> None:
    mesh = weaviate_mesh
    first = await create_tenant(mesh, edge, plan=common_pb2.PLAN_ENTERPRISE, prefix="wv")
    second = await create_tenant(mesh, edge, plan=common_pb2.PLAN_ENTERPRISE, prefix="wv")
    # Onboarding provisioned each tenant's shard in Weaviate.
    assert {first, second} <= fake_weaviate.state.tenant_names(CHUNKS)

    stub = retrieval_pb2_grpc.RetrievalServiceStub(edge)
    ingested = await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[
        pb.Document(document_id="gifts", title="Gifts", text="Gifts above 100 EUR must be declared to Compliance.",
                    metadata={"area": "conduct"})]), metadata=mesh.auth(first, ("member", "admin")), timeout=30)
    assert ingested.results[0].status == pb.INGEST_STATUS_CREATED
    assert fake_weaviate.state.object_count(CHUNKS, first) == 1

    found = await stub.Search(pb.SearchRequest(query="gifts declared", filters={"area": "conduct"}),
                              metadata=mesh.auth(first), timeout=30)
    assert [h.document_id for h in found.hits] == ["gifts"]
    assert found.mode == pb.SEARCH_MODE_HYBRID
    # The other tenant's shard has nothing.
    other = await stub.Search(pb.SearchRequest(query="gifts declared"), metadata=mesh.auth(second), timeout=30)
    assert list(other.hits) == []

    tenants = tenant_pb2_grpc.TenantServiceStub(edge)
    await tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id=first), metadata=mesh.operator(), timeout=30)
    assert first not in fake_weaviate.state.tenant_names(CHUNKS)
    assert second in fake_weaviate.state.tenant_names(CHUNKS)
