"""Bounds on what one client may cost a server process: the size of each request message
(per RPC), open streams per tenant and in total, idle uploads, consumers that stop reading,
and calls without a deadline.

A server interceptor enforces them for every copilot.v1 RPC. It sits inside the identity
interceptor, so it runs as the caller and its refusals become rich statuses (and audited
refusals) like any domain error. Envoy enforces the size limits it can in front (see
servers/edge/envoy_config.py); these checks also hold for calls that do not pass Envoy.
docs/bounds.md lists every bound, where it is enforced and what a client sees.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from servers.common import identity, metrics
from servers.common.errors import CopilotError, DeadlineExceeded, QuotaViolation, ResourceExhausted
from servers.common.interceptors import Context, Handler, ServerInterceptor, deadline_at_most
from servers.common.settings import BOUNDS_ENV, Bounds

log = logging.getLogger("copilot.bounds")

# Which Bounds field caps each RPC's request messages: every RPC of the contracts is listed
# (a unit test checks), so a new RPC gets a size chosen for it, not an accident.
QUERY, INGEST, INGEST_STREAM, DEFAULT = ("query_request_bytes", "ingest_request_bytes",
                                         "ingest_stream_message_bytes", "default_request_bytes")
METHOD_SIZES: dict[str, str] = {
    "/copilot.v1.GenerationService/Answer": QUERY,
    "/copilot.v1.GenerationService/StreamAnswer": QUERY,
    "/copilot.v1.RetrievalService/Search": QUERY,
    "/copilot.v1.RetrievalService/IngestDocuments": INGEST,
    "/copilot.v1.RetrievalService/StreamIngestDocuments": INGEST_STREAM,
    "/copilot.v1.RetrievalService/DeleteDocuments": DEFAULT,
    "/copilot.v1.RetrievalService/ProvisionTenant": DEFAULT,
    "/copilot.v1.RetrievalService/EraseTenant": DEFAULT,
    "/copilot.v1.RetrievalService/ConfigureSearch": DEFAULT,
    "/copilot.v1.RetrievalService/SetDocumentAccess": DEFAULT,
    # Services send these in batches (an ingest's audit event lists every document of it).
    "/copilot.v1.MeteringService/RecordUsage": INGEST,
    "/copilot.v1.AuditService/RecordAuditEvents": INGEST,
    "/copilot.v1.MeteringService/GetUsage": DEFAULT,
    "/copilot.v1.MeteringService/CheckQuota": DEFAULT,
    "/copilot.v1.MeteringService/ReserveQuota": DEFAULT,
    "/copilot.v1.MeteringService/ReleaseQuota": DEFAULT,
    "/copilot.v1.MeteringService/ReportBilling": DEFAULT,
    "/copilot.v1.MeteringService/ReconcileBilling": DEFAULT,
    "/copilot.v1.AuditService/ListAuditEvents": DEFAULT,
    "/copilot.v1.AuditService/ExportAuditEvents": DEFAULT,
    "/copilot.v1.AuditService/VerifyAuditChain": DEFAULT,
    "/copilot.v1.TenantService/CreateTenant": DEFAULT,
    "/copilot.v1.TenantService/GetTenant": DEFAULT,
    "/copilot.v1.TenantService/UpdateTenant": DEFAULT,
    "/copilot.v1.TenantService/ListTenants": DEFAULT,
    "/copilot.v1.TenantService/DeleteTenant": DEFAULT,
    "/copilot.v1.TenantService/SuspendTenant": DEFAULT,
    "/copilot.v1.TenantService/WatchTenants": DEFAULT,
}
BOUNDED_PREFIX = "/copilot.v1."

ENFORCED = Counter("copilot_bounds_enforced_total",
                   "Calls refused or ended by a bound, by bound (message_size, tenant_streams, server_streams, "
                   "ingest_idle, send_stalled, max_duration).", ["bound"])
for _bound in ("message_size", "tenant_streams", "server_streams", "ingest_idle", "send_stalled", "max_duration"):
    ENFORCED.labels(_bound)


def request_limit(bounds: Bounds, method: str) -> int:
    """The largest request message `method` accepts, in bytes."""
    return int(getattr(bounds, METHOD_SIZES.get(method, DEFAULT)))


def _rpc(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class MessageTooLarge(CopilotError):
    """A request message over its RPC's limit. RESOURCE_EXHAUSTED is what gRPC itself (and
    Envoy, for a body over a route's limit) answers for a message too large; there is no
    RetryInfo, since sending the same message again cannot succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "MESSAGE_TOO_LARGE"

    def __init__(self, method: str, size: int, limit: int, setting: str) -> None:
        super().__init__(f"{_rpc(method)} request message is {size} bytes, over this RPC's limit of {limit} "
                         f"bytes ({setting}); send smaller messages (smaller batches, or the streaming RPC)",
                         metadata={"limit_bytes": str(limit), "size_bytes": str(size), "setting": setting})
        self.method, self.limit = method, limit

    def details(self) -> list[Message]:
        quota = error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=f"rpc:{_rpc(self.method)}", description=f"request messages of at most {self.limit} bytes")])
        return [*super().details(), quota]


