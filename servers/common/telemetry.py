"""OpenTelemetry: a tracer provider per process and the gRPC instrumentation.

Spans are exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set. Otherwise
nothing is recorded and OpenTelemetry's gRPC interceptors are not installed: the identity
interceptors, which run on every hop anyway, carry the W3C trace context instead
(`continue_trace` on the server side, `trace_headers` on calls out), so each call still
runs under a (non-recording) span whose trace id the log lines carry from service to
service.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from servers.common import identity

_provider: TracerProvider | None = None


class TenantSpanProcessor(SpanProcessor):
    """Puts the acting tenant on every span as it starts (client spans and the service's
    own spans too, not only the server span the interceptor annotates)."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        caller = identity.current_or_none()
        if caller is not None:
            span.set_attribute("tenant.id", caller.tenant_id)
            span.set_attribute("enduser.id", caller.subject)


# The services' own spans (pipeline stages, provider calls, quota checks, usage writes);
# a proxy until setup() installs the provider, so modules can take it at import.
tracer = trace.get_tracer("copilot")
_propagator = TraceContextTextMapPropagator()


# Whether spans leave the process. The services' own stage spans (below) only matter when
# they do: without an exporter they are skipped (each costs ~30 us of CPU), and so are
# OpenTelemetry's gRPC interceptors (about 160 us of CPU per call, client and server,
# bench/interceptors.py), while trace ids still reach the logs and the next hop.
_exporting = False


def exporting() -> bool:
    return _exporting


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None,
         links: Sequence[trace.Link] = ()) -> Iterator[trace.Span]:
    """A child span of the current one (tenant and user added by TenantSpanProcessor); a
    no-op span when nothing is exported."""
    if not _exporting:
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(name, links=links, attributes=attributes) as current:
        yield current


def start_span(name: str, attributes: Mapping[str, Any] | None = None) -> trace.Span:
    """A child span of the current one that is not made current (the caller ends it)."""
    return tracer.start_span(name, attributes=attributes) if _exporting else trace.INVALID_SPAN


def current_span() -> trace.Span:
    return trace.get_current_span()


def traceparent() -> str | None:
    """The current span as a W3C traceparent, to store with work finished later (the usage
    outbox), so the later work can link back to the request."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def link_to(parent: str | None) -> list[trace.Link]:
    """A link to the span a stored traceparent names (none for a missing or bad one)."""
    if not parent:
        return []
    ctx = trace.get_current_span(_propagator.extract({"traceparent": parent})).get_span_context()
    return [trace.Link(ctx)] if ctx.is_valid else []


def continue_trace(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """For a call being served when nothing is exported: a context whose current span is a
    non-recording one in the caller's trace (its `traceparent` header), or in a new trace.
    None when spans are exported: OpenTelemetry's server interceptor made the span."""
    if _exporting:
        return None
    parent = None
    for key, value in metadata or ():
        if key == "traceparent":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            parent = trace.get_current_span(_propagator.extract({"traceparent": text})).get_span_context()
            break
    if parent is not None and parent.is_valid:
        trace_id, flags = parent.trace_id, parent.trace_flags
    else:
        trace_id, flags = random.getrandbits(128) or 1, trace.TraceFlags(trace.TraceFlags.DEFAULT)
    span_context = trace.SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=flags)
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def trace_headers() -> tuple[tuple[str, str], ...]:
    """The W3C trace context to send on a call out when nothing is exported (when spans are,
    OpenTelemetry's client interceptor sends its client span's)."""
    if _exporting:
        return ()
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ()
    return (("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"),)


def setup(service: str, otlp_endpoint: str | None, extra: SpanProcessor | None = None) -> TracerProvider:
    global _provider, _exporting
    if _provider is not None:
        return _provider
    _exporting = bool(otlp_endpoint) or extra is not None
    provider = TracerProvider(resource=Resource.create({"service.name": f"copilot-{service}"}))
    provider.add_span_processor(TenantSpanProcessor())
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if extra is not None:
        provider.add_span_processor(extra)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def server_interceptors() -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """OpenTelemetry's server interceptor when spans are exported (after `setup`); none
    otherwise (see `continue_trace`)."""
    return [aio_server_interceptor()] if _exporting else []


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry's client interceptors when spans are exported (after `setup`); none
    otherwise (see `trace_headers`)."""
    return list(aio_client_interceptors()) if _exporting else []


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()
