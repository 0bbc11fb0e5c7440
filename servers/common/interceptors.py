"""Server and client interceptors: identity, deadlines, errors and the access log.

Server side: every handler runs with the caller's identity in a contextvar (and on the
current span), with its deadline remembered for outgoing calls, and with domain errors
turned into rich gRPC statuses. Client side: identity and the remaining deadline are
forwarded on every service-to-service call.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

from servers.common import identity as ident
from servers.common import metrics, telemetry
from servers.common.decoding import MalformedReport, tolerant_deserializer
from servers.common.errors import PASS_THROUGH, CopilotError, MalformedRequest, Unauthenticated

log = logging.getLogger("copilot.access")

# Calls that need no identity: probes and schema discovery.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Told about each call a domain error of this service refused with one of AUDITED_REFUSALS
# (caller, RPC, code, ErrorInfo reason, message): the audit trail's refused requests. Errors
# passed through from a peer are not reported again: the peer that refused reported them.
# What it returns, if anything, is awaited before the refusal is sent (its audit event is durable).
RefusalHook = Callable[[ident.Identity, str, grpc.StatusCode, str, str], Awaitable[Any] | None]
AUDITED_REFUSALS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED})

# Absolute deadline (time.monotonic()) of the call being served, for propagation.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("copilot_deadline", default=None)

# One interceptor serves every method, whatever its messages: grpc-stubs' generics over Any.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Metadata: TypeAlias = "tuple[tuple[str, str | bytes], ...]"
# What grpc.aio passes an interceptor as `continuation`: a coroutine function returning the
# call (grpc-stubs types it as returning the call itself).
Continuation: TypeAlias = Callable[[grpc.aio.ClientCallDetails, Any], Any]
if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryUnaryClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamClientInterceptor = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnaryClientInterceptor = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStreamClientInterceptor = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:  # generic only in the stubs: the runtime classes cannot be subscripted
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _UnaryUnaryClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamClientInterceptor = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnaryClientInterceptor = grpc.aio.StreamUnaryClientInterceptor
    _StreamStreamClientInterceptor = grpc.aio.StreamStreamClientInterceptor
# The base of this project's server interceptors, typed for mypy.
ServerInterceptor = _ServerInterceptor


class _Abort(Exception):
    """Carries a status to abort with once we are back in the handler's frame."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing


def _to_abort(exc: BaseException, method: str) -> _Abort:
    if isinstance(exc, CopilotError):
        status = exc.to_status()
        return _Abort(status.code, status.details, tuple(status.trailing_metadata))
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in PASS_THROUGH:
            peer_trailing: Any = exc.trailing_metadata() or ()
            trailing = tuple((k, v) for k, v in peer_trailing if k == "grpc-status-details-bin")
            return _Abort(exc.code(), exc.details() or "", trailing)
        log.warning("dependency failed", extra={"rpc": method, "peer_code": exc.code().name,
                                                "peer_message": exc.details()})
        return _Abort(grpc.StatusCode.UNAVAILABLE, "a dependency of this service is unavailable; retry later")
    log.exception("unhandled error", extra={"rpc": method})
    trace_id = trace.get_current_span().get_span_context().trace_id
    return _Abort(grpc.StatusCode.INTERNAL, f"internal error (trace {trace_id:032x})")


class IdentityServerInterceptor(_ServerInterceptor):
    """Runs each handler as the caller's verified identity; refuses calls without one."""

    def __init__(self, access_log: bool = True, on_refusal: RefusalHook | None = None,
                 malformed_log_interval_s: float = 10.0) -> None:
        self._access_log = access_log
        self._on_refusal = on_refusal
        self._decoding = _Decoding(malformed_log_interval_s)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        public = method.startswith(PUBLIC_PREFIXES)
        decoding = self._decoding
        metadata = details.invocation_metadata
        try:
            caller = ident.from_metadata(metadata)
        except Unauthenticated as exc:
            return _wrap(handler, method, None, exc, self._access_log, decoding, metadata=metadata)
        if caller is None and not public:
            err = Unauthenticated("missing verified identity: call through the edge with a valid token")
            return _wrap(handler, method, None, err, self._access_log, decoding, metadata=metadata)
        return _wrap(handler, method, caller, None, self._access_log, decoding, self._on_refusal, metadata)


class _Decoding:
    """A server's tolerant deserializers (made once per method: the hot path only looks one
    up) and its report of malformed requests."""

    def __init__(self, log_interval_s: float) -> None:
        self.report = MalformedReport(log_interval_s)
        self._deserializers: dict[str, Callable[[bytes], Any]] = {}

    def deserializer(self, method: str, handler: Handler) -> Callable[[bytes], Any] | None:
        original = handler.request_deserializer
        if original is None:  # a handler of raw bytes decodes nothing
            return None
        decode = self._deserializers.get(method)
        if decode is None:
            decode = tolerant_deserializer(method, original, streaming=handler.request_streaming)
            self._deserializers[method] = decode
        return decode