def check_size(bounds: Bounds, method: str, message: Any) -> None:
    """Refuses `message` when it is over `method`'s request limit."""
    limit = request_limit(bounds, method)
    size = message.ByteSize()
    if size > limit:
        ENFORCED.labels("message_size").inc()
        raise MessageTooLarge(method, size, limit, BOUNDS_ENV[METHOD_SIZES.get(method, DEFAULT)])


class StreamSlot:
    """One open stream's place in its tenant's and the server's count; released once,
    however the stream ends."""

    __slots__ = ("_limiter", "_released", "tenant")

    def __init__(self, limiter: StreamLimiter, tenant: str) -> None:
        self._limiter, self.tenant, self._released = limiter, tenant, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.tenant)


class StreamLimiter:
    """Open streams of one server process, per tenant and in total, each capped: one tenant
    cannot hold all of a server's streams, and all tenants together cannot hold more than the
    server was sized for. Counts only: nothing is queued, the excess is refused at once."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant, self.total = per_tenant, total
        self._open: dict[str, int] = {}
        self._count = 0
        # Changed on the event loop, read by the metrics thread at a scrape.
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> StreamSlot:
        with self._lock:
            held = self._open.get(tenant, 0)
            if held >= self.per_tenant:
                refused: ResourceExhausted | None = ResourceExhausted(
                    f"tenant {tenant} already has {held} open streams on this server, its limit "
                    f"(COPILOT_MAX_STREAMS_PER_TENANT={self.per_tenant}); close one, or retry later",
                    [QuotaViolation(f"tenant:{tenant}", f"at most {self.per_tenant} open streams per tenant "
                                                        "on one server")],
                    retry_after_s=1.0, reason="TOO_MANY_STREAMS",
                    metadata={"scope": "tenant", "limit": str(self.per_tenant)})
                bound = "tenant_streams"
            elif self._count >= self.total:
                refused = ResourceExhausted(
                    f"this server has {self._count} open streams, its limit "
                    f"(COPILOT_MAX_STREAMS_PER_SERVER={self.total}); retry later",
                    [QuotaViolation("server", f"at most {self.total} open streams on one server")],
                    retry_after_s=1.0, reason="SERVER_STREAMS_EXHAUSTED",
                    metadata={"scope": "server", "limit": str(self.total)})
                bound = "server_streams"
            else:
                refused = None
                self._open[tenant] = held + 1
                self._count += 1
        if refused is not None:
            ENFORCED.labels(bound).inc()
            raise refused
        return StreamSlot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            held = self._open.get(tenant, 0) - 1
            if held > 0:
                self._open[tenant] = held
            else:
                self._open.pop(tenant, None)
            self._count -= 1

    def open_streams(self, tenant: str | None = None) -> int:
        """Streams open now: a tenant's, or all of them."""
        with self._lock:
            return self._count if tenant is None else self._open.get(tenant, 0)

    def families(self) -> list[Any]:
        with self._lock:
            total, per_tenant = self._count, dict(self._open)
        ranked = sorted(per_tenant.items(), key=lambda kv: (-kv[1], kv[0]))
        by_tenant = GaugeMetricFamily(
            "copilot_streams_open_by_tenant", "Open streams per tenant on this server (tenants with any; "
            f"the top {metrics.max_tenant_series()}, the rest summed as tenant=\"_other\").", labels=["tenant"])
        for tenant, count in ranked[:metrics.max_tenant_series()]:
            by_tenant.add_metric([tenant], count)
        if rest := ranked[metrics.max_tenant_series():]:
            by_tenant.add_metric([metrics.OTHER_TENANT], sum(count for _, count in rest))
        return [GaugeMetricFamily("copilot_streams_open", "Open streams on this server (all tenants).", value=total),
                by_tenant]


class BoundsServerInterceptor(ServerInterceptor):
    """Enforces `bounds` on every copilot.v1 RPC of this server (see the module doc)."""

    def __init__(self, bounds: Bounds, limiter: StreamLimiter | None = None) -> None:
        self.bounds = bounds
        self.limiter = limiter or StreamLimiter(bounds.streams_per_tenant, bounds.streams_per_server)
        metrics.SOURCES.register("stream_limiter", self.limiter, "families")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(BOUNDED_PREFIX):
            return handler
        return _bounded(handler, details.method, self.bounds, self.limiter)


def _slot(limiter: StreamLimiter, context: Context) -> StreamSlot:
    caller = identity.current_or_none()
    slot = limiter.acquire(caller.tenant_id if caller is not None else "")
    # Released when the RPC ends whichever way (also when the client cancels while gRPC,
    # not this handler, is running); the handler's own exit releases it sooner.
    context.add_done_callback(lambda _ctx: slot.release())  # type: ignore[arg-type]
    return slot


