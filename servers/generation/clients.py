"""The generation service's calls to other services, in domain types (models.py).

Each client converts protobuf ↔ domain at this edge, so the pipeline never sees a stub or a
message. Errors a peer returns are not translated: a `grpc.aio.AioRpcError` propagates
unchanged, so the server interceptor passes its status and rich details (e.g. a refused
CheckQuota's QuotaFailure) through to the caller as before (`errors.PASS_THROUGH`).

Identity: an outgoing call carries whatever identity is in the context (the client
interceptor forwards it). Calls made for a request (quota, search, audit) run as its caller.
Usage is written by this service for a tenant given explicitly (`Usage.tenant_id`), because
its delivery may happen later, outside any request: after a restart the outbox replays its
events with the tenant stored next to each, and `MeteringClient.record_usage` is the one
place that acts as that tenant's service account for the call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from copilot.v1 import audit_pb2, metering_pb2, metering_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from servers.common import identity, metrics, telemetry
from servers.common.audit import AuditTrail
from servers.common.errors import quota_refusal_of
from servers.common.interceptors import detached_deadline
from servers.common.outbox import Outbox
from servers.common.retry import TRANSIENT_CODES, Backoff, retry
from servers.generation.convert import (
    location_from_proto,
    mode_to_proto,
    search_mode_from_proto,
    search_mode_to_proto,
)
from servers.generation.models import (
    AnsweredQuestion,
    QuotaDecision,
    QuotaStatus,
    SearchMode,
    SearchResult,
    Usage,
)
from servers.generation.providers import Passage

log = logging.getLogger("copilot.generation")

# Failures worth retrying (usage) or bridging with an earlier decision (quota): the peer is
# restarting or slow, not refusing.
RETRYABLE = TRANSIENT_CODES
# While Metering is unreachable, a tenant it allowed this recently is still answered (and
# its usage kept in the outbox): a metering restart must not take answers down.
QUOTA_GRACE_S = 120.0
QUOTA_TIMEOUT_S = 2.0
# A short burst while the caller's usage write is in flight; the outbox redelivers after that.
USAGE_RETRY = Backoff(base_s=0.1, cap_s=1.0, max_attempts=3)
USAGE_TIMEOUT_S = 3.0
# A cap; the caller's remaining deadline (forwarded by the client interceptor) is shorter.
SEARCH_TIMEOUT_S = 10.0
# Retrieval's trailer on Search to a peer of the mesh (servers/retrieval/service.py): documents
# withheld from the caller, for the answer's audit event.
WITHHELD_TRAILER = "x-copilot-withheld"
# Usage is written by the platform for the caller's tenant: end users hold no write role.
SERVICE_NAME = "generation"


class MeteringClient:
    """Quota decisions for the calling tenant, and usage written for a given tenant."""

    def __init__(self, channel: grpc.aio.Channel, *, quota_timeout_s: float = QUOTA_TIMEOUT_S,
                 quota_grace_s: float = QUOTA_GRACE_S, usage_timeout_s: float = USAGE_TIMEOUT_S) -> None:
        self._stub = metering_pb2_grpc.MeteringServiceStub(channel)
        self._quota_timeout_s = quota_timeout_s
        self._usage_timeout_s = usage_timeout_s
        self._grace_s = quota_grace_s
        self._last_allowed: dict[str, float] = {}

    async def reserve(self, reservation_id: str, tokens: int) -> QuotaDecision:
        """Admits the calling tenant's request: holds one request and `tokens` of its quotas
        until the answer's usage (carrying `reservation_id`) settles them, `release` drops
        them, or they expire. A retried reserve with the same id holds nothing more. A refusal
        is the RPC's RESOURCE_EXHAUSTED (its QuotaFailure and RetryInfo reach the caller
        unchanged, as this service's own refusal). While Metering cannot be reached, a tenant admitted within the grace
        period is admitted again without a hold (`stale`); otherwise the RPC's error stands."""
        with telemetry.span("quota.reserve", {"copilot.reserved_tokens": tokens}):
            tenant = identity.tenant_id()
            try:
                # Admission is the platform's act for the caller's tenant (members hold no
                # right to reserve: they could lock their own tenant out).
                with identity.acting_as_service(tenant, SERVICE_NAME):
                    response = await self._stub.ReserveQuota(
                        metering_pb2.ReserveQuotaRequest(reservation_id=reservation_id, tokens=tokens),
                        timeout=self._quota_timeout_s)
            except grpc.aio.AioRpcError as exc:
                allowed_at = self._last_allowed.get(tenant)
                if exc.code() in RETRYABLE and allowed_at is not None \
                        and time.monotonic() - allowed_at < self._grace_s:
                    log.warning("metering unreachable; answering on the last quota decision",
                                extra={"code": exc.code().name})
                    return QuotaDecision(allowed=True, stale=True)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._last_allowed.pop(tenant, None)
                    # This service's refusal of its caller's question (audited naming the
                    # caller), with metering's quota details.
                    raise quota_refusal_of(exc) from None
                raise
        self._last_allowed[tenant] = time.monotonic()
        return QuotaDecision(allowed=True, quotas=[QuotaStatus(name=q.name, used=q.used, limit=q.limit)
                                                  for q in response.quotas])

    async def release(self, tenant_id: str, reservation_id: str) -> None:
        """Drops a reservation whose answer will record no usage (it failed or was cancelled
        first). Best effort: the hold's expiry frees it anyway."""
        with identity.acting_as_service(tenant_id, SERVICE_NAME), detached_deadline():
            try:
                await self._stub.ReleaseQuota(metering_pb2.ReleaseQuotaRequest(reservation_id=reservation_id),
                                              timeout=self._quota_timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.warning("could not release a quota reservation; it expires instead",
                            extra={"code": exc.code().name})

    async def record_usage(self, tenant_id: str, events: list[metering_pb2.UsageEvent],
                           redelivery: bool = False) -> None:
        """Writes `tenant_id`'s usage events (the outbox's stored form), retrying transient
        failures with the same event ids; raises when Metering did not take them. Metering
        deduplicates every usage event by its id; `redelivery` (the outbox's replays) and
        every retry here say the ids may have been sent before, which makes Metering look
        them up among its stored events (a first delivery may skip that)."""
        attempts = 0

        def send() -> Awaitable[metering_pb2.RecordUsageResponse]:
            nonlocal attempts
            attempts += 1
            # A retry after a timeout may follow an attempt Metering did record.
            request = metering_pb2.RecordUsageRequest(events=events, redelivery=redelivery or attempts > 1)
            return self._stub.RecordUsage(request, timeout=self._usage_timeout_s)

        # Not bounded by the caller's deadline: the answer was given, so its usage must be
        # written even when the caller's time ran out.
        with identity.acting_as_service(tenant_id, SERVICE_NAME), detached_deadline():
            await retry(send, USAGE_RETRY)


def usage_event(usage: Usage) -> metering_pb2.UsageEvent:
    return metering_pb2.UsageEvent(
        event_id=usage.event_id, reservation_id=usage.reservation_id, kind=metering_pb2.USAGE_KIND_QUERY,
        model=usage.model, requests=1,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        occur_time=timestamp_pb2.Timestamp(seconds=usage.occurred_at_s),
        attributes={"user": usage.user, "provider": usage.provider})


class UsageRecorder:
    """Answers' usage, exactly once: each event goes to Metering and into a durable local
    outbox at once (servers/common/outbox.py, `record`); what Metering did not take is
    redelivered from the outbox, after a restart too, with the same event id."""

    def __init__(self, metering: MeteringClient, directory: Path) -> None:
        self.outbox: Outbox[metering_pb2.UsageEvent] = Outbox(
            directory, metering.record_usage, metering_pb2.UsageEvent, name="usage.outbox",
            actor=identity.service_subject(SERVICE_NAME),
            depth_metric=metrics.USAGE_OUTBOX_DEPTH)

    async def record(self, usage: Usage) -> bool:
        """Returns once the usage is safe (acknowledged by Metering or durable here); False
        when only the outbox has it (the answer reports its usage as pending)."""
        with telemetry.span("usage.write", {"copilot.usage_event_id": usage.event_id}) as current:
            written = await self.outbox.record(usage.tenant_id, usage_event(usage))
            current.set_attribute("copilot.usage_pending", not written)
            return written

    async def start(self) -> None:
        await self.outbox.start()

    async def stop(self) -> None:
        await self.outbox.stop()


class RetrievalClient:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = SEARCH_TIMEOUT_S) -> None:
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        self._timeout_s = timeout_s

    async def search(self, query: str, top_k: int, filters: Mapping[str, str], mode: SearchMode) -> SearchResult:
        """The calling tenant's passages for `query`, best first, and the mode retrieval ran
        (it may run another than asked, e.g. BM25 without an embedder)."""
        wanted = search_mode_to_proto(mode)
        with telemetry.span("retrieval.search", {"copilot.search_mode": retrieval_pb2.SearchMode.Name(wanted)}):
            call = self._stub.Search(retrieval_pb2.SearchRequest(
                query=query, top_k=top_k, filters=dict(filters), mode=wanted), timeout=self._timeout_s)
            response = await call
            trailing = await call.trailing_metadata()
        return SearchResult(
            passages=[Passage(document_id=h.document_id, chunk_id=h.chunk_id, title=h.title, section=h.section,
                              text=h.text, score=h.score, source=h.source, location=location_from_proto(h),
                              access=tuple(h.access))
                      for h in response.hits],
            mode=search_mode_from_proto(response.mode), withheld=_withheld(trailing))


