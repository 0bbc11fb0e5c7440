"""Shared by the store tests: an engine over any store with the hash embedder (no model to
load: the store is under test, not the embedder) and no result cache (every search reaches
the store)."""

from __future__ import annotations

from servers.retrieval.embedders import build_embedder
from servers.retrieval.engine import RetrievalEngine
from servers.retrieval.stores.base import DocumentStore


def hash_engine(store: DocumentStore) -> RetrievalEngine:
    embedder = build_embedder("hash")
    assert embedder is not None
    engine = RetrievalEngine(store, embedder=embedder, result_cache_entries=0)
    engine.start()
    return engine
