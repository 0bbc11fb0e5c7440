import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_KIND_UNSPECIFIED: _ClassVar[UsageKind]
    USAGE_KIND_QUERY: _ClassVar[UsageKind]
    USAGE_KIND_INGEST: _ClassVar[UsageKind]
    USAGE_KIND_SEARCH: _ClassVar[UsageKind]
USAGE_KIND_UNSPECIFIED: UsageKind
USAGE_KIND_QUERY: UsageKind
USAGE_KIND_INGEST: UsageKind
USAGE_KIND_SEARCH: UsageKind

class UsageEvent(_message.Message):
    __slots__ = ("event_id", "kind", "model", "requests", "input_tokens", "output_tokens", "occur_time", "attributes", "reservation_id")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OCCUR_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    kind: UsageKind
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    occur_time: _timestamp_pb2.Timestamp
    attributes: _containers.ScalarMap[str, str]
    reservation_id: str
    def __init__(self, event_id: _Optional[str] = ..., kind: _Optional[_Union[UsageKind, str]] = ..., model: _Optional[str] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., occur_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., reservation_id: _Optional[str] = ...) -> None: ...

class RecordUsageRequest(_message.Message):
    __slots__ = ("events", "redelivery")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REDELIVERY_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[UsageEvent]
    redelivery: bool
    def __init__(self, events: _Optional[_Iterable[_Union[UsageEvent, _Mapping]]] = ..., redelivery: bool = ...) -> None: ...

class RecordUsageResponse(_message.Message):
    __slots__ = ("recorded", "duplicates")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    duplicates: int
    def __init__(self, recorded: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "tenant_id")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    tenant_id: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class ModelUsage(_message.Message):
    __slots__ = ("model", "requests", "input_tokens", "output_tokens", "cost_micros")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    def __init__(self, model: _Optional[str] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_micros: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("tenant_id", "start_time", "end_time", "requests", "input_tokens", "output_tokens", "total_tokens", "events", "by_model", "cost_micros", "currency")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    events: int
    by_model: _containers.RepeatedCompositeFieldContainer[ModelUsage]
    cost_micros: int
    currency: str
    def __init__(self, tenant_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., events: _Optional[int] = ..., by_model: _Optional[_Iterable[_Union[ModelUsage, _Mapping]]] = ..., cost_micros: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class CheckQuotaRequest(_message.Message):
    __slots__ = ("estimated_tokens",)
    ESTIMATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    estimated_tokens: int
    def __init__(self, estimated_tokens: _Optional[int] = ...) -> None: ...

class QuotaStatus(_message.Message):
    __slots__ = ("name", "limit", "used", "reset_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    RESET_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    limit: int
    used: int
    reset_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., reset_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CheckQuotaResponse(_message.Message):
    __slots__ = ("allowed", "quotas", "retry_after")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    quotas: _containers.RepeatedCompositeFieldContainer[QuotaStatus]
    retry_after: _duration_pb2.Duration
    def __init__(self, allowed: bool = ..., quotas: _Optional[_Iterable[_Union[QuotaStatus, _Mapping]]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReserveQuotaRequest(_message.Message):
    __slots__ = ("reservation_id", "tokens", "ttl")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    tokens: int
    ttl: _duration_pb2.Duration
    def __init__(self, reservation_id: _Optional[str] = ..., tokens: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReserveQuotaResponse(_message.Message):
    __slots__ = ("allowed", "quotas", "expire_time", "reservation_id", "tokens")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    quotas: _containers.RepeatedCompositeFieldContainer[QuotaStatus]
    expire_time: _timestamp_pb2.Timestamp
    reservation_id: str
    tokens: int
    def __init__(self, allowed: bool = ..., quotas: _Optional[_Iterable[_Union[QuotaStatus, _Mapping]]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reservation_id: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class ReleaseQuotaRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseQuotaResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool = ...) -> None: ...

class ReportBillingRequest(_message.Message):
    __slots__ = ("start_time", "end_time")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportBillingResponse(_message.Message):
    __slots__ = ("meter_events", "tenants")
    METER_EVENTS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    meter_events: int
    tenants: int
    def __init__(self, meter_events: _Optional[int] = ..., tenants: _Optional[int] = ...) -> None: ...

class ReconcileBillingRequest(_message.Message):
    __slots__ = ("start_time", "end_time")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BillingDifference(_message.Message):
    __slots__ = ("tenant_id", "meter", "clickhouse", "stripe")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    CLICKHOUSE_FIELD_NUMBER: _ClassVar[int]
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    meter: str
    clickhouse: int
    stripe: int
    def __init__(self, tenant_id: _Optional[str] = ..., meter: _Optional[str] = ..., clickhouse: _Optional[int] = ..., stripe: _Optional[int] = ...) -> None: ...

class ReconcileBillingResponse(_message.Message):
    __slots__ = ("tenants", "differences")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCES_FIELD_NUMBER: _ClassVar[int]
    tenants: int
    differences: _containers.RepeatedCompositeFieldContainer[BillingDifference]
    def __init__(self, tenants: _Optional[int] = ..., differences: _Optional[_Iterable[_Union[BillingDifference, _Mapping]]] = ...) -> None: ...