def _withheld(trailing: object) -> int:
    """Retrieval's count of documents withheld from the caller (a trailer it sends only to
    peers of the mesh, `identity.INTERNAL_HEADER`); 0 when absent."""
    for key, value in trailing or ():  # type: ignore[attr-defined]
        if key == WITHHELD_TRAILER:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return int(text) if text.isdigit() else 0
    return 0


class QuestionAuditor:
    """Questions into the audit trail (servers/common/audit.py), as the calling user."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def record(self, answered: AnsweredQuestion) -> Awaitable[bool]:
        """Resolves once the event is durable in the audit outbox (see `AuditTrail.record`)."""
        latency = duration_pb2.Duration()
        latency.FromNanoseconds(int(answered.latency_s * 1e9))
        return self._trail.record(audit_pb2.AUDIT_EVENT_KIND_QUESTION, question=audit_pb2.QuestionAudit(
            question=answered.question, mode_used=mode_to_proto(answered.mode_used),
            answer_sha256=answered.answer_sha256,
            citations=[audit_pb2.AuditCitation(document_id=c.document_id, chunk_id=c.chunk_id)
                       for c in answered.citations],
            provider=answered.provider, model=answered.model, degraded=answered.degraded,
            degraded_reason=answered.degraded_reason, latency=latency, request_id=answered.request_id,
            pii_placeholders=list(answered.pii_placeholders), input_tokens=answered.input_tokens,
            output_tokens=answered.output_tokens, withheld_documents=answered.withheld_documents))
