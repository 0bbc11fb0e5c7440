"""The Weaviate store against the local fake Weaviate, with the real weaviate-client talking
to it over REST and gRPC: multi-tenancy, native hybrid, re-ingest, failures, health, and
the retrieval service selected by COPILOT_STORE=weaviate, called over gRPC.

(The backend-independent contract, also run here on the fake, is in
test_retrieval_store_contract.py.)"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import weaviate
import weaviate.classes as wvc

from copilot.v1 import retrieval_pb2 as pb
from copilot.v1 import retrieval_pb2_grpc as pb_grpc
from servers.common.channels import CLIENT_OPTIONS, SERVER_OPTIONS
from servers.common.errors import Unavailable
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.settings import Settings
from servers.retrieval.config import RetrievalConfig
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.models import DocumentInput, IngestStatus, SearchMode, SearchQuery
from servers.retrieval.server import build
from servers.retrieval.stores.base import Bm25Params
from servers.retrieval.stores.weaviate import WeaviateConfig, WeaviateStore
from tests.fakes.weaviate_server import COLD, HOT, FakeWeaviate
from tests.unit.retrieval_support import hash_engine

A, B = "tenant-a", "tenant-b"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeWeaviate]:
    with FakeWeaviate() as server:
        yield server


def make_store(fake: FakeWeaviate, **kw: object) -> WeaviateStore:
    prefix = f"T{uuid.uuid4().hex[:10]}"
    return WeaviateStore(WeaviateConfig(url=fake.url, grpc_port=fake.grpc_port, collection_prefix=prefix,
                                        **kw))  # type: ignore[arg-type]


@pytest.fixture
async def store(fake: FakeWeaviate) -> AsyncIterator[WeaviateStore]:
    s = make_store(fake, timeout_s=10.0)
    yield s
    await s.close()


@pytest.fixture
def engine(store: WeaviateStore) -> RetrievalEngine:
    return hash_engine(store)


def doc(doc_id: str, text: str, **metadata: str) -> DocumentInput:
    return DocumentInput(document_id=doc_id, title="", text=text, metadata=metadata)


async def test_collections_are_multi_tenant_with_our_vectors(fake: FakeWeaviate, store: WeaviateStore) -> None:
    await store.provision(A)
    schema = fake.state.classes[store.chunks_name]
    assert schema["multiTenancyConfig"] == {"enabled": True, "autoTenantCreation": False,
                                            "autoTenantActivation": True}
    assert schema["vectorConfig"]["default"]["vectorizer"] == {"none": {}}
    props = {p["name"]: p for p in schema["properties"]}
    assert props["document_id"]["tokenization"] == "field" and props["text"]["dataType"] == ["text"]
    # BM25 with the embedded store's k1 and b, not Weaviate's defaults (1.2, 0.75).
    assert schema["invertedIndexConfig"]["bm25"] == {"k1": 0.9, "b": 0.4}
    assert fake.state.tenant_names(store.chunks_name) == {A}
    assert fake.state.tenant_names(store.settings_name) == {A}
    await store.provision(A)  # idempotent
    assert fake.state.tenant_names(store.chunks_name) == {A}


async def test_bm25_scores_follow_the_collections_k1_and_b(fake: FakeWeaviate) -> None:
    texts = {"short": "The annual audit is mandatory.",
             "long": ("The annual audit is mandatory for every regulated firm, its branches, subsidiaries, agents"
                      " and outsourced service providers in every jurisdiction where it operates."),
             "none": "Risk committees meet quarterly."}
    scores: dict[tuple[float, float], dict[str, float]] = {}
    for k1, b in ((0.9, 0.4), (1.2, 0.75)):
        store = WeaviateStore(WeaviateConfig(url=fake.url, grpc_port=fake.grpc_port,
                                             collection_prefix=f"T{uuid.uuid4().hex[:10]}"),
                              bm25=Bm25Params(k1=k1, b=b))
        try:
            await hash_engine(store).ingest(A, [doc(doc_id, text) for doc_id, text in texts.items()])
            hits = await store.search_lexical(A, "audit", 10, {})
            scores[(k1, b)] = {hit.document_id: hit.score for hit in hits}
        finally:
            await store.close()
    assert set(scores[(0.9, 0.4)]) == set(scores[(1.2, 0.75)]) == {"short", "long"}
    # Weaker length normalisation (b 0.4) narrows the gap between the short and long passage.
    gap = {key: found["short"] / found["long"] for key, found in scores.items()}
    assert 1.0 < gap[(0.9, 0.4)] < gap[(1.2, 0.75)]


async def test_each_tenant_is_its_own_shard_and_erase_drops_it(
        fake: FakeWeaviate, engine: RetrievalEngine, store: WeaviateStore) -> None:
    await store.provision(A)
    await store.provision(B)
    await engine.ingest(A, [doc("d1", "Alpha tenant text."), doc("d2", "More alpha text.")])
    await engine.ingest(B, [doc("d1", "Beta tenant text.")])
    assert fake.state.object_count(store.chunks_name, A) == 2
    assert fake.state.object_count(store.chunks_name, B) == 1
    await engine.erase(A)
    assert fake.state.tenant_names(store.chunks_name) == {B}
    assert fake.state.tenant_names(store.settings_name) == {B}
    assert fake.state.object_count(store.chunks_name, A) == 0
    assert [h.document_id for h in (await engine.search(B, SearchQuery("beta", mode=SearchMode.BM25))).hits] == ["d1"]


async def test_writes_to_a_new_tenant_provision_it(fake: FakeWeaviate, engine: RetrievalEngine,
                                                  store: WeaviateStore) -> None:
    # As in the embedded store, the first write creates the tenant (Weaviate's own auto
    # creation stays off: only this store, with a validated tenant id, creates tenants).
    results = await engine.ingest("tenant-new", [doc("d1", "Fresh tenant.")])
    assert results[0].status is IngestStatus.CREATED
    assert "tenant-new" in fake.state.tenant_names(store.chunks_name)


async def test_reingest_replaces_chunks_without_leftovers(fake: FakeWeaviate, engine: RetrievalEngine,
                                                         store: WeaviateStore) -> None:
    await store.provision(A)
    big = "\n\n".join(f"Paragraph {i} about zebra governance controls." * 8 for i in range(12))
    created = await engine.ingest(A, [doc("d1", big)])
    assert fake.state.object_count(store.chunks_name, A) == created[0].chunks > 2
    again = await engine.ingest(A, [doc("d1", big)])
    assert again[0].status is IngestStatus.UNCHANGED
    replaced = await engine.ingest(A, [doc("d1", "Short now.", k="v")])
    assert replaced[0].status is IngestStatus.REPLACED
    assert fake.state.object_count(store.chunks_name, A) == 1


async def test_hybrid_is_one_native_query(fake: FakeWeaviate, engine: RetrievalEngine, store: WeaviateStore) -> None:
    await store.provision(A)
    await engine.ingest(A, [doc("aml", "Report suspicious transactions promptly."),
                            doc("kyc", "Verify the customer identity.")])
    before = len(fake.state.requests)
    result = await engine.search(A, SearchQuery("suspicious transactions", mode=SearchMode.HYBRID, alpha=0.5,
                                                fusion="rrf"))
    # (fetches read the tenant's settings)
    searches = [op for _, op in fake.state.requests[before:] if op.startswith("Search/") and op != "Search/fetch"]
    assert searches == ["Search/hybrid_search"]
    assert result.mode is SearchMode.HYBRID and result.alpha == 0.5 and result.fusion == "rrf"
    assert result.hits[0].document_id == "aml"


async def test_inactive_tenant_is_reloaded_on_demand(fake: FakeWeaviate, engine: RetrievalEngine,
                                                    store: WeaviateStore) -> None:
    await store.provision(A)
    await engine.ingest(A, [doc("d1", "Dormant but present.")])
    # An operator (or Weaviate's offloading) set the idle tenant INACTIVE...
    async with weaviate.use_async_with_custom(
            http_host="127.0.0.1", http_port=fake.http_port, http_secure=False, grpc_host="127.0.0.1",
            grpc_port=fake.grpc_port, grpc_secure=False, skip_init_checks=True) as operator:
        await operator.collections.use(store.chunks_name).tenants.update(
            wvc.tenants.Tenant(name=A, activity_status=wvc.tenants.TenantActivityStatus.INACTIVE))
    assert fake.state.tenants[store.chunks_name][A] == COLD
    # ...and the next query loads it back (auto tenant activation).
    hits = (await engine.search(A, SearchQuery("dormant", mode=SearchMode.BM25))).hits
    assert [h.document_id for h in hits] == ["d1"]
    assert fake.state.tenants[store.chunks_name][A] == HOT


async def test_unreachable_weaviate_is_unhealthy_and_unavailable() -> None:
    server = FakeWeaviate().start()
    store = make_store(server, timeout_s=1.0)
    try:
        await store.provision(A)
        assert await store.healthy()
        server.stop()
        assert not await store.healthy()
        # The client retries UNAVAILABLE with backoff; our bound turns that into UNAVAILABLE.
        with pytest.raises(Unavailable):
            await store.search_lexical(A, "anything", 5, {})
    finally:
        server.stop()
        await store.close()


async def test_service_is_not_serving_while_weaviate_is_down(tmp_path: Path) -> None:
    server = FakeWeaviate().start()
    config = RetrievalConfig(store="weaviate", weaviate_url=server.url, weaviate_grpc_port=server.grpc_port,
                             embedder="none", weaviate_timeout_s=1.0)
    settings = dataclasses.replace(Settings.from_env(), data_dir=tmp_path, retrieval_port=0, audit_enabled=False)
    service = build(settings, config)
    check = service.dependencies["weaviate_ready"]
    try:
        assert await check()
        server.stop()
        assert not await check()
    finally:
        server.stop()
        for stop in service.on_stop:
            await stop()


async def test_never_reachable_weaviate_is_unhealthy() -> None:
    server = FakeWeaviate()  # bound but never started: connections are refused or hang
    store = WeaviateStore(WeaviateConfig(url=server.url, grpc_port=server.grpc_port, timeout_s=1.0))
    try:
        assert not await store.healthy()
        with pytest.raises(Unavailable):
            await store.provision(A)
    finally:
        await store.close()


async def test_api_key_is_sent() -> None:
    with FakeWeaviate(api_key="s3cret") as server:
        wrong = WeaviateStore(WeaviateConfig(url=server.url, grpc_port=server.grpc_port, api_key="nope",
                                             timeout_s=2.0))
        right = WeaviateStore(WeaviateConfig(url=server.url, grpc_port=server.grpc_port, api_key="s3cret",
                                             timeout_s=2.0))
        try:
            assert not await wrong.healthy()
            assert await right.healthy()
            await right.provision(A)
            await right.upsert(A, [])
            assert await right.search_lexical(A, "x", 3, {}) == []
        finally:
            await wrong.close()
            await right.close()


def test_config_selects_the_store() -> None:
    assert RetrievalConfig.from_env({}).store == "embedded"
    config = RetrievalConfig.from_env({"COPILOT_STORE": "weaviate", "WEAVIATE_URL": "http://weaviate:8080",
                                       "WEAVIATE_GRPC_PORT": "50052", "WEAVIATE_API_KEY": "k"})
    assert (config.store, config.weaviate_url, config.weaviate_grpc_port, config.weaviate_api_key) == \
        ("weaviate", "http://weaviate:8080", 50052, "k")
    with pytest.raises(ValueError, match="WEAVIATE_URL"):
        RetrievalConfig.from_env({"COPILOT_STORE": "weaviate"})
    assert config.weaviate_collection_prefix == "Copilot"
    with pytest.raises(ValueError, match="COPILOT_WEAVIATE_COLLECTION_PREFIX"):
        RetrievalConfig.from_env({"COPILOT_WEAVIATE_COLLECTION_PREFIX": "bad-name"})
    with pytest.raises(ValueError, match="COPILOT_STORE"):
        RetrievalConfig.from_env({"COPILOT_STORE": "pinecone"})
    with pytest.raises(ValueError, match="http"):
        WeaviateStore(WeaviateConfig(url="weaviate:8080"))


async def test_service_on_weaviate_over_grpc(fake: FakeWeaviate, tmp_path: Path) -> None:
    """COPILOT_STORE=weaviate: the service's health follows Weaviate, and ingest/search over
    gRPC land in the caller's tenant shard."""
    config = RetrievalConfig(store="weaviate", weaviate_url=fake.url, weaviate_grpc_port=fake.grpc_port,
                             embedder="hash", weaviate_timeout_s=5.0)
    # No audit trail: it would deliver to a metering server that is not part of this test.
    settings = dataclasses.replace(Settings.from_env(), data_dir=tmp_path, retrieval_port=0, audit_enabled=False)
    service = build(settings, config)
    assert set(service.dependencies) == {"weaviate_ready", "embedder_ready"}
    for start in service.on_start:
        await start()
    assert await service.dependencies["weaviate_ready"]()
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)], options=SERVER_OPTIONS)
    service.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
    stub = pb_grpc.RetrievalServiceStub(channel)
    admin_a = (("x-user-id", "u1"), ("x-roles", "admin"), ("x-tenant-id", "tenant-grpc-a"))
    member_b = (("x-user-id", "u2"), ("x-roles", "member"), ("x-tenant-id", "tenant-grpc-b"))
    try:
        # Onboarding provisions a tenant before anything is stored for it (no metering here to ask).
        await stub.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=(
            ("x-user-id", "service:metering"), ("x-roles", "service"), ("x-tenant-id", "tenant-grpc-a")))
        ingested = await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[
            pb.Document(document_id="d1", title="AML", text="Report suspicious transactions.",
                        metadata={"topic": "aml"})]), metadata=admin_a)
        assert ingested.results[0].status == pb.INGEST_STATUS_CREATED
        found = await stub.Search(pb.SearchRequest(query="suspicious", mode=pb.SEARCH_MODE_HYBRID), metadata=admin_a)
        assert [h.document_id for h in found.hits] == ["d1"] and found.mode == pb.SEARCH_MODE_HYBRID
        assert dict(found.hits[0].metadata) == {"topic": "aml"}
        other = await stub.Search(pb.SearchRequest(query="suspicious"), metadata=member_b)
        assert list(other.hits) == []
        assert "tenant-grpc-a" in fake.state.tenant_names("CopilotChunk")
        assert "tenant-grpc-b" not in fake.state.tenant_names("CopilotChunk")
    finally:
        await channel.close(None)
        await server.stop(None)
        for stop in service.on_stop:
            await stop()
