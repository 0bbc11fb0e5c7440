from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INGEST_STATUS_UNSPECIFIED: _ClassVar[IngestStatus]
    INGEST_STATUS_CREATED: _ClassVar[IngestStatus]
    INGEST_STATUS_REPLACED: _ClassVar[IngestStatus]
    INGEST_STATUS_UNCHANGED: _ClassVar[IngestStatus]
    INGEST_STATUS_EMPTY: _ClassVar[IngestStatus]

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_MODE_UNSPECIFIED: _ClassVar[SearchMode]
    SEARCH_MODE_BM25: _ClassVar[SearchMode]
    SEARCH_MODE_DENSE: _ClassVar[SearchMode]
    SEARCH_MODE_HYBRID: _ClassVar[SearchMode]

class FusionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_METHOD_UNSPECIFIED: _ClassVar[FusionMethod]
    FUSION_METHOD_RECIPROCAL_RANK: _ClassVar[FusionMethod]
    FUSION_METHOD_RELATIVE_SCORE: _ClassVar[FusionMethod]
INGEST_STATUS_UNSPECIFIED: IngestStatus
INGEST_STATUS_CREATED: IngestStatus
INGEST_STATUS_REPLACED: IngestStatus
INGEST_STATUS_UNCHANGED: IngestStatus
INGEST_STATUS_EMPTY: IngestStatus
SEARCH_MODE_UNSPECIFIED: SearchMode
SEARCH_MODE_BM25: SearchMode
SEARCH_MODE_DENSE: SearchMode
SEARCH_MODE_HYBRID: SearchMode
FUSION_METHOD_UNSPECIFIED: FusionMethod
FUSION_METHOD_RECIPROCAL_RANK: FusionMethod
FUSION_METHOD_RELATIVE_SCORE: FusionMethod

class Document(_message.Message):
    __slots__ = ("document_id", "title", "text", "source", "metadata", "content_type", "access")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    title: str
    text: str
    source: str
    metadata: _containers.ScalarMap[str, str]
    content_type: str
    access: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, document_id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., content_type: _Optional[str] = ..., access: _Optional[_Iterable[str]] = ...) -> None: ...

class DocumentResult(_message.Message):
    __slots__ = ("document_id", "status", "chunks", "content_hash")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    status: IngestStatus
    chunks: int
    content_hash: str
    def __init__(self, document_id: _Optional[str] = ..., status: _Optional[_Union[IngestStatus, str]] = ..., chunks: _Optional[int] = ..., content_hash: _Optional[str] = ...) -> None: ...

class IngestDocumentsRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class IngestDocumentsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DocumentResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DocumentResult, _Mapping]]] = ...) -> None: ...

class StreamIngestDocumentsRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class StreamIngestDocumentsResponse(_message.Message):
    __slots__ = ("results", "documents_done")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_DONE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DocumentResult]
    documents_done: int
    def __init__(self, results: _Optional[_Iterable[_Union[DocumentResult, _Mapping]]] = ..., documents_done: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "top_k", "filters", "mode", "alpha", "fusion")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    filters: _containers.ScalarMap[str, str]
    mode: SearchMode
    alpha: float
    fusion: FusionMethod
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Mapping[str, str]] = ..., mode: _Optional[_Union[SearchMode, str]] = ..., alpha: _Optional[float] = ..., fusion: _Optional[_Union[FusionMethod, str]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("document_id", "chunk_id", "title", "section", "text", "score", "source", "metadata", "access", "location")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SECTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    chunk_id: str
    title: str
    section: str
    text: str
    score: float
    source: str
    metadata: _containers.ScalarMap[str, str]
    access: _containers.RepeatedScalarFieldContainer[str]
    location: ChunkLocation
    def __init__(self, document_id: _Optional[str] = ..., chunk_id: _Optional[str] = ..., title: _Optional[str] = ..., section: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., access: _Optional[_Iterable[str]] = ..., location: _Optional[_Union[ChunkLocation, _Mapping]] = ...) -> None: ...

class ChunkLocation(_message.Message):
    __slots__ = ("start", "end", "edits")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    edits: _containers.RepeatedCompositeFieldContainer[TextEdit]
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., edits: _Optional[_Iterable[_Union[TextEdit, _Mapping]]] = ...) -> None: ...

class TextEdit(_message.Message):
    __slots__ = ("at", "length", "original")
    AT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    at: int
    length: int
    original: str
    def __init__(self, at: _Optional[int] = ..., length: _Optional[int] = ..., original: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "mode", "alpha", "fusion", "cached")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    mode: SearchMode
    alpha: float
    fusion: FusionMethod
    cached: bool
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., mode: _Optional[_Union[SearchMode, str]] = ..., alpha: _Optional[float] = ..., fusion: _Optional[_Union[FusionMethod, str]] = ..., cached: bool = ...) -> None: ...

class DeleteDocumentsRequest(_message.Message):
    __slots__ = ("document_ids",)
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, document_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteDocumentsResponse(_message.Message):
    __slots__ = ("deleted_documents", "deleted_chunks", "not_found")
    DELETED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DELETED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted_documents: int
    deleted_chunks: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_documents: _Optional[int] = ..., deleted_chunks: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class ProvisionTenantRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProvisionTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EraseTenantRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EraseTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SearchSettings(_message.Message):
    __slots__ = ("default_mode", "default_alpha", "default_fusion", "default_top_k")
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FUSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    default_mode: SearchMode
    default_alpha: float
    default_fusion: FusionMethod
    default_top_k: int
    def __init__(self, default_mode: _Optional[_Union[SearchMode, str]] = ..., default_alpha: _Optional[float] = ..., default_fusion: _Optional[_Union[FusionMethod, str]] = ..., default_top_k: _Optional[int] = ...) -> None: ...

class ConfigureSearchRequest(_message.Message):
    __slots__ = ("default_mode", "default_alpha", "default_fusion", "default_top_k", "reset")
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FUSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    default_mode: SearchMode
    default_alpha: float
    default_fusion: FusionMethod
    default_top_k: int
    reset: bool
    def __init__(self, default_mode: _Optional[_Union[SearchMode, str]] = ..., default_alpha: _Optional[float] = ..., default_fusion: _Optional[_Union[FusionMethod, str]] = ..., default_top_k: _Optional[int] = ..., reset: bool = ...) -> None: ...

class ConfigureSearchResponse(_message.Message):
    __slots__ = ("settings", "effective", "dense_available")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    DENSE_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    settings: SearchSettings
    effective: SearchSettings
    dense_available: bool
    def __init__(self, settings: _Optional[_Union[SearchSettings, _Mapping]] = ..., effective: _Optional[_Union[SearchSettings, _Mapping]] = ..., dense_available: bool = ...) -> None: ...

class DocumentAccess(_message.Message):
    __slots__ = ("document_id", "access")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    access: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, document_id: _Optional[str] = ..., access: _Optional[_Iterable[str]] = ...) -> None: ...

class SetDocumentAccessRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[DocumentAccess]
    def __init__(self, documents: _Optional[_Iterable[_Union[DocumentAccess, _Mapping]]] = ...) -> None: ...

class SetDocumentAccessResponse(_message.Message):
    __slots__ = ("updated", "unchanged", "not_found")
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    updated: int
    unchanged: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, updated: _Optional[int] = ..., unchanged: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...
