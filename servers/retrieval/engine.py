"""The retrieval pipeline between the gRPC boundary and a store.

Ingest: hash → skip what is already indexed → chunk (→ embed, later) → store. Search:
pick the mode that can actually run, ask the store, report the mode used. Hybrid fusion,
embedders, rerankers and per-tenant caches plug in here without touching the service or
the stores' interface for lexical search.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from servers.retrieval.chunker import DEFAULT_CONFIG, ChunkingConfig, chunk_document
from servers.retrieval.models import (
    MARKDOWN,
    DeleteResult,
    DocumentInput,
    IngestResult,
    IngestStatus,
    PreparedDocument,
    SearchMode,
    SearchQuery,
    SearchResult,
)
from servers.retrieval.store import DocumentStore

DEFAULT_TOP_K = 8


class RetrievalEngine:
    def __init__(self, store: DocumentStore, *, chunking: ChunkingConfig = DEFAULT_CONFIG,
                 default_top_k: int = DEFAULT_TOP_K) -> None:
        self.store = store
        self.chunking = chunking
        self.default_top_k = default_top_k

    @property
    def index_signature(self) -> str:
        return self.chunking.signature

    async def provision(self, tenant: str) -> None:
        await self.store.provision(tenant)

    async def erase(self, tenant: str) -> None:
        await self.store.erase(tenant)

    async def ingest(self, tenant: str, documents: Sequence[DocumentInput]) -> list[IngestResult]:
        """One result per document, in order. Document ids must be distinct within a call."""
        if not documents:
            return []
        # Hashing and chunking are CPU work on up to megabytes of text: off the event loop.
        hashes = await asyncio.to_thread(lambda: [doc.content_hash() for doc in documents])
        indexed = await self.store.indexed_versions(tenant, [doc.document_id for doc in documents])
        results: list[IngestResult | None] = [None] * len(documents)
        pending: list[tuple[int, DocumentInput, str]] = []
        for index, (doc, content_hash) in enumerate(zip(documents, hashes, strict=True)):
            version = indexed.get(doc.document_id)
            if (version is not None and version.content_hash == content_hash
                    and version.index_signature == self.index_signature):
                results[index] = IngestResult(doc.document_id, IngestStatus.UNCHANGED, version.chunks,
                                              content_hash)
            else:
                pending.append((index, doc, content_hash))
        if pending:
            prepared = await asyncio.to_thread(self._prepare, [(doc, h) for _, doc, h in pending])
            written = await self.store.upsert(tenant, prepared)
            for (index, _, _), result in zip(pending, written, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    def _prepare(self, documents: Sequence[tuple[DocumentInput, str]]) -> list[PreparedDocument]:
        return [
            PreparedDocument(
                document=doc, content_hash=content_hash, index_signature=self.index_signature,
                chunks=tuple(chunk_document(doc.document_id, doc.text, markdown=doc.content_type == MARKDOWN,
                                            config=self.chunking)),
            )
            for doc, content_hash in documents
        ]

    async def delete(self, tenant: str, document_ids: Sequence[str]) -> DeleteResult:
        return await self.store.delete(tenant, document_ids)

    async def search(self, tenant: str, query: SearchQuery) -> SearchResult:
        top_k = query.top_k or self.default_top_k
        # Dense and hybrid need an embedder, which does not exist yet: BM25 runs for every
        # mode and the result says so rather than pretending.
        hits = await self.store.search_lexical(tenant, query.text, top_k, query.filters)
        return SearchResult(hits=hits, mode=SearchMode.BM25)

    async def healthy(self) -> bool:
        return await self.store.healthy()

    async def close(self) -> None:
        await self.store.close()
