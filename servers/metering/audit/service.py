"""AuditService (hosted by the metering server) and metering's own audit events.

Other services record through `RecordAuditEvents` (role `service`, from their durable
outbox, off the request path); metering records tenant changes and the requests it refused
straight into the audit store (the same durable log). A tenant's `admin` reads its own trail,
a platform operator any tenant's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import TypedDict

import grpc
from google.protobuf import json_format, timestamp_pb2
from grpc.aio import ServicerContext

from copilot.v1 import audit_pb2, audit_pb2_grpc
from servers.common import identity
from servers.common.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from servers.metering import convert
from servers.metering.audit.chain import (
    DUPLICATE,
    FORK,
    HASH_MISMATCH,
    HEAD_MISMATCH,
    MISSING,
    PREV_HASH_MISMATCH,
    AuditRow,
    Head,
    NewEvent,
)
from servers.metering.audit.store import AuditStore
from servers.metering.tenants.domain import Tenant, validate_tenant_id
from servers.metering.tenants.plans import Plan
from servers.metering.tenants.store import TenantStore

log = logging.getLogger("copilot.metering.audit")

# Days an event is kept, by the tenant's plan when it is recorded (enforced by the table's TTL).
RETENTION_DAYS: dict[Plan, int] = {Plan.FREE: 365, Plan.PRO: 3 * 365 + 1, Plan.ENTERPRISE: 7 * 365 + 2}
# A tenant that no longer exists (events in flight at its deletion): the longest.
DEFAULT_RETENTION_DAYS = max(RETENTION_DAYS.values())

MAX_BATCH = 1000
MAX_EVENT_ID = 128
MAX_ACTOR = 256
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
EXPORT_BATCH = 500

# Stored kind names (short, stable, readable in ClickHouse) ↔ the contract's enum.
KINDS: dict[audit_pb2.AuditEventKind, str] = {
    audit_pb2.AUDIT_EVENT_KIND_QUESTION: "question",
    audit_pb2.AUDIT_EVENT_KIND_DOCUMENTS_INGESTED: "documents_ingested",
    audit_pb2.AUDIT_EVENT_KIND_DOCUMENTS_DELETED: "documents_deleted",
    audit_pb2.AUDIT_EVENT_KIND_TENANT_CREATED: "tenant_created",
    audit_pb2.AUDIT_EVENT_KIND_TENANT_UPDATED: "tenant_updated",
    audit_pb2.AUDIT_EVENT_KIND_TENANT_DELETED: "tenant_deleted",
    audit_pb2.AUDIT_EVENT_KIND_SEARCH_CONFIGURED: "search_configured",
    audit_pb2.AUDIT_EVENT_KIND_REQUEST_REFUSED: "request_refused",
}
KIND_VALUES = {name: value for value, name in KINDS.items()}
PROBLEMS = {HASH_MISMATCH: audit_pb2.AUDIT_CHAIN_PROBLEM_HASH_MISMATCH, MISSING: audit_pb2.AUDIT_CHAIN_PROBLEM_MISSING,
            PREV_HASH_MISMATCH: audit_pb2.AUDIT_CHAIN_PROBLEM_PREV_HASH_MISMATCH,
            DUPLICATE: audit_pb2.AUDIT_CHAIN_PROBLEM_DUPLICATE, FORK: audit_pb2.AUDIT_CHAIN_PROBLEM_FORK,
            HEAD_MISMATCH: audit_pb2.AUDIT_CHAIN_PROBLEM_HEAD_MISMATCH}


class _Filters(TypedDict):
    """ListAuditEvents' and ExportAuditEvents' filter, as AuditStore.list_page takes it."""

    start: datetime | None
    end: datetime | None
    actor: str
    kinds: list[str]


def details_json(event: audit_pb2.AuditEvent) -> str:
    """The kind's details as canonical JSON (what is stored and hashed)."""
    which = event.WhichOneof("details")
    body = {which: json_format.MessageToDict(getattr(event, which), preserving_proto_field_name=True)} if which else {}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _ts(micros: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def row_pb(row: AuditRow) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        event_id=row.event_id, kind=KIND_VALUES.get(row.kind, audit_pb2.AUDIT_EVENT_KIND_UNSPECIFIED),
        actor=row.actor, actor_roles=[r for r in row.actor_roles.split(",") if r], occur_time=_ts(row.occur_us),
        service=row.service, tenant_id=row.tenant_id, seq=row.seq, record_time=_ts(row.record_us),
        expire_time=_ts(row.expire_us), prev_hash=row.prev_hash, hash=row.hash)
    try:
        json_format.ParseDict(json.loads(row.details), event, ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError):
        # An edited row still lists (verify says where); its details are not readable.
        log.warning("unreadable audit details", extra={"tenant_id": row.tenant_id, "seq": row.seq})
    return event