def _cap(context: Context, cap_s: float) -> float | None:
    """The loop time by which a call without a client deadline must end; None when the client
    set one (gRPC enforces that itself)."""
    return asyncio.get_running_loop().time() + cap_s if context.time_remaining() is None else None


def _over_time(method: str, cap_s: float, setting: str) -> DeadlineExceeded:
    ENFORCED.labels("max_duration").inc()
    return DeadlineExceeded(f"{_rpc(method)} ran for {cap_s:g} s without a client deadline, this server's "
                            f"maximum ({setting}); set a deadline, or split the work", reason="SERVER_MAX_DURATION",
                            metadata={"limit_s": f"{cap_s:g}", "setting": setting})


async def _requests(requests: AsyncIterator[Any], method: str, bounds: Bounds,
                    idle_s: float | None) -> AsyncIterator[Any]:
    """The client's messages, each checked for size; with `idle_s`, a client that sends
    nothing for that long ends the call with DEADLINE_EXCEEDED."""
    it = requests.__aiter__()
    while True:
        try:
            if idle_s is None:
                message = await it.__anext__()
            else:
                async with asyncio.timeout(idle_s) as idle:
                    message = await it.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            if idle_s is None or not idle.expired():
                raise
            ENFORCED.labels("ingest_idle").inc()
            raise DeadlineExceeded(
                f"no message on this {_rpc(method)} stream for {idle_s:g} s (COPILOT_INGEST_IDLE_S); "
                "send the next batch sooner, or close the stream when done",
                reason="STREAM_IDLE", metadata={"limit_s": f"{idle_s:g}"}) from None
        check_size(bounds, method, message)
        yield message


def _stalled(flag: asyncio.Event, method: str) -> None:
    flag.set()
    log.warning("a stream's client stopped reading", extra={"rpc": method})


def _bounded(handler: Handler, method: str, bounds: Bounds,
             limiter: StreamLimiter) -> Handler:
    client_streaming = handler.request_streaming
    idle_s = bounds.ingest_idle_s if client_streaming else None

    if not handler.response_streaming:
        inner: Any = handler.unary_unary or handler.stream_unary

        async def unary_out(request: Any, context: Context) -> Any:
            if client_streaming:
                request = _requests(request, method, bounds, idle_s)
            else:
                check_size(bounds, method, request)
            deadline = _cap(context, bounds.max_call_s)
            if deadline is None:
                return await inner(request, context)
            with deadline_at_most(bounds.max_call_s):
                try:
                    async with asyncio.timeout_at(deadline) as cm:
                        return await inner(request, context)
                except TimeoutError:
                    if cm.expired():
                        raise _over_time(method, bounds.max_call_s, "COPILOT_MAX_CALL_S") from None
                    raise

        factory = grpc.stream_unary_rpc_method_handler if client_streaming else grpc.unary_unary_rpc_method_handler
        return factory(unary_out, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    inner_stream: Any = handler.unary_stream or handler.stream_stream

    async def stream_out(request: Any, context: Context) -> AsyncIterator[Any]:
        if client_streaming:
            request = _requests(request, method, bounds, idle_s)
        else:
            check_size(bounds, method, request)
        slot = _slot(limiter, context)
        loop = asyncio.get_running_loop()
        stalled = asyncio.Event()
        deadline = _cap(context, bounds.max_stream_s)
        responses = inner_stream(request, context).__aiter__()
        try:
            with deadline_at_most(bounds.max_stream_s) if deadline is not None else nullcontext():
                while True:
                    try:
                        async with asyncio.timeout_at(deadline) as cm:
                            item = await responses.__anext__()
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        if cm.expired():
                            raise _over_time(method, bounds.max_stream_s, "COPILOT_MAX_STREAM_S") from None
                        raise
                    # gRPC takes a message only as the client's flow-control window allows, so
                    # a client that stops reading holds a window's worth of bytes, no more, and
                    # stalls this yield. grpc.aio cannot end such a call from the server (a
                    # status queues behind the unread data): Envoy's idle timeout resets it at
                    # the edge; here the stall is logged and, if the client reads again, the
                    # stream ends with DEADLINE_EXCEEDED instead of going on.
                    stall = loop.call_later(bounds.stream_send_timeout_s, _stalled, stalled, method)
                    try:
                        yield item
                    finally:
                        stall.cancel()
                    if stalled.is_set():
                        ENFORCED.labels("send_stalled").inc()
                        raise DeadlineExceeded(
                            f"this {_rpc(method)} stream's client took no message for "
                            f"{bounds.stream_send_timeout_s:g} s (COPILOT_STREAM_SEND_TIMEOUT_S); read the stream "
                            "as it arrives", reason="SLOW_CONSUMER",
                            metadata={"limit_s": f"{bounds.stream_send_timeout_s:g}"})
        finally:
            slot.release()
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()

    factory = grpc.stream_stream_rpc_method_handler if client_streaming else grpc.unary_stream_rpc_method_handler
    return factory(stream_out, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)

