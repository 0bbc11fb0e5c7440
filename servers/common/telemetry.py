"""OpenTelemetry: a tracer provider per process and the gRPC instrumentation.

Spans are exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise
spans still exist (trace ids in logs, tenant attributes) but nothing leaves the process.
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from servers.common import identity

_provider: TracerProvider | None = None


class TenantSpanProcessor(SpanProcessor):
    """Puts the acting tenant on every span as it starts (client spans and the service's
    own spans too, not only the server span the interceptor annotates)."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        caller = identity.current_or_none()
        if caller is not None:
            span.set_attribute("tenant.id", caller.tenant_id)


def setup(service: str, otlp_endpoint: str | None, extra: SpanProcessor | None = None) -> TracerProvider:
    global _provider
    if _provider is not None:
        return _provider
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


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [aio_server_interceptor()]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return list(aio_client_interceptors())


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()
