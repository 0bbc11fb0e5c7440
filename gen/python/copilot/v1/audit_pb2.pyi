import datetime

from copilot.v1 import common_pb2 as _common_pb2
from copilot.v1 import retrieval_pb2 as _retrieval_pb2
from copilot.v1 import tenant_pb2 as _tenant_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_EVENT_KIND_UNSPECIFIED: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_QUESTION: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_DOCUMENTS_INGESTED: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_DOCUMENTS_DELETED: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_TENANT_CREATED: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_TENANT_UPDATED: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_TENANT_DELETED: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_SEARCH_CONFIGURED: _ClassVar[AuditEventKind]
    AUDIT_EVENT_KIND_REQUEST_REFUSED: _ClassVar[AuditEventKind]

class AuditChainProblem(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_CHAIN_PROBLEM_UNSPECIFIED: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_HASH_MISMATCH: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_MISSING: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_PREV_HASH_MISMATCH: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_DUPLICATE: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_FORK: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_HEAD_MISMATCH: _ClassVar[AuditChainProblem]
AUDIT_EVENT_KIND_UNSPECIFIED: AuditEventKind
AUDIT_EVENT_KIND_QUESTION: AuditEventKind
AUDIT_EVENT_KIND_DOCUMENTS_INGESTED: AuditEventKind
AUDIT_EVENT_KIND_DOCUMENTS_DELETED: AuditEventKind
AUDIT_EVENT_KIND_TENANT_CREATED: AuditEventKind
AUDIT_EVENT_KIND_TENANT_UPDATED: AuditEventKind
AUDIT_EVENT_KIND_TENANT_DELETED: AuditEventKind
AUDIT_EVENT_KIND_SEARCH_CONFIGURED: AuditEventKind
AUDIT_EVENT_KIND_REQUEST_REFUSED: AuditEventKind
AUDIT_CHAIN_PROBLEM_UNSPECIFIED: AuditChainProblem
AUDIT_CHAIN_PROBLEM_HASH_MISMATCH: AuditChainProblem
AUDIT_CHAIN_PROBLEM_MISSING: AuditChainProblem
AUDIT_CHAIN_PROBLEM_PREV_HASH_MISMATCH: AuditChainProblem
AUDIT_CHAIN_PROBLEM_DUPLICATE: AuditChainProblem
AUDIT_CHAIN_PROBLEM_FORK: AuditChainProblem
AUDIT_CHAIN_PROBLEM_HEAD_MISMATCH: AuditChainProblem

class AuditCitation(_message.Message):
    __slots__ = ("document_id", "chunk_id")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    chunk_id: str
    def __init__(self, document_id: _Optional[str] = ..., chunk_id: _Optional[str] = ...) -> None: ...

class QuestionAudit(_message.Message):
    __slots__ = ("question", "mode_used", "answer_sha256", "citations", "provider", "model", "degraded", "degraded_reason", "latency", "request_id", "pii_placeholders", "input_tokens", "output_tokens", "withheld_documents")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MODE_USED_FIELD_NUMBER: _ClassVar[int]
    ANSWER_SHA256_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PII_PLACEHOLDERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    question: str
    mode_used: _common_pb2.RetrievalMode
    answer_sha256: str
    citations: _containers.RepeatedCompositeFieldContainer[AuditCitation]
    provider: str
    model: str
    degraded: bool
    degraded_reason: str
    latency: _duration_pb2.Duration
    request_id: str
    pii_placeholders: _containers.RepeatedScalarFieldContainer[str]
    input_tokens: int
    output_tokens: int
    withheld_documents: int
    def __init__(self, question: _Optional[str] = ..., mode_used: _Optional[_Union[_common_pb2.RetrievalMode, str]] = ..., answer_sha256: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[AuditCitation, _Mapping]]] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., degraded: bool = ..., degraded_reason: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_id: _Optional[str] = ..., pii_placeholders: _Optional[_Iterable[str]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., withheld_documents: _Optional[int] = ...) -> None: ...

class AuditedDocument(_message.Message):
    __slots__ = ("document_id", "content_hash", "status", "chunks")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    content_hash: str
    status: str
    chunks: int
    def __init__(self, document_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., status: _Optional[str] = ..., chunks: _Optional[int] = ...) -> None: ...