def new_event(tenant_id: str, index: int, message: audit_pb2.AuditEvent, retention_days: int,
              now: datetime) -> NewEvent:
    """Validates one reported event (INVALID_ARGUMENT naming the field)."""
    prefix = f"events[{index}]"
    if not 1 <= len(message.event_id) <= MAX_EVENT_ID:
        raise InvalidArgument.field(f"{prefix}.event_id", f"required, 1..{MAX_EVENT_ID} characters")
    kind = KINDS.get(message.kind)
    if kind is None:
        raise InvalidArgument.field(f"{prefix}.kind", f"unknown or unspecified kind {message.kind}")
    if len(message.actor) > MAX_ACTOR:
        raise InvalidArgument.field(f"{prefix}.actor", f"at most {MAX_ACTOR} characters")
    occur = message.occur_time.ToDatetime(tzinfo=UTC) if message.HasField("occur_time") else now
    if occur > now + timedelta(days=1) or occur.year < 2020:
        raise InvalidArgument.field(f"{prefix}.occur_time", "must be after 2020 and at most a day ahead")
    return NewEvent(tenant_id=tenant_id, event_id=message.event_id, kind=kind, actor=message.actor or "anonymous",
                    actor_roles=",".join(sorted(set(message.actor_roles))), service=message.service[:64],
                    occur_time=occur, details=details_json(message), retention_days=retention_days)


def _page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode()


