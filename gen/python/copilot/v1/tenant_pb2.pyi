import datetime

from copilot.v1 import common_pb2 as _common_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TenantState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENANT_STATE_UNSPECIFIED: _ClassVar[TenantState]
    TENANT_STATE_ACTIVE: _ClassVar[TenantState]
    TENANT_STATE_SUSPENDED: _ClassVar[TenantState]

class UnsupportedSentences(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNSUPPORTED_SENTENCES_UNSPECIFIED: _ClassVar[UnsupportedSentences]
    UNSUPPORTED_SENTENCES_FLAG: _ClassVar[UnsupportedSentences]
    UNSUPPORTED_SENTENCES_REMOVE: _ClassVar[UnsupportedSentences]
    UNSUPPORTED_SENTENCES_REFUSE: _ClassVar[UnsupportedSentences]
TENANT_STATE_UNSPECIFIED: TenantState
TENANT_STATE_ACTIVE: TenantState
TENANT_STATE_SUSPENDED: TenantState
UNSUPPORTED_SENTENCES_UNSPECIFIED: UnsupportedSentences
UNSUPPORTED_SENTENCES_FLAG: UnsupportedSentences
UNSUPPORTED_SENTENCES_REMOVE: UnsupportedSentences
UNSUPPORTED_SENTENCES_REFUSE: UnsupportedSentences

class TenantLimits(_message.Message):
    __slots__ = ("requests_per_second", "requests_per_minute", "requests_per_hour", "tokens_per_month", "max_documents")
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MONTH_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    requests_per_second: int
    requests_per_minute: int
    requests_per_hour: int
    tokens_per_month: int
    max_documents: int
    def __init__(self, requests_per_second: _Optional[int] = ..., requests_per_minute: _Optional[int] = ..., requests_per_hour: _Optional[int] = ..., tokens_per_month: _Optional[int] = ..., max_documents: _Optional[int] = ...) -> None: ...

class TenantConfig(_message.Message):
    __slots__ = ("provider", "model", "temperature", "max_tokens", "system_prompt", "retrieval_mode", "top_k", "pii_masking", "agentic_tools", "unsupported_sentences")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PII_MASKING_FIELD_NUMBER: _ClassVar[int]
    AGENTIC_TOOLS_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    provider: str
    model: str
    temperature: float
    max_tokens: int
    system_prompt: str
    retrieval_mode: _common_pb2.RetrievalMode
    top_k: int
    pii_masking: bool
    agentic_tools: bool
    unsupported_sentences: UnsupportedSentences
    def __init__(self, provider: _Optional[str] = ..., model: _Optional[str] = ..., temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., system_prompt: _Optional[str] = ..., retrieval_mode: _Optional[_Union[_common_pb2.RetrievalMode, str]] = ..., top_k: _Optional[int] = ..., pii_masking: bool = ..., agentic_tools: bool = ..., unsupported_sentences: _Optional[_Union[UnsupportedSentences, str]] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("tenant_id", "display_name", "plan", "state", "limits", "config", "config_version", "create_time", "update_time")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    display_name: str
    plan: _common_pb2.Plan
    state: TenantState
    limits: TenantLimits
    config: TenantConfig
    config_version: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., display_name: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.Plan, str]] = ..., state: _Optional[_Union[TenantState, str]] = ..., limits: _Optional[_Union[TenantLimits, _Mapping]] = ..., config: _Optional[_Union[TenantConfig, _Mapping]] = ..., config_version: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "display_name", "plan")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    display_name: str
    plan: _common_pb2.Plan
    def __init__(self, tenant_id: _Optional[str] = ..., display_name: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.Plan, str]] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class UpdateTenantRequest(_message.Message):
    __slots__ = ("tenant", "update_mask")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SuspendTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "suspended")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    suspended: bool
    def __init__(self, tenant_id: _Optional[str] = ..., suspended: bool = ...) -> None: ...

class SuspendTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class WatchTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchTenantsResponse(_message.Message):
    __slots__ = ("tenants", "deleted_tenant_ids", "snapshot_done")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    DELETED_TENANT_IDS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DONE_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    deleted_tenant_ids: _containers.RepeatedScalarFieldContainer[str]
    snapshot_done: bool
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., deleted_tenant_ids: _Optional[_Iterable[str]] = ..., snapshot_done: bool = ...) -> None: ...
