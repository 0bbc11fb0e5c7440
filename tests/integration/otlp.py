"""An OTLP/gRPC trace receiver on loopback that keeps every exported span in memory.

The mesh runs as separate processes (Envoy and the four Python servers), so tests that look
at traces point their OTLP exporters here, exactly as they would point them at a collector.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, str]
    links: tuple[str, ...]  # trace ids linked to


class SpanReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self.port = 0

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self._spans.append(Span(
                            service=service, name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(), kind=s.kind,
                            attributes={a.key: a.value.string_value or str(
                                a.value.int_value or a.value.bool_value or a.value.double_value)
                                for a in s.attributes},
                            links=tuple(link.trace_id.hex() for link in s.links)))
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def spans(self) -> list[Span]:
        """A snapshot: exports keep arriving while a test reads."""
        with self._lock:
            return list(self._spans)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exporter_env(self) -> dict[str, str]:
        """The services' OTLP exporter settings; batches leave every 100 ms so tests wait little."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "100"}


@contextmanager
def span_receiver() -> Iterator[SpanReceiver]:
    receiver = SpanReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(None)