def _after(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        prefix, _, value = text.partition(":")
        if prefix != "after" or not value.isdigit():
            raise ValueError(text)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument.field("page_token", "not a token this service issued") from None


def _caller_audit_tenant(requested: str) -> str:
    """The tenant whose trail a read acts on: the caller's own (role admin), or any for an operator."""
    caller = identity.require_role(identity.ADMIN)
    if not requested or requested == caller.tenant_id:
        return caller.tenant_id
    if identity.OPERATOR not in caller.roles:
        raise PermissionDenied("only a platform operator may read another tenant's audit trail",
                               reason="CROSS_TENANT")
    return validate_tenant_id(requested)


class MeteringAudit:
    """Metering's own audit events (tenant changes, refused requests), written to the store."""

    def __init__(self, store: AuditStore, tenants: TenantStore) -> None:
        self.store = store
        self._tenants = tenants
        self._background: set[asyncio.Task[None]] = set()

    async def retention_days(self, tenant_id: str) -> int:
        try:
            tenant = await self._tenants.get(tenant_id)
        except NotFound:
            return DEFAULT_RETENTION_DAYS
        return RETENTION_DAYS.get(tenant.plan, DEFAULT_RETENTION_DAYS)

    async def record(self, tenant_id: str, message: audit_pb2.AuditEvent, caller: identity.Identity | None = None,
                     plan: Plan | None = None) -> None:
        """Records one event; a failure is logged, never raised (the change it describes happened)."""
        who = caller or identity.current()
        message.event_id = message.event_id or f"metering:{uuid.uuid4().hex}"
        message.actor, message.service = who.subject, "metering"
        message.actor_roles[:] = sorted(who.roles)
        if not message.HasField("occur_time"):
            message.occur_time.GetCurrentTime()
        try:
            days = RETENTION_DAYS[plan] if plan is not None else await self.retention_days(tenant_id)
            await self.store.record([new_event(tenant_id, 0, message, days, datetime.now(UTC))])
        except Exception:
            log.exception("audit event not recorded", extra={"tenant_id": tenant_id,
                                                             "kind": KINDS.get(message.kind)})

    async def tenant_change(self, kind: audit_pb2.AuditEventKind, before: Tenant | None, after: Tenant | None,
                            changed: Iterable[str] = (), tenant_id: str | None = None) -> None:
        change = audit_pb2.TenantChangeAudit(changed_fields=sorted(changed))
        if before is not None:
            change.before.CopyFrom(convert.tenant_pb(before))
        if after is not None:
            change.after.CopyFrom(convert.tenant_pb(after))
        current = after or before
        if current is None:
            raise ValueError("a tenant change has the tenant before or after it")
        target = tenant_id or current.tenant_id
        await self.record(target, audit_pb2.AuditEvent(kind=kind, tenant_change=change),
                          plan=current.plan if target == current.tenant_id else None)

    def refused(self, caller: identity.Identity, method: str, code: grpc.StatusCode, reason: str,
                message: str) -> asyncio.Task[None]:
        """The server interceptor's hook, once per refused call: it awaits the task (the event
        durable in the store's log) before it sends the refusal."""
        event = audit_pb2.AuditEvent(kind=audit_pb2.AUDIT_EVENT_KIND_REQUEST_REFUSED, refusal=audit_pb2.RefusalAudit(
            rpc=method, code=code.name, reason=reason, message=message[:1000]))
        task = asyncio.get_running_loop().create_task(self.record(caller.tenant_id, event, caller))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def settled(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)


class AuditServiceServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit: MeteringAudit) -> None:
        self._audit = audit
        self._store = audit.store

    async def RecordAuditEvents(
        self, request: audit_pb2.RecordAuditEventsRequest,
        context: ServicerContext[audit_pb2.RecordAuditEventsRequest, audit_pb2.RecordAuditEventsResponse],
    ) -> audit_pb2.RecordAuditEventsResponse:
        caller = identity.current()
        # Strictly the platform's services: not even an operator writes someone's trail.
        if identity.SERVICE not in caller.roles:
            raise PermissionDenied("only platform services record audit events", reason="MISSING_ROLE")
        if not request.events:
            raise InvalidArgument.field("events", "send at least one event")
        if len(request.events) > MAX_BATCH:
            raise InvalidArgument("too many events", [FieldViolation("events", f"at most {MAX_BATCH} per request")])
        now = datetime.now(UTC)
        days = await self._audit.retention_days(caller.tenant_id)
        events = [new_event(caller.tenant_id, i, e, days, now) for i, e in enumerate(request.events)]
        recorded, duplicates = await self._store.record(events, check_stored=request.redelivery)
        return audit_pb2.RecordAuditEventsResponse(recorded=recorded, duplicates=duplicates)

    def _filter(self, f: audit_pb2.AuditFilter) -> _Filters:
        start = convert.moment(f.start_time, "filter.start_time") if f.HasField("start_time") else None
        end = convert.moment(f.end_time, "filter.end_time") if f.HasField("end_time") else None
        if start is not None and end is not None and start >= end:
            raise InvalidArgument.field("filter.start_time", "must be before filter.end_time")
        kinds = []
        for value in f.kinds:
            if value not in KINDS:
                raise InvalidArgument.field("filter.kinds", f"unknown kind {value}")
            kinds.append(KINDS[value])
        return _Filters(start=start, end=end, actor=f.actor, kinds=kinds)

    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest,
        context: ServicerContext[audit_pb2.ListAuditEventsRequest, audit_pb2.ListAuditEventsResponse],
    ) -> audit_pb2.ListAuditEventsResponse:
        tenant_id = _caller_audit_tenant(request.tenant_id)
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument.field("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})")
        filters = self._filter(request.filter)
        page = await self._store.list_page(tenant_id, after=_after(request.page_token),
                                           limit=request.page_size or DEFAULT_PAGE_SIZE, **filters)
        return audit_pb2.ListAuditEventsResponse(events=[row_pb(r) for r in page.rows],
                                                 next_page_token=_page_token(page.last_seq) if page.more else "")

    async def ExportAuditEvents(
        self, request: audit_pb2.ExportAuditEventsRequest,
        context: ServicerContext[audit_pb2.ExportAuditEventsRequest, audit_pb2.ExportAuditEventsResponse],
    ) -> AsyncIterator[audit_pb2.ExportAuditEventsResponse]:
        tenant_id = _caller_audit_tenant(request.tenant_id)
        filters = self._filter(request.filter)
        after = 0
        while True:
            page = await self._store.list_page(tenant_id, after=after, limit=EXPORT_BATCH, **filters)
            if page.rows:
                yield audit_pb2.ExportAuditEventsResponse(events=[row_pb(r) for r in page.rows])
            if not page.more:
                return
            after = page.last_seq

    async def VerifyAuditChain(
        self, request: audit_pb2.VerifyAuditChainRequest,
        context: ServicerContext[audit_pb2.VerifyAuditChainRequest, audit_pb2.VerifyAuditChainResponse],
    ) -> audit_pb2.VerifyAuditChainResponse:
        tenant_id = _caller_audit_tenant(request.tenant_id)
        expected = None
        if request.HasField("expected_head"):
            wanted = request.expected_head
            if wanted.seq < 1:
                raise InvalidArgument.field("expected_head.seq", "must be 1 or more")
            if len(wanted.hash) != 64 or any(c not in "0123456789abcdef" for c in wanted.hash):
                raise InvalidArgument.field("expected_head.hash", "must be a SHA-256 in lowercase hex (64 characters)")
            expected = Head(wanted.seq, wanted.hash, 0)
        result = await self._store.verify(tenant_id, expected)
        response = audit_pb2.VerifyAuditChainResponse(
            tenant_id=tenant_id, ok=result.ok, events_checked=result.checked, first_seq=result.first_seq,
            last_seq=result.last_seq, head_hash=result.head_hash)
        if result.anchor is not None:
            response.anchor.CopyFrom(audit_pb2.AuditChainHead(seq=result.anchor.seq, hash=result.anchor.hash))
        if result.first_break is not None:
            response.first_break.CopyFrom(audit_pb2.AuditChainBreak(
                seq=result.first_break.seq, problem=PROBLEMS[result.first_break.problem],
                detail=result.first_break.detail))
        return response
