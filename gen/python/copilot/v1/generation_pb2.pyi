import datetime

from copilot.v1 import common_pb2 as _common_pb2
from copilot.v1 import tenant_pb2 as _tenant_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpanOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPAN_ORIGIN_UNSPECIFIED: _ClassVar[SpanOrigin]
    SPAN_ORIGIN_EXTRACTED: _ClassVar[SpanOrigin]
    SPAN_ORIGIN_QUOTED: _ClassVar[SpanOrigin]
    SPAN_ORIGIN_INFERRED: _ClassVar[SpanOrigin]
SPAN_ORIGIN_UNSPECIFIED: SpanOrigin
SPAN_ORIGIN_EXTRACTED: SpanOrigin
SPAN_ORIGIN_QUOTED: SpanOrigin
SPAN_ORIGIN_INFERRED: SpanOrigin

class AnswerRequest(_message.Message):
    __slots__ = ("question", "top_k", "mode", "filters", "request_id")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    question: str
    top_k: int
    mode: _common_pb2.RetrievalMode
    filters: _containers.ScalarMap[str, str]
    request_id: str
    def __init__(self, question: _Optional[str] = ..., top_k: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.RetrievalMode, str]] = ..., filters: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamAnswerRequest(_message.Message):
    __slots__ = ("question", "top_k", "mode", "filters", "request_id")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    question: str
    top_k: int
    mode: _common_pb2.RetrievalMode
    filters: _containers.ScalarMap[str, str]
    request_id: str
    def __init__(self, question: _Optional[str] = ..., top_k: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.RetrievalMode, str]] = ..., filters: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class AnswerDetails(_message.Message):
    __slots__ = ("citations", "usage", "latency", "mode_used", "degraded", "degraded_reason", "provider", "model", "request_id", "pii_masks", "sub_questions", "usage_pending", "retrieval_latency", "provider_latency", "spans", "sentences", "groundedness")
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PII_MASKS_FIELD_NUMBER: _ClassVar[int]
    SUB_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_PENDING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_LATENCY_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_LATENCY_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    GROUNDEDNESS_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Citation]
    usage: _common_pb2.TokenUsage
    latency: _duration_pb2.Duration
    mode_used: _common_pb2.RetrievalMode
    degraded: bool
    degraded_reason: str
    provider: str
    model: str
    request_id: str
    pii_masks: _containers.RepeatedCompositeFieldContainer[PiiMask]
    sub_questions: _containers.RepeatedScalarFieldContainer[str]
    usage_pending: bool
    retrieval_latency: _duration_pb2.Duration
    provider_latency: _duration_pb2.Duration
    spans: _containers.RepeatedCompositeFieldContainer[CitedSpan]
    sentences: _containers.RepeatedCompositeFieldContainer[SentenceVerdict]
    groundedness: Groundedness
    def __init__(self, citations: _Optional[_Iterable[_Union[_common_pb2.Citation, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.TokenUsage, _Mapping]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., mode_used: _Optional[_Union[_common_pb2.RetrievalMode, str]] = ..., degraded: bool = ..., degraded_reason: _Optional[str] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., pii_masks: _Optional[_Iterable[_Union[PiiMask, _Mapping]]] = ..., sub_questions: _Optional[_Iterable[str]] = ..., usage_pending: bool = ..., retrieval_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., provider_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., spans: _Optional[_Iterable[_Union[CitedSpan, _Mapping]]] = ..., sentences: _Optional[_Iterable[_Union[SentenceVerdict, _Mapping]]] = ..., groundedness: _Optional[_Union[Groundedness, _Mapping]] = ...) -> None: ...

class CitedSpan(_message.Message):
    __slots__ = ("citation_index", "document_id", "chunk_id", "start", "end", "text", "match_quality", "origin")
    CITATION_INDEX_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MATCH_QUALITY_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    citation_index: int
    document_id: str
    chunk_id: str
    start: int
    end: int
    text: str
    match_quality: float
    origin: SpanOrigin
    def __init__(self, citation_index: _Optional[int] = ..., document_id: _Optional[str] = ..., chunk_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ..., match_quality: _Optional[float] = ..., origin: _Optional[_Union[SpanOrigin, str]] = ...) -> None: ...

class SentenceVerdict(_message.Message):
    __slots__ = ("start", "end", "citations", "spans", "supported", "support", "issues", "removed")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    citations: _containers.RepeatedScalarFieldContainer[int]
    spans: _containers.RepeatedScalarFieldContainer[int]
    supported: bool
    support: float
    issues: _containers.RepeatedScalarFieldContainer[str]
    removed: bool
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., citations: _Optional[_Iterable[int]] = ..., spans: _Optional[_Iterable[int]] = ..., supported: bool = ..., support: _Optional[float] = ..., issues: _Optional[_Iterable[str]] = ..., removed: bool = ...) -> None: ...

class Groundedness(_message.Message):
    __slots__ = ("score", "unsupported_sentences", "policy", "refused", "unmatched_quotes")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_QUOTES_FIELD_NUMBER: _ClassVar[int]
    score: float
    unsupported_sentences: int
    policy: _tenant_pb2.UnsupportedSentences
    refused: bool
    unmatched_quotes: int
    def __init__(self, score: _Optional[float] = ..., unsupported_sentences: _Optional[int] = ..., policy: _Optional[_Union[_tenant_pb2.UnsupportedSentences, str]] = ..., refused: bool = ..., unmatched_quotes: _Optional[int] = ...) -> None: ...

class PiiMask(_message.Message):
    __slots__ = ("kind", "placeholder")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    placeholder: str
    def __init__(self, kind: _Optional[str] = ..., placeholder: _Optional[str] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("answer", "details")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    answer: str
    details: AnswerDetails
    def __init__(self, answer: _Optional[str] = ..., details: _Optional[_Union[AnswerDetails, _Mapping]] = ...) -> None: ...

class StreamAnswerResponse(_message.Message):
    __slots__ = ("delta", "details")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    delta: str
    details: AnswerDetails
    def __init__(self, delta: _Optional[str] = ..., details: _Optional[_Union[AnswerDetails, _Mapping]] = ...) -> None: ...
