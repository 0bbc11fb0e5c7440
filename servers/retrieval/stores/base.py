"""The interface every document store implements, and what the backends share.

`DocumentStore` is what the engine needs of a backend; `RankingStore`,
`NativeHybridStore` and `VersionedStore` are optional capabilities it uses when a store
has them. `Bm25Params`
(k1, b, column weights) is the one BM25 parameter set the SQLite and Weaviate stores share.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from servers.retrieval.access import AccessCheck
from servers.retrieval.fusion import Fusion
from servers.retrieval.lexical import Ranked
from servers.retrieval.models import (
    AccessChange,
    DeleteResult,
    Hit,
    IndexedVersion,
    IngestResult,
    PreparedDocument,
    Vectors,
)


class DocumentStore(Protocol):
    """A tenant-partitioned store of chunked documents.

    Every method names the tenant explicitly; callers take it from the verified identity.
    Implementations must make it impossible for one tenant's call to read or change
    another tenant's data.
    """

    async def provision(self, tenant: str) -> None:
        """Creates the tenant's (empty) index; idempotent."""

    async def erase(self, tenant: str) -> None:
        """Removes every trace of the tenant (index, files, caches); idempotent."""

    async def indexed_versions(self, tenant: str, document_ids: Sequence[str]) -> dict[str, IndexedVersion]:
        """What is indexed for those ids (missing ids are absent from the result)."""

    async def upsert(self, tenant: str, documents: Sequence[PreparedDocument]) -> list[IngestResult]:
        """Writes documents, one result per document in order. Each document is replaced
        atomically; one whose hash and signature are already indexed is left alone
        (UNCHANGED), and one without chunks is removed (EMPTY)."""

    async def delete(self, tenant: str, document_ids: Sequence[str]) -> DeleteResult:
        """Deletes documents and all their chunks."""

    async def search_lexical(self, tenant: str, text: str, top_k: int,
                             filters: Mapping[str, str], access: AccessCheck | None = None) -> list[Hit]:
        """Keyword (BM25) search; any user text is safe. Best hit first, score higher = better.

        With `access`, chunks of documents its reader may not read are excluded before the
        cut to top_k (never after), and the documents withheld within `access.depth` of the
        unrestricted ranking are added to `access.withheld` (every search_* and rank_* alike)."""

    async def search_dense(self, tenant: str, vector: Vectors, top_k: int,
                           filters: Mapping[str, str], access: AccessCheck | None = None) -> list[Hit]:
        """Nearest chunks by cosine to a normalised query vector; score higher = better."""

    async def set_access(self, tenant: str, changes: Mapping[str, frozenset[str]]) -> AccessChange:
        """Replaces the access labels of documents (document id -> labels; empty: the whole
        tenant), without touching their chunks or vectors; a change moves the revision."""

    async def labels_in_use(self, tenant: str) -> frozenset[str] | None:
        """Every access label some document of the tenant carries (None: the store cannot
        tell cheaply). Readers holding the same of these see the same documents."""

    async def unknown_metadata_keys(self, tenant: str, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that no document of the tenant has as a metadata key."""

    async def get_settings(self, tenant: str) -> dict[str, str]:
        """The tenant's stored search settings (empty when none or no index)."""

    async def put_settings(self, tenant: str, values: Mapping[str, str | None]) -> dict[str, str]:
        """Sets (None: removes) search settings of the tenant; returns them all."""

    async def healthy(self) -> bool:
        """Whether the store can currently serve reads and writes."""

    async def close(self) -> None:
        """Releases connections and threads; the store is unusable afterwards."""


@runtime_checkable
class RankingStore(Protocol):
    """A store that ranks without reading the hits' bodies: hybrid search fuses two rankings
    and reads only the rows it returns (`fetch`), instead of every candidate of both lists.
    Row keys are the store's own (opaque); scores are those of the matching search_* call."""

    async def rank_lexical(self, tenant: str, text: str, top_k: int, filters: Mapping[str, str],
                           access: AccessCheck | None = None) -> Ranked:
        """(row key, score), best first."""

    async def rank_dense(self, tenant: str, vector: Vectors, top_k: int, filters: Mapping[str, str],
                         access: AccessCheck | None = None) -> Ranked:
        """(row key, score), best first."""

    async def fetch(self, tenant: str, ranked: Ranked) -> list[Hit]:
        """The hits of these rows, in this order, with these scores (rows gone since are left out)."""


@runtime_checkable
class NativeHybridStore(Protocol):
    """A store that fuses BM25 and dense results itself, in one request (Weaviate's hybrid
    query); the engine uses it instead of two searches and `fusion.fuse` when present."""

    async def search_hybrid(self, tenant: str, text: str, vector: Vectors, top_k: int,
                            filters: Mapping[str, str], *, alpha: float, fusion: Fusion,
                            access: AccessCheck | None = None) -> list[Hit]:
        """Best first; `alpha` weighs dense (0: BM25 only, 1: dense only)."""


@dataclass(frozen=True, slots=True)
class Revision:
    """What a tenant's index is at one moment, as cheap to read as a `stat`.

    Two equal revisions of a tenant mean the same contents (documents, chunks, vectors,
    search settings), whichever process made the changes in between; a revision is never
    seen again once the index changed. So whatever is derived from a tenant's index (query
    results, its defaults, in-memory indexes) is cached under the revision it was read at
    and is never served once the revision moved.
    """

    # Which life of the tenant's index: changes when it is erased (and re-created).
    incarnation: Hashable
    # Changes with every committed change within one incarnation, whoever made it.
    version: Hashable


@runtime_checkable
class VersionedStore(Protocol):
    """A store that can say cheaply, on every request, whether a tenant's index changed
    since an earlier look, including changes by other processes sharing the same data
    (replicas over one directory)."""

    async def revision(self, tenant: str) -> Revision | None:
        """The tenant's revision now; None when it has no index."""


@dataclass(frozen=True, slots=True)
class Bm25Params:
    """BM25's per-column weights and its k1 and b.

    k1 0.9 and b 0.4 are Anserini's defaults for short passages (FTS5's bm25() fixes k1 1.2,
    b 0.75): weaker length normalisation suits rule passages, whose length says little about
    relevance. On ObliQA dev, BM25 nDCG@10 0.684 -> 0.691 and hybrid 0.715 -> 0.723 (README).
    The in-memory index (`lexical.LexicalIndex`) scores with these; FTS5's bm25(), which this
    store falls back to while a tenant is being written, always uses its own 1.2 and 0.75.
    """

    title: float = 1.0
    section: float = 1.0
    text: float = 1.0
    k1: float = 0.9
    b: float = 0.4

    def __post_init__(self) -> None:
        if not 0.0 <= self.k1 <= 10.0 or not 0.0 <= self.b <= 1.0:
            raise ValueError(f"BM25 needs 0 <= k1 <= 10 and 0 <= b <= 1, got k1={self.k1} b={self.b}")

    @property
    def columns(self) -> tuple[float, float, float]:
        return (self.title, self.section, self.text)


DEFAULT_BM25 = Bm25Params()
