"""The retrieval pipeline between the gRPC boundary and a store.

Ingest: hash → skip what is already indexed → chunk → embed → store. Search: pick the
mode that can actually run (and say which ran), BM25 and/or dense candidates from the
store, fuse, rerank, cut to top_k.

Caches (query results and query embeddings) are per process, bounded (LRU), and keyed
with the tenant first: an entry can only ever answer the tenant that made it. Results and
the tenant's search defaults are also keyed with the tenant's revision (`revision`), so a
cached answer is never stale:

* one process (not `shared`): with this process's own generation of the tenant, bumped
  by every change made through this engine, which is every change there is (free);
* replicas (`shared`: other processes write the same store): with the store's revision
  when it has them (`VersionedStore`: the embedded store), which says on every request,
  for one `stat` and a one-row read, whether the tenant's index changed since, whichever
  process changed it, so a change on one replica is seen by the next request on any
  other; a store without them (Weaviate) gets nothing cached (every search reads the
  tenant's settings and searches the store).

Erasing a tenant drops all its entries; so does noticing that another process erased it.

Access (access.py): every search runs as a `Reader`, and the stores drop what it may not
read before ranking is cut. Result keys carry the reader's view: its labels among those
the tenant's documents use (`labels_in_use`, read once per revision), so readers who see
the same documents share entries and no entry ever answers a reader who sees fewer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from servers.common import metrics, telemetry
from servers.common.errors import FieldViolation, InvalidArgument
from servers.common.lru import LruCache
from servers.retrieval.access import AccessCheck, Reader
from servers.retrieval.chunker import DEFAULT_CONFIG, ChunkingConfig, chunk_document
from servers.retrieval.embedders import Embedder
from servers.retrieval.fusion import Fusion, NoopReranker, Reranker, fuse, fuse_ranked
from servers.retrieval.models import (
    MARKDOWN,
    RESERVED_FILTER_KEYS,
    AccessChange,
    DeleteResult,
    DocumentInput,
    Hit,
    IngestResult,
    IngestStatus,
    PreparedDocument,
    SearchMode,
    SearchQuery,
    SearchResult,
    Vectors,
)
from servers.retrieval.stores.base import DocumentStore, NativeHybridStore, RankingStore, Revision, VersionedStore

DEFAULT_TOP_K = 8
# Candidates each list contributes to fusion (and the dense list's size in DENSE mode
# before the cut): enough for Recall@100 and for fusion to find what one list ranks low.
DEFAULT_CANDIDATES = 100
# Measured on ObliQA dev (README): relative-score fusion with this dense weight.
DEFAULT_ALPHA = 0.4
DEFAULT_FUSION = Fusion.RELATIVE_SCORE

# Per-tenant settings keys (stored in the tenant's own index).
SETTING_MODE = "default_mode"
SETTING_ALPHA = "default_alpha"
SETTING_FUSION = "default_fusion"
SETTING_TOP_K = "default_top_k"

# Who a search runs as when the caller names nobody (tools, benchmarks): a subject no label
# can name ("user:" needs one) and no groups, so it reads only unrestricted documents.
NOBODY = Reader(subject="")

A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True, slots=True)
class TenantDefaults:
    mode: SearchMode | None = None
    alpha: float | None = None
    fusion: Fusion | None = None
    top_k: int | None = None

    @classmethod
    def from_settings(cls, values: dict[str, str]) -> TenantDefaults:
        def parse(key: str, convert: Callable[[str], A]) -> A | None:
            raw = values.get(key)
            try:
                return None if raw is None else convert(raw)
            except ValueError:
                return None

        return cls(mode=parse(SETTING_MODE, SearchMode), alpha=parse(SETTING_ALPHA, float),
                   fusion=parse(SETTING_FUSION, Fusion), top_k=parse(SETTING_TOP_K, int))


# Bumped whenever what a chunk's vector encodes changes, so stored vectors are re-made.
DENSE_TEXT_VERSION = 2


def embedding_text(text: str) -> str:
    """What a chunk's vector encodes: the chunk's own text, nothing else.

    The title and heading path are indexed on the lexical side (their own FTS columns),
    not prepended here: measured on ObliQA dev, MiniLM ranks bare passages better (dense
    nDCG@10 0.572) than passages led by their heading path (0.529) or by their nearest
    heading (0.545) — a shared heading makes every passage under it look alike.
    """
    return text.strip()


def _incarnation(revision: Hashable | None) -> Hashable | None:
    return revision.incarnation if isinstance(revision, Revision) else None


class RetrievalEngine:
    def __init__(self, store: DocumentStore, *, embedder: Embedder | None = None,
                 reranker: Reranker | None = None, chunking: ChunkingConfig = DEFAULT_CONFIG,
                 default_top_k: int = DEFAULT_TOP_K, candidates: int = DEFAULT_CANDIDATES,
                 default_alpha: float = DEFAULT_ALPHA, default_fusion: Fusion = DEFAULT_FUSION,
                 result_cache_entries: int = 4096, embedding_cache_entries: int = 4096,
                 shared: bool = False) -> None:
        """`shared`: other processes write the same store (replicas), so caches may only be
        keyed on the store's revisions (see the module docstring)."""
        self.store = store
        self.shared = shared
        self.embedder = embedder
        self.reranker: Reranker = reranker or NoopReranker()
        self.chunking = chunking
        self.default_top_k = default_top_k
        self.candidates = candidates
        self.default_alpha = default_alpha
        self.default_fusion = default_fusion
        self.results: LruCache[tuple[object, ...], SearchResult] = LruCache(result_cache_entries)
        self.embeddings: LruCache[tuple[str, str, str], Vectors] = LruCache(embedding_cache_entries)
        self._generations: dict[str, int] = {}
        # Each tenant's defaults with the revision they were read at.
        self._defaults: dict[str, tuple[Hashable, TenantDefaults]] = {}
        # Each tenant's access labels in use with the revision they were read at.
        self._labels: dict[str, tuple[Hashable, frozenset[str] | None]] = {}
        metrics.SOURCES.register("retrieval_caches", self, "cache_metrics")

    def cache_metrics(self) -> list[object]:
        """copilot_cache_requests_total for the query-result and query-embedding caches."""
        return metrics.cache_families([("query_results", self.results.hits, self.results.misses),
                                       ("query_embeddings", self.embeddings.hits, self.embeddings.misses)])

    @property
    def index_signature(self) -> str:
        embedder = (f"{self.embedder.signature}:text-v{DENSE_TEXT_VERSION}" if self.embedder is not None
                    else "none")
        return f"{self.chunking.signature}|{embedder}"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Begins loading the embedding model in the background."""
        if self.embedder is not None:
            self.embedder.start()

    def embedder_ready(self) -> bool:
        return self.embedder is None or self.embedder.ready()

    async def provision(self, tenant: str) -> None:
        await self.store.provision(tenant)

    async def erase(self, tenant: str) -> None:
        await self.store.erase(tenant)
        self._forget(tenant)

    def _forget(self, tenant: str) -> None:
        self._changed(tenant)
        self.results.drop(lambda key: key[0] == tenant)
        self.embeddings.drop(lambda key: key[0] == tenant)
        self._defaults.pop(tenant, None)
        self._labels.pop(tenant, None)

    def _changed(self, tenant: str) -> None:
        self._generations[tenant] = self._generations.get(tenant, 0) + 1

    async def revision(self, tenant: str) -> Hashable | None:
        """What the tenant's cached state is keyed on now; None: nothing may be cached for it
        (it has no index, or the store cannot tell other processes' changes)."""
        if not self.shared:
            # Every change goes through this engine: its own count is exact, and free.
            return self._generations.get(tenant, 0)
        revision: Revision | None = None
        if isinstance(self.store, VersionedStore):
            revision = await self.store.revision(tenant)
        seen = self._defaults.get(tenant)
        if seen is not None and _incarnation(seen[0]) != _incarnation(revision):
            # Erased (and maybe re-created) since this process last looked, by any process:
            # nothing derived from the old index stays in memory.
            self._forget(tenant)
        return revision

    async def exists(self, tenant: str) -> bool | None:
        """With replicas, whether the tenant has an index now; None when the store cannot
        tell cheaply, or when this process is the only one (it sees every erase itself)."""
        if self.shared and isinstance(self.store, VersionedStore):
            return await self.revision(tenant) is not None
        return None

    # -- documents --------------------------------------------------------------------------

    async def ingest(self, tenant: str, documents: Sequence[DocumentInput]) -> list[IngestResult]:
        """One result per document, in order. Document ids must be distinct within a call."""
        if not documents:
            return []
        # Hashing and chunking are CPU work on up to megabytes of text: off the event loop.
        hashes = await asyncio.to_thread(lambda: [doc.content_hash() for doc in documents])
        indexed = await self.store.indexed_versions(tenant, [doc.document_id for doc in documents])
        results: list[IngestResult | None] = [None] * len(documents)
        pending: list[tuple[int, DocumentInput, str]] = []
        # Same content, other labels: only the labels change (no chunking, no embedding).
        relabel: dict[str, frozenset[str]] = {}
        for index, (doc, content_hash) in enumerate(zip(documents, hashes, strict=True)):
            version = indexed.get(doc.document_id)
            if (version is not None and version.content_hash == content_hash
                    and version.index_signature == self.index_signature):
                results[index] = IngestResult(doc.document_id, IngestStatus.UNCHANGED, version.chunks,
                                              content_hash)
                if version.access != doc.access:
                    relabel[doc.document_id] = doc.access
            else:
                pending.append((index, doc, content_hash))
        if pending:
            prepared = await asyncio.to_thread(self._prepare, [(doc, h) for _, doc, h in pending])
            if self.embedder is not None:
                prepared = await self._embed_documents(prepared)
            try:
                written = await self.store.upsert(tenant, prepared)
            finally:
                self._changed(tenant)
            for (index, _, _), result in zip(pending, written, strict=True):
                results[index] = result
        if relabel:
            await self.set_access(tenant, relabel)
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

    async def _embed_documents(self, prepared: list[PreparedDocument]) -> list[PreparedDocument]:
        assert self.embedder is not None
        texts = [embedding_text(chunk.text) for p in prepared for chunk in p.chunks]
        vectors = await self.embedder.embed(texts)
        out: list[PreparedDocument] = []
        start = 0
        for p in prepared:
            end = start + len(p.chunks)
            out.append(replace(p, vectors=vectors[start:end]))
            start = end
        return out

    async def delete(self, tenant: str, document_ids: Sequence[str]) -> DeleteResult:
        try:
            return await self.store.delete(tenant, document_ids)
        finally:
            self._changed(tenant)

    async def set_access(self, tenant: str, changes: dict[str, frozenset[str]]) -> AccessChange:
        """Relabels documents; the revision moves, so every process applies it from its next search."""
        try:
            return await self.store.set_access(tenant, changes)
        finally:
            self._changed(tenant)

    async def _labels_at(self, tenant: str, revision: Hashable) -> frozenset[str] | None:
        seen = self._labels.get(tenant)
        if seen is not None and seen[0] == revision:
            return seen[1]
        labels = await self.store.labels_in_use(tenant)
        self._labels[tenant] = (revision, labels)
        return labels

    # -- settings ---------------------------------------------------------------------------

    async def defaults(self, tenant: str) -> TenantDefaults:
        return await self._defaults_at(tenant, await self.revision(tenant))

    async def _defaults_at(self, tenant: str, revision: Hashable | None) -> TenantDefaults:
        seen = self._defaults.get(tenant)
        if seen is not None and revision is not None and seen[0] == revision:
            return seen[1]
        defaults = TenantDefaults.from_settings(await self.store.get_settings(tenant))
        if revision is not None:
            self._defaults[tenant] = (revision, defaults)
        else:
            self._defaults.pop(tenant, None)
        return defaults

    async def configure(self, tenant: str, values: dict[str, str | None]) -> TenantDefaults:
        """Stores the settings; the tenant's revision moves, so every process (this one
        included) reads them on its next request."""
        try:
            stored = await self.store.put_settings(tenant, values) if values else await self.store.get_settings(tenant)
        finally:
            self._changed(tenant)
        return TenantDefaults.from_settings(stored)

    def effective(self, defaults: TenantDefaults) -> tuple[SearchMode, float, Fusion, int]:
        mode = defaults.mode or (SearchMode.HYBRID if self.embedder is not None else SearchMode.BM25)
        alpha = defaults.alpha if defaults.alpha is not None else self.default_alpha
        return mode, alpha, defaults.fusion or self.default_fusion, defaults.top_k or self.default_top_k

    # -- search -----------------------------------------------------------------------------

    async def search(self, tenant: str, query: SearchQuery, reader: Reader = NOBODY) -> SearchResult:
        """`reader`'s results: nothing of a document it may not read, in any mode."""
        revision = await self.revision(tenant)
        defaults = await self._defaults_at(tenant, revision)
        default_mode, default_alpha, default_fusion, default_top_k = self.effective(defaults)
        top_k = query.top_k or default_top_k
        mode = query.mode or default_mode
        alpha = query.alpha if query.alpha is not None else default_alpha
        fusion = Fusion(query.fusion) if query.fusion else default_fusion
        if mode is not SearchMode.BM25 and (self.embedder is None or not self.embedder.ready()):
            # No vectors can be made (none configured, or the model is still loading):
            # lexical search runs and the response says so.
            mode = SearchMode.BM25
        filters = dict(query.filters)
        view = reader.view(await self._labels_at(tenant, revision)) if revision is not None else None
        key = (tenant, revision, view, query.text, top_k, tuple(sorted(filters.items())),
               mode, alpha if mode is SearchMode.HYBRID else None, fusion if mode is SearchMode.HYBRID else None)
        cached = self.results.get(key) if revision is not None else None
        telemetry.current_span().set_attribute("copilot.cache_hit", cached is not None)
        if cached is not None:
            return replace(cached, cached=True)
        if filters:
            await self._check_filter_keys(tenant, filters)
        access = AccessCheck(reader, depth=top_k)
        result = await self._search(tenant, query.text, top_k, filters, mode, alpha, fusion, access)
        result = replace(result, withheld=len(access.withheld))
        telemetry.current_span().set_attribute("copilot.withheld_documents", result.withheld)
        if revision is not None:
            # Read at `revision` or later (another process may have committed since): a
            # newer answer under an older revision is still never a stale one.
            self.results.put(key, result)
        return result

    async def _check_filter_keys(self, tenant: str, filters: dict[str, str]) -> None:
        keys = [key for key in filters if key not in RESERVED_FILTER_KEYS]
        if not keys:
            return
        unknown = await self.store.unknown_metadata_keys(tenant, keys)
        if unknown:
            raise InvalidArgument(
                f"filters: unknown metadata key {sorted(unknown)[0]!r} (no document of this tenant has it;"
                " filter on `source`, `document_id` or a metadata key your documents carry)",
                [FieldViolation(f"filters[{key!r}]", "no document of this tenant has this metadata key")
                 for key in sorted(unknown)])

    async def _query_vector(self, tenant: str, text: str) -> Vectors:
        assert self.embedder is not None
        key = (tenant, self.embedder.signature, text)
        vector = self.embeddings.get(key)
        if vector is None:
            with telemetry.span("search.embed"):
                vector = (await self.embedder.embed([text]))[0]
            self.embeddings.put(key, vector)
        return vector

    async def _lexical(self, tenant: str, text: str, limit: int, filters: dict[str, str],
                       access: AccessCheck) -> list[Hit]:
        return await self._span("search.lexical", limit,
                                self.store.search_lexical(tenant, text, limit, filters, access))

    async def _dense(self, tenant: str, text: str, limit: int, filters: dict[str, str],
                     access: AccessCheck) -> list[Hit]:
        return await self._dense_with(tenant, text, lambda vector: self.store.search_dense(
            tenant, vector, limit, filters, access), limit)

    async def _rerank(self, text: str, hits: list[Hit], top_k: int) -> list[Hit]:
        with telemetry.span("search.rerank"):
            return await self.reranker.rerank(text, hits, top_k)

    async def _search(self, tenant: str, text: str, top_k: int, filters: dict[str, str], mode: SearchMode,
                      alpha: float, fusion: Fusion, access: AccessCheck) -> SearchResult:
        if mode is SearchMode.BM25:
            hits = await self._lexical(tenant, text, top_k, filters, access)
            return SearchResult(hits=await self._rerank(text, hits, top_k), mode=mode)
        if mode is SearchMode.DENSE:
            hits = await self._dense(tenant, text, top_k, filters, access)
            return SearchResult(hits=await self._rerank(text, hits, top_k), mode=mode)
        # Each list contributes `candidates` to fusion; the reranker gets as many fused ones as it wants.
        candidates = max(top_k, self.candidates)
        depth = min(candidates, max(top_k, self.reranker.depth(top_k, candidates)))
        fusion_span = {"copilot.fusion": fusion.value, "copilot.alpha": alpha}
        if isinstance(self.store, NativeHybridStore):
            # The backend fuses BM25 and dense itself in one request (Weaviate's hybrid query),
            # asked for all the candidates: its limit may also bound each of its two searches.
            vector = await self._query_vector(tenant, text)
            with telemetry.span("search.hybrid", fusion_span):
                fused = await self.store.search_hybrid(tenant, text, vector, candidates, filters, alpha=alpha,
                                                       fusion=fusion, access=access)
        elif isinstance(self.store, RankingStore):
            # Rankings only (row keys and scores), fused, and only the winners' rows read.
            store = self.store
            lexical_keys, dense_keys = await self._both(
                self._span("search.lexical", candidates,
                           store.rank_lexical(tenant, text, candidates, filters, access)),
                self._dense_with(tenant, text, lambda vector: store.rank_dense(tenant, vector, candidates, filters,
                                                                               access), candidates))
            with telemetry.span("search.fusion", fusion_span):
                ranked = fuse_ranked(lexical_keys, dense_keys, alpha=alpha, method=fusion, top_k=depth)
            with telemetry.span("search.fetch", {"copilot.rows": len(ranked)}):
                fused = await store.fetch(tenant, ranked)
        else:
            lexical, dense = await self._both(self._lexical(tenant, text, candidates, filters, access),
                                              self._dense(tenant, text, candidates, filters, access))
            with telemetry.span("search.fusion", fusion_span):
                fused = fuse(lexical, dense, alpha=alpha, method=fusion, top_k=depth)
        hits = await self._rerank(text, fused, top_k)
        return SearchResult(hits=hits, mode=mode, alpha=alpha, fusion=fusion.value)

    @staticmethod
    async def _both(lexical: Awaitable[A], dense: Awaitable[B]) -> tuple[A, B]:
        """BM25 runs on the tenant's store thread while the model embeds the query on its own."""
        lexical_task = asyncio.ensure_future(lexical)
        try:
            dense_result = await dense
        except BaseException:
            lexical_task.cancel()
            raise
        return await lexical_task, dense_result

    @staticmethod
    async def _span(name: str, candidates: int, work: Awaitable[A]) -> A:
        with telemetry.span(name, {"copilot.candidates": candidates}):
            return await work

    async def _dense_with(self, tenant: str, text: str, search: Callable[[Vectors], Awaitable[A]],
                          candidates: int) -> A:
        with telemetry.span("search.dense", {"copilot.candidates": candidates}):
            return await search(await self._query_vector(tenant, text))

    # -- health -----------------------------------------------------------------------------

    async def healthy(self) -> bool:
        return await self.store.healthy()

    async def embedder_healthy(self) -> bool:
        """SERVING needs the model loaded: until then dense and hybrid cannot run."""
        return self.embedder is None or (self.embedder.ready() and self.embedder.failed() is None)

    async def close(self) -> None:
        try:
            await self.store.close()
        finally:
            if self.embedder is not None:
                await self.embedder.close()

