"""Domain types of the retrieval service, free of protobuf and of any storage engine.

The gRPC boundary (service.py) converts to and from these; stores and the engine only
ever see them, so a new transport or backend does not touch the others.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from servers.common.text import Location
from servers.retrieval.chunker import Chunk

# An embedding model's output: one float32 row per text (L2-normalised).
Vectors = npt.NDArray[np.float32]

PLAIN_TEXT = "text/plain"
MARKDOWN = "text/markdown"
CONTENT_TYPES = frozenset({PLAIN_TEXT, MARKDOWN})


class IngestStatus(enum.Enum):
    CREATED = "created"
    REPLACED = "replaced"
    UNCHANGED = "unchanged"
    EMPTY = "empty"


class SearchMode(enum.Enum):
    BM25 = "bm25"
    DENSE = "dense"
    HYBRID = "hybrid"


@dataclass(frozen=True, slots=True)
class DocumentInput:
    """A document as a caller submitted it (already validated)."""

    document_id: str
    title: str
    text: str
    source: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    content_type: str = PLAIN_TEXT
    # Who may read it (access.py); empty: the whole tenant. Not hashed: relabelling a
    # document does not re-chunk or re-embed it.
    access: frozenset[str] = frozenset()

    def content_hash(self) -> str:
        """Hex SHA-256 over everything that changes what gets indexed or returned.

        Source and content type are included besides title, text and metadata: a new
        source changes every hit's citation, a new content type changes the chunking.
        """
        canonical = json.dumps(
            [self.title, self.text, self.source, self.content_type, sorted(self.metadata.items())],
            ensure_ascii=False, separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class PreparedDocument:
    """A document ready for a store: hashed, chunked and (with an embedder) embedded."""

    document: DocumentInput
    content_hash: str
    # Identifies how the chunks were produced (chunker version and limits; later the
    # embedder): an unchanged document indexed under another signature is re-indexed.
    index_signature: str
    chunks: tuple[Chunk, ...]
    # One L2-normalised row per chunk, or None when no embedder is configured.
    vectors: Vectors | None = None

    @property
    def document_id(self) -> str:
        return self.document.document_id


@dataclass(frozen=True, slots=True)
class IndexedVersion:
    content_hash: str
    index_signature: str
    chunks: int
    # The document's access labels as stored.
    access: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class IngestResult:
    document_id: str
    status: IngestStatus
    chunks: int
    content_hash: str


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted_documents: int
    deleted_chunks: int
    not_found: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AccessChange:
    """SetDocumentAccess's outcome."""

    updated: tuple[str, ...]
    unchanged: tuple[str, ...]
    not_found: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SearchQuery:
    text: str
    # 0 means the engine's (later: the tenant's) default.
    top_k: int = 0
    # Exact match on metadata keys, plus the reserved keys `source` and `document_id`.
    filters: Mapping[str, str] = field(default_factory=dict)
    # None: the tenant's default (hybrid when an embedder is configured).
    mode: SearchMode | None = None
    # None: the tenant's default.
    alpha: float | None = None
    # None: the tenant's default ("rrf" or "relative_score").
    fusion: str | None = None


@dataclass(frozen=True, slots=True)
class Hit:
    document_id: str
    chunk_id: str
    title: str
    section: str
    text: str
    # Higher is better; only comparable within one result list.
    score: float
    source: str
    metadata: Mapping[str, str]
    # The document's access labels (empty: the whole tenant may read it).
    access: tuple[str, ...] = ()
    # Where the chunk lies in the document's original text; None when it was indexed before
    # offsets were kept.
    location: Location | None = None


@dataclass(frozen=True, slots=True)
class SearchResult:
    hits: list[Hit]
    # The mode that actually ran, which may differ from the one asked for.
    mode: SearchMode
    # For hybrid: the weight of dense scores and the fusion method that ran.
    alpha: float | None = None
    fusion: str | None = None
    cached: bool = False
    # Documents the caller may not read that would have ranked within its top_k (a count for
    # the audit trail; never shown to the caller).
    withheld: int = 0


# Filter keys that address document fields rather than metadata; metadata may not use them.
RESERVED_FILTER_KEYS = frozenset({"source", "document_id"})