class DecodingServerInterceptor(_ServerInterceptor):
    """Malformed requests refused as INVALID_ARGUMENT on a server without the identity
    interceptor (the edge's companion, which Envoy calls): only the decoding, no identity,
    no access log; each method's handler is wrapped once."""

    def __init__(self, malformed_log_interval_s: float = 10.0) -> None:
        self._decoding = _Decoding(malformed_log_interval_s)
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        wrapped = _guard(handler, method, self._decoding)
        self._handlers[method] = wrapped
        return wrapped


def _guard(handler: Handler, method: str, decoding: _Decoding) -> Handler:
    """`handler` with malformed requests refused, and nothing else changed."""

    async def refuse(context: Context, refusal: MalformedRequest) -> None:
        decoding.report(method, None, refusal)
        status = refusal.to_status()
        await context.abort(status.code, status.details, trailing_metadata=tuple(status.trailing_metadata))

    if handler.unary_unary or handler.unary_stream:
        if handler.unary_unary:
            inner: Any = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                if isinstance(request, MalformedRequest):
                    await refuse(context, request)
                return await inner(request, context)

            behavior: Any = unary_unary
        else:
            inner_stream: Any = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, MalformedRequest):
                    await refuse(context, request)
                async for item in _responses(inner_stream(request, context)):
                    yield item

            behavior = unary_stream
    elif handler.stream_unary:
        inner_client: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: Context) -> Any:
            try:
                return await inner_client(requests, context)
            except MalformedRequest as refusal:
                await refuse(context, refusal)

        behavior = stream_unary
    else:
        inner_bidi: Any = handler.stream_stream

        async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in _responses(inner_bidi(requests, context)):
                    yield item
            except MalformedRequest as refusal:
                await refuse(context, refusal)

        behavior = stream_stream
    return handler_like(handler, behavior, decoding.deserializer(method, handler))


def handler_like(handler: Handler, behavior: Any, request_deserializer: Callable[[bytes], Any] | None) -> Handler:
    """A handler of the same kind (unary/stream each way) and response serializer as `handler`,
    running `behavior` instead."""
    kind = f"{'stream' if handler.request_streaming else 'unary'}_{'stream' if handler.response_streaming else 'unary'}"
    factory: Callable[..., Handler] = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(behavior, request_deserializer=request_deserializer,
                   response_serializer=handler.response_serializer)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """What a streaming handler yields: grpc.aio also accepts handlers that are coroutines
    writing with `context.write()` (grpc_health's Watch), which yield nothing here."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def _enter(caller: ident.Identity | None, context: Context, metadata: Metadata | None) -> list[Callable[[], None]]:
    """Sets the call's contextvars (deadline, identity, trace context); returns the resets."""
    resets: list[Callable[[], None]] = []
    remaining = context.time_remaining()
    dl_token = _deadline.set(time.monotonic() + remaining if remaining is not None else None)
    resets.append(lambda: _deadline.reset(dl_token))
    # None: spans are exported, and OpenTelemetry's interceptor made this call's span.
    ctx = telemetry.continue_trace(metadata)
    if caller is not None:
        id_token = ident._current.set(caller)
        resets.append(lambda: ident._current.reset(id_token))
        if ctx is None:
            span = trace.get_current_span()
            span.set_attribute("tenant.id", caller.tenant_id)
            span.set_attribute("enduser.id", caller.subject)
        ctx = baggage.set_baggage("tenant.id", caller.tenant_id, ctx)
    if ctx is not None:
        otel_token = otel_context.attach(ctx)
        resets.append(lambda: otel_context.detach(otel_token))
    return resets


def _reset(resets: list[Callable[[], None]]) -> None:
    for reset in reversed(resets):
        # A stream closed from another task runs this in a different context, where the
        # tokens do not apply; that context's values die with it anyway.
        with suppress(ValueError):
            reset()


def _finish(method: str, caller: ident.Identity | None, started: float, code: grpc.StatusCode,
            enabled: bool) -> None:
    elapsed = time.perf_counter() - started
    metrics.observe_rpc(method, code, elapsed)
    if enabled:
        log.info("rpc", extra={
            "rpc": method, "status": code.name, "tenant": caller.tenant_id if caller else None,
            "latency_ms": round(elapsed * 1000, 3),
        })


