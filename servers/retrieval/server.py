"""Assembles the retrieval server: store → engine → servicer, health and shutdown."""

from __future__ import annotations

from pathlib import Path

import grpc

from copilot.v1 import retrieval_pb2, retrieval_pb2_grpc
from servers.common.lifecycle import Service
from servers.common.settings import Settings
from servers.retrieval.config import RetrievalConfig
from servers.retrieval.embedders import build_embedder
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.service import RetrievalServiceServicer
from servers.retrieval.store import SqliteFtsStore

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def tenants_dir(settings: Settings) -> Path:
    return settings.data_dir / "retrieval" / "tenants"


def build(settings: Settings, config: RetrievalConfig | None = None) -> Service:
    config = config or RetrievalConfig.from_env()
    # Nothing touches the disk here: directories are created by the first health probe
    # or the first tenant, on worker threads.
    store = SqliteFtsStore(tenants_dir(settings), max_open_tenants=config.max_open_tenants,
                           workers=config.workers)
    embedder = build_embedder(config.embedder, openai_model=config.openai_embedding_model,
                              openai_dimension=config.openai_embedding_dimension,
                              openai_base_url=config.openai_base_url, batch_size=config.embed_batch_size)
    engine = RetrievalEngine(store, embedder=embedder, default_top_k=config.default_top_k,
                             candidates=config.candidates, default_alpha=config.default_alpha,
                             default_fusion=config.default_fusion,
                             result_cache_entries=config.result_cache_entries,
                             embedding_cache_entries=config.embedding_cache_entries)
    servicer = RetrievalServiceServicer(engine)

    async def start_embedder() -> None:
        # The model loads on its own thread; health is NOT_SERVING until it is ready
        # (ingest waits for it, search runs BM25 and says so meanwhile).
        engine.start()

    def register(server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)

    return Service(
        name="retrieval",
        port=settings.retrieval_port,
        service_names=[SERVICE_NAME],
        register=register,
        dependencies={"data_dir_writable": engine.healthy, "embedder_ready": engine.embedder_healthy},
        on_start=[start_embedder],
        on_stop=[engine.close],
    )