class DocumentsAudit(_message.Message):
    __slots__ = ("documents", "not_found")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[AuditedDocument]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, documents: _Optional[_Iterable[_Union[AuditedDocument, _Mapping]]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class TenantChangeAudit(_message.Message):
    __slots__ = ("before", "after", "changed_fields")
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    before: _tenant_pb2.Tenant
    after: _tenant_pb2.Tenant
    changed_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, before: _Optional[_Union[_tenant_pb2.Tenant, _Mapping]] = ..., after: _Optional[_Union[_tenant_pb2.Tenant, _Mapping]] = ..., changed_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchConfigAudit(_message.Message):
    __slots__ = ("before", "after")
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    before: _retrieval_pb2.SearchSettings
    after: _retrieval_pb2.SearchSettings
    def __init__(self, before: _Optional[_Union[_retrieval_pb2.SearchSettings, _Mapping]] = ..., after: _Optional[_Union[_retrieval_pb2.SearchSettings, _Mapping]] = ...) -> None: ...

class RefusalAudit(_message.Message):
    __slots__ = ("rpc", "code", "reason", "message")
    RPC_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    rpc: str
    code: str
    reason: str
    message: str
    def __init__(self, rpc: _Optional[str] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("event_id", "kind", "actor", "actor_roles", "occur_time", "service", "question", "documents", "tenant_change", "search_config", "refusal", "tenant_id", "seq", "record_time", "expire_time", "prev_hash", "hash")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ROLES_FIELD_NUMBER: _ClassVar[int]
    OCCUR_TIME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_CHANGE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_CONFIG_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORD_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    kind: AuditEventKind
    actor: str
    actor_roles: _containers.RepeatedScalarFieldContainer[str]
    occur_time: _timestamp_pb2.Timestamp
    service: str
    question: QuestionAudit
    documents: DocumentsAudit
    tenant_change: TenantChangeAudit
    search_config: SearchConfigAudit
    refusal: RefusalAudit
    tenant_id: str
    seq: int
    record_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    prev_hash: str
    hash: str
    def __init__(self, event_id: _Optional[str] = ..., kind: _Optional[_Union[AuditEventKind, str]] = ..., actor: _Optional[str] = ..., actor_roles: _Optional[_Iterable[str]] = ..., occur_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., service: _Optional[str] = ..., question: _Optional[_Union[QuestionAudit, _Mapping]] = ..., documents: _Optional[_Union[DocumentsAudit, _Mapping]] = ..., tenant_change: _Optional[_Union[TenantChangeAudit, _Mapping]] = ..., search_config: _Optional[_Union[SearchConfigAudit, _Mapping]] = ..., refusal: _Optional[_Union[RefusalAudit, _Mapping]] = ..., tenant_id: _Optional[str] = ..., seq: _Optional[int] = ..., record_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class RecordAuditEventsRequest(_message.Message):
    __slots__ = ("events", "redelivery")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REDELIVERY_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    redelivery: bool
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., redelivery: bool = ...) -> None: ...

class RecordAuditEventsResponse(_message.Message):
    __slots__ = ("recorded", "duplicates")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    duplicates: int
    def __init__(self, recorded: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class AuditFilter(_message.Message):
    __slots__ = ("start_time", "end_time", "actor", "kinds")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    actor: str
    kinds: _containers.RepeatedScalarFieldContainer[AuditEventKind]
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., kinds: _Optional[_Iterable[_Union[AuditEventKind, str]]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("tenant_id", "filter", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    filter: AuditFilter
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., filter: _Optional[_Union[AuditFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportAuditEventsRequest(_message.Message):
    __slots__ = ("tenant_id", "filter")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    filter: AuditFilter
    def __init__(self, tenant_id: _Optional[str] = ..., filter: _Optional[_Union[AuditFilter, _Mapping]] = ...) -> None: ...

class ExportAuditEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...

class VerifyAuditChainRequest(_message.Message):
    __slots__ = ("tenant_id", "expected_head")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HEAD_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    expected_head: AuditChainHead
    def __init__(self, tenant_id: _Optional[str] = ..., expected_head: _Optional[_Union[AuditChainHead, _Mapping]] = ...) -> None: ...

class AuditChainHead(_message.Message):
    __slots__ = ("seq", "hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hash: str
    def __init__(self, seq: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class AuditChainBreak(_message.Message):
    __slots__ = ("seq", "problem", "detail")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    problem: AuditChainProblem
    detail: str
    def __init__(self, seq: _Optional[int] = ..., problem: _Optional[_Union[AuditChainProblem, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class VerifyAuditChainResponse(_message.Message):
    __slots__ = ("tenant_id", "ok", "events_checked", "first_seq", "last_seq", "head_hash", "first_break", "anchor")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    EVENTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    FIRST_BREAK_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    ok: bool
    events_checked: int
    first_seq: int
    last_seq: int
    head_hash: str
    first_break: AuditChainBreak
    anchor: AuditChainHead
    def __init__(self, tenant_id: _Optional[str] = ..., ok: bool = ..., events_checked: _Optional[int] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., head_hash: _Optional[str] = ..., first_break: _Optional[_Union[AuditChainBreak, _Mapping]] = ..., anchor: _Optional[_Union[AuditChainHead, _Mapping]] = ...) -> None: ...