def _wrap(handler: Handler, method: str, caller: ident.Identity | None,
          refusal: CopilotError | None, access_log: bool, decoding: _Decoding,
          on_refusal: RefusalHook | None = None, metadata: Metadata | None = None) -> Handler:
    log_it = access_log and not method.startswith(PUBLIC_PREFIXES)

    async def _fail(context: Context, exc: BaseException, started: float) -> None:
        if isinstance(exc, MalformedRequest):
            decoding.report(method, caller.tenant_id if caller else None, exc)
        abort = _to_abort(exc, method)
        # A platform service refused on a tenant's behalf (e.g. generation's quota admission)
        # reports the refusal itself, naming the end user: not audited twice.
        if on_refusal is not None and caller is not None and isinstance(exc, CopilotError) \
                and abort.code in AUDITED_REFUSALS and ident.SERVICE not in caller.roles:
            try:
                pending = on_refusal(caller, method, abort.code, exc.reason, exc.message)
                if pending is not None:
                    await asyncio.shield(pending)
            except Exception:  # the refusal stands whatever its audit does
                log.exception("refusal hook failed", extra={"rpc": method})
        _finish(method, caller, started, abort.code, log_it)
        await context.abort(abort.code, abort.message, trailing_metadata=abort.trailing)

    if handler.unary_unary or handler.stream_unary:
        inner: Any = handler.unary_unary or handler.stream_unary

        async def unary_out(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            # Entered first: refusals and the access line are logged in the call's trace.
            resets = _enter(caller, context, metadata)  # caller is None when refused
            try:
                if refusal is not None:
                    await _fail(context, refusal, started)
                if isinstance(request, MalformedRequest):  # what the tolerant deserializer gives for bad bytes
                    await _fail(context, request, started)
                try:
                    response = await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _fail(context, exc, started)
                _finish(method, caller, started, grpc.StatusCode.OK, log_it)
                return response
            finally:
                _reset(resets)

        kind = "unary_unary" if handler.unary_unary else "stream_unary"
    else:
        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream_out(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            resets = _enter(caller, context, metadata)  # caller is None when refused
            try:
                if refusal is not None:
                    await _fail(context, refusal, started)
                if isinstance(request, MalformedRequest):
                    await _fail(context, request, started)
                try:
                    async for item in _responses(inner_stream(request, context)):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _fail(context, exc, started)
                _finish(method, caller, started, grpc.StatusCode.OK, log_it)
            finally:
                _reset(resets)

        kind = "unary_stream" if handler.unary_stream else "stream_stream"

    factory: Callable[..., Handler] = getattr(grpc, f"{kind}_rpc_method_handler")
    behavior = unary_out if kind in ("unary_unary", "stream_unary") else stream_out
    return factory(behavior, request_deserializer=decoding.deserializer(method, handler),
                   response_serializer=handler.response_serializer)


@contextmanager
def detached_deadline() -> Iterator[None]:
    """Outgoing calls in this block are not bounded by the served call's deadline (work
    that must finish after the caller gave up, such as writing its usage)."""
    token = _deadline.set(None)
    try:
        yield
    finally:
        _deadline.reset(token)


@contextmanager
def deadline_at_most(seconds: float) -> Iterator[None]:
    """Outgoing calls in this block end within `seconds` from now, or sooner by the served
    call's own deadline (a server's cap on calls without a deadline reaches its dependencies)."""
    cap = time.monotonic() + seconds
    current = _deadline.get()
    token = _deadline.set(cap if current is None else min(current, cap))
    try:
        yield
    finally:
        with suppress(ValueError):  # a stream closed from another task: see _reset
            _deadline.reset(token)


def remaining_deadline() -> float | None:
    """Seconds left of the call being served, or None when it has no deadline."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def _outgoing(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    caller = ident.current_or_none()
    if caller is None:
        # A bug, not a client error: every outgoing call acts for someone.
        raise RuntimeError(f"outgoing call {details.method!r} made without a tenant identity")
    metadata = grpc.aio.Metadata(*[(k, v) for k, v in (details.metadata or ())
                                   if k not in ident.IDENTITY_HEADERS and k != ident.INTERNAL_HEADER])
    for key, value in caller.metadata():
        metadata.add(key, value)
    metadata.add(ident.INTERNAL_HEADER, "1")
    for key, value in telemetry.trace_headers():
        metadata.add(key, value)
    timeout = details.timeout
    remaining = remaining_deadline()
    if remaining is not None:
        timeout = max(0.001, min(timeout, remaining) if timeout is not None else remaining)
    return grpc.aio.ClientCallDetails(method=details.method, timeout=timeout, metadata=metadata,
                                      credentials=details.credentials,
                                      # A peer that just restarted is waited for (within the
                                      # deadline) instead of failing the call while reconnecting.
                                      wait_for_ready=True if details.wait_for_ready is None else details.wait_for_ready)


# grpc.aio files each interceptor under the first call type it implements, so one object
# implementing all four would only ever see unary-unary calls: one class per call type.
class _ForwardUnaryUnary(_UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(_outgoing(client_call_details), request)


class _ForwardUnaryStream(_UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(_outgoing(client_call_details), request)


class _ForwardStreamUnary(_StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(_outgoing(client_call_details), request_iterator)


class _ForwardStreamStream(_StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Continuation, client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(_outgoing(client_call_details), request_iterator)


def identity_client_interceptors() -> list[Any]:
    """Forward the current identity and the remaining deadline on every outgoing call."""
    return [_ForwardUnaryUnary(), _ForwardUnaryStream(), _ForwardStreamUnary(), _ForwardStreamStream()]
