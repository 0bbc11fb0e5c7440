"""Audit events from the services that are not the audit store (generation, retrieval).

`AuditTrail.record` builds the event from the caller's identity and hands it to a durable
outbox (servers/common/outbox/); it returns an awaitable that resolves once the event is
fsync'd in that outbox (group-committed with the others of the moment). Handlers await it
before they answer OK — a streamed answer after its last message, so the text is never
delayed — so a crash of this service right after an OK cannot lose the event. Nobody waits
for the audit store: the event reaches `AuditService.RecordAuditEvents` (metering) after
that, once, with the same event id, even across a metering outage or a restart of this
service.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import grpc

from copilot.v1 import audit_pb2, audit_pb2_grpc
from servers.common import identity
from servers.common.interceptors import detached_deadline
from servers.common.outbox import Outbox

log = logging.getLogger("copilot.audit")

DELIVERY_TIMEOUT_S = 5.0


class AuditTrail:
    def __init__(self, service: str, channel: grpc.aio.Channel, directory: Path, interval_s: float = 1.0) -> None:
        self.service = service
        self._stub = audit_pb2_grpc.AuditServiceStub(channel)
        self.outbox: Outbox[audit_pb2.AuditEvent] = Outbox(
            directory, self._deliver, audit_pb2.AuditEvent, name="audit.outbox",
            actor=identity.service_subject(service), interval_s=interval_s)

    def record(self, kind: audit_pb2.AuditEventKind, caller: identity.Identity | None = None,
               **details: Any) -> asyncio.Future[bool]:
        """Records one event for the caller's tenant (or `caller`'s). `details`: the one
        AuditEvent details field of the kind, e.g. question=QuestionAudit(...).

        The event is on its way when this returns; await the result before the call answers
        OK: it resolves once the event is durable here (False: it could be neither written
        nor delivered, logged). Cancelling that wait does not cancel the event."""
        who = caller or identity.current()
        event = audit_pb2.AuditEvent(event_id=f"{self.service}:{uuid.uuid4().hex}", kind=kind,
                                     actor=who.subject, actor_roles=sorted(who.roles), service=self.service,
                                     **details)
        event.occur_time.GetCurrentTime()
        return asyncio.shield(self.outbox.submit(who.tenant_id, event))

    def refused(self, caller: identity.Identity, method: str, code: grpc.StatusCode, reason: str,
                message: str) -> asyncio.Future[bool]:
        """The server interceptor's hook (lifecycle.Service.on_refusal); it awaits the result
        before it sends the refusal."""
        return self.record(audit_pb2.AUDIT_EVENT_KIND_REQUEST_REFUSED, caller, refusal=audit_pb2.RefusalAudit(
            rpc=method, code=code.name, reason=reason, message=message[:1000]))

    async def _deliver(self, tenant_id: str, events: list[audit_pb2.AuditEvent], redelivery: bool) -> None:
        # Not bounded by the request's deadline: the request is over, its audit must still land.
        with identity.acting_as_service(tenant_id, self.service), detached_deadline():
            await self._stub.RecordAuditEvents(audit_pb2.RecordAuditEventsRequest(
                events=events, redelivery=redelivery), timeout=DELIVERY_TIMEOUT_S)

    async def start(self) -> None:
        await self.outbox.start()

    async def stop(self) -> None:
        await self.outbox.stop()
