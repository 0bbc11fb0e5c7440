"""Assembles the retrieval server: store → engine → servicer, health and shutdown."""

from __future__ import annotations

from pathlib import Path

import grpc

from copilot.v1 import retrieval_pb2, retrieval_pb2_grpc
from servers.common.audit import AuditTrail
from servers.common.lifecycle import Service, connect_peer
from servers.common.outbox.replicas import ReplicaOutboxes
from servers.common.settings import Settings
from servers.retrieval.config import RetrievalConfig
from servers.retrieval.embedders import build_embedder
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.service import RetrievalServiceServicer
from servers.retrieval.stores.base import DocumentStore
from servers.retrieval.stores.sqlite import SqliteFtsStore
from servers.retrieval.tenants import TenantRegistry

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def tenants_dir(settings: Settings) -> Path:
    return settings.data_dir / "retrieval" / "tenants"


AUDIT_OUTBOX = "audit-outbox"


def audit_outbox_dir(settings: Settings) -> Path:
    """This process's own audit outbox. Retrieval's replicas share their data directory
    (`SHARED_DATA_SERVICES`: the tenant files), but never an outbox: two processes replaying
    one journal would deliver, and delete, each other's events (servers/common/outbox/replicas.py).
    Not created here: build touches no disk."""
    return settings.replica_dir("retrieval") / AUDIT_OUTBOX


# The health dependency each store reports under (NOT_SERVING while it fails).
STORE_DEPENDENCY = {"embedded": "data_dir_writable", "weaviate": "weaviate_ready"}


def build_store(settings: Settings, config: RetrievalConfig) -> DocumentStore:
    """Replicas (COPILOT_REPLICAS > 1) share one store: the embedded store's tenant files
    under `<data>/retrieval/tenants` (every replica the same directory), or Weaviate."""
    if config.store == "weaviate":
        assert config.weaviate_url is not None  # RetrievalConfig checks it
        # Imported here: weaviate-client takes about a second to import, which the
        # embedded default should not pay.
        from servers.retrieval.stores.weaviate import WeaviateConfig, WeaviateStore

        # Connects lazily (first call or health probe): the server starts even while
        # Weaviate is still coming up, and reports NOT_SERVING until it answers.
        return WeaviateStore(WeaviateConfig(url=config.weaviate_url, grpc_port=config.weaviate_grpc_port,
                                            api_key=config.weaviate_api_key, timeout_s=config.weaviate_timeout_s,
                                            collection_prefix=config.weaviate_collection_prefix),
                             bm25=config.bm25, shared=settings.replicas > 1)
    return SqliteFtsStore(tenants_dir(settings), max_open_tenants=config.max_open_tenants, workers=config.workers,
                          bm25=config.bm25)


def build(settings: Settings, config: RetrievalConfig | None = None) -> Service:
    config = config or RetrievalConfig.from_env()
    # Nothing touches the disk here: directories are created by the first health probe
    # or the first tenant, on worker threads.
    store = build_store(settings, config)
    embedder = build_embedder(config.embedder, openai_model=config.openai_embedding_model,
                              openai_dimension=config.openai_embedding_dimension,
                              openai_api_key=config.openai_api_key, openai_base_url=config.openai_base_url,
                              batch_size=config.embed_batch_size, cache_dir=config.model_cache)
    engine = RetrievalEngine(store, embedder=embedder, default_top_k=config.default_top_k,
                             candidates=config.candidates, default_alpha=config.default_alpha,
                             default_fusion=config.default_fusion,
                             result_cache_entries=config.result_cache_entries,
                             embedding_cache_entries=config.embedding_cache_entries,
                             shared=settings.replicas > 1)
    # Ingests, deletes and search-setting changes go to metering's audit trail through a
    # durable outbox (COPILOT_AUDIT=0 turns it off, for benchmarks only); writes are only for
    # tenants metering's registry knows.
    metering_channel = connect_peer(settings, "metering")
    outboxes = ReplicaOutboxes(settings, "retrieval", [AUDIT_OUTBOX])
    audit = AuditTrail("retrieval", metering_channel, audit_outbox_dir(settings)) \
        if settings.audit_enabled else None
    servicer = RetrievalServiceServicer(engine, audit, TenantRegistry.over(metering_channel,
                                                                           settings.tenant_cache_ttl_s))

    async def start_embedder() -> None:
        # The model loads on its own thread; health is NOT_SERVING until it is ready
        # (ingest waits for it, search runs BM25 and says so meanwhile).
        engine.start()

    def register(server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)

    async def stop_metering() -> None:
        if audit is not None:
            await audit.stop()
        await metering_channel.close(None)

    return Service(
        name="retrieval",
        port=settings.port("retrieval"),
        service_names=[SERVICE_NAME],
        register=register,
        dependencies={STORE_DEPENDENCY[config.store]: engine.healthy, "embedder_ready": engine.embedder_healthy},
        on_start=[start_embedder, outboxes.open, *([audit.start] if audit is not None else [])],
        on_stop=[engine.close, stop_metering, outboxes.close],
        on_refusal=audit.refused if audit is not None else None,
    )
