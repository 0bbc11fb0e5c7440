"""Settings from environment variables, read once per process.

Every knob a deployment changes is an environment variable, so `make run` and the
production-like stack differ only in their environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORTS = {
    "edge": 8080,  # Envoy's public listener
    "envoy_admin": 9901,
    "retrieval": 50051,
    "generation": 50052,
    "metering": 50053,
    "edge_services": 50054,  # rate limit service, aggregated health and reflection
}

METRICS_OFFSETS = {"retrieval": 1, "generation": 2, "metering": 3, "edge": 4}


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Bounds:
    """What one client may cost the mesh: message sizes, open streams, idle and overall
    durations. Each is enforced by the services (servers/common/bounds.py) and, where Envoy
    can, by the edge too (servers/edge/envoy_config.py); docs/bounds.md lists them all with
    the error a client sees."""

    # A question or a search is a sentence or a page of filters: 64 KiB is generous, and
    # refusing more keeps the hot path's decoding and embedding bounded.
    query_request_bytes: int = 64 * KIB
    # One IngestDocuments batch (and the whole body Envoy buffers for it): room for a
    # sizeable document set in one call, yet far below a process's memory.
    ingest_request_bytes: int = 16 * MIB
    # One batch on StreamIngestDocuments: streaming is for large corpora in small steps.
    ingest_stream_message_bytes: int = 4 * MIB
    # Every other RPC (tenant admin, usage, audit): records and settings, not corpora.
    default_request_bytes: int = 1 * MIB
    # Open streams one tenant may hold on one server process (answers, uploads, exports,
    # watches): several users of a tenant at once, yet a small share of the server cap.
    streams_per_tenant: int = 32
    # Open streams on one server process, all tenants together.
    streams_per_server: int = 512
    # RPCs one server process runs at once (grpc.aio maximum_concurrent_rpcs): beyond it
    # gRPC refuses at once (RESOURCE_EXHAUSTED) rather than queueing without bound.
    max_concurrent_rpcs: int = 2048
    # An upload (StreamIngestDocuments) that sends nothing for this long is ended: a client
    # that opened a stream and went away must not hold a stream slot.
    ingest_idle_s: float = 30.0
    # A server stream whose client takes no message for this long is ended: flow control
    # already bounds the bytes held, this frees the slot and the handler.
    stream_send_timeout_s: float = 30.0
    # A unary call without a client deadline gets this one (the longest Envoy route timeout).
    max_call_s: float = 120.0
    # A stream without a client deadline gets this one (watches reconnect after it).
    max_stream_s: float = 3600.0
    # Envoy: a stream with no bytes either way for this long is reset.
    edge_stream_idle_s: float = 300.0
    # Envoy: streams one client connection may open at once (HTTP/2 SETTINGS).
    edge_streams_per_connection: int = 256
    # Envoy: request headers of one call; a JWT is ~1 KiB, so 32 KiB still lets an oversized
    # garbage token reach jwt_authn and get a clean UNAUTHENTICATED.
    edge_max_request_headers_kb: int = 32
    # Envoy: the HTTP/2 flow-control window per stream towards clients (bytes in flight that
    # Envoy may have to hold for one stream).
    edge_stream_window_bytes: int = 1 * MIB
    # Envoy: requests in flight to one upstream cluster (circuit breaker); beyond it Envoy
    # answers UNAVAILABLE at once.
    edge_upstream_requests: int = 2048
    # Envoy's heap: above 90 % it resets the streams holding the most buffered memory, above
    # 95 % it refuses new requests.
    edge_max_heap_bytes: int = 1024 * MIB

    def __post_init__(self) -> None:
        for name, env in BOUNDS_ENV.items():
            if getattr(self, name) <= 0:
                raise ValueError(f"{env} must be positive, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls) -> Bounds:
        values: dict[str, int | float] = {}
        for name, env in BOUNDS_ENV.items():
            default = getattr(cls, name)
            values[name] = _float(env, default) if isinstance(default, float) else _int(env, default)
        return cls(**values)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """The environment that gives a child process these bounds."""
        return {env: str(getattr(self, name)) for name, env in BOUNDS_ENV.items()}


# Bounds field -> environment variable.
BOUNDS_ENV = {
    "query_request_bytes": "COPILOT_MAX_QUERY_REQUEST_BYTES",
    "ingest_request_bytes": "COPILOT_MAX_INGEST_REQUEST_BYTES",
    "ingest_stream_message_bytes": "COPILOT_MAX_INGEST_STREAM_MESSAGE_BYTES",
    "default_request_bytes": "COPILOT_MAX_REQUEST_BYTES",
    "streams_per_tenant": "COPILOT_MAX_STREAMS_PER_TENANT",
    "streams_per_server": "COPILOT_MAX_STREAMS_PER_SERVER",
    "max_concurrent_rpcs": "COPILOT_MAX_CONCURRENT_RPCS",
    "ingest_idle_s": "COPILOT_INGEST_IDLE_S",
    "stream_send_timeout_s": "COPILOT_STREAM_SEND_TIMEOUT_S",
    "max_call_s": "COPILOT_MAX_CALL_S",
    "max_stream_s": "COPILOT_MAX_STREAM_S",
    "edge_stream_idle_s": "COPILOT_EDGE_STREAM_IDLE_S",
    "edge_streams_per_connection": "COPILOT_EDGE_STREAMS_PER_CONNECTION",
    "edge_max_request_headers_kb": "COPILOT_EDGE_MAX_REQUEST_HEADERS_KB",
    "edge_stream_window_bytes": "COPILOT_EDGE_STREAM_WINDOW_BYTES",
    "edge_upstream_requests": "COPILOT_EDGE_UPSTREAM_REQUESTS",
    "edge_max_heap_bytes": "COPILOT_EDGE_MAX_HEAP_BYTES",
}


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    host: str
    edge_port: int
    envoy_admin_port: int
    retrieval_port: int
    generation_port: int
    metering_port: int
    edge_services_port: int
    # /metrics of service N is on metrics_port_base + N (see METRICS_OFFSETS); 0 disables.
    metrics_port_base: int
    jwt_issuer: str
    jwt_audience: str
    redis_url: str | None
    ratelimit_fail_open: bool
    otel_endpoint: str | None
    log_level: str
    shutdown_grace_s: float
    tenant_cache_ttl_s: float
    access_log: bool
    # Metering: usage in ClickHouse (CLICKHOUSE_URL) or in-process chDB (unset); "sqlite"
    # keeps the walking skeleton's store.
    clickhouse_url: str | None = None
    usage_backend: str = "clickhouse"
    usage_flush_interval_s: float = 0.2
    # JSON price table for usage cost (default: servers/metering/prices.json).
    price_table: str | None = None
    # Deleting a tenant keeps its usage rows ("keep") or rewrites them to an anonymous id.
    usage_on_delete: str = "anonymise"
    # Stripe metered billing (Billing Meter Events); unset: billing is off. The API base is
    # for a local fake in tests.
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    # Edge companion's HTTP side: the browser console's files, the dev JWKS and (dev only) tokens.
    edge_http_port: int = 50055
    # A production identity provider's JWKS; unset: the edge companion serves the dev issuer's.
    jwks_url: str | None = None
    # The dev-only token endpoint (POST /dev/token); never set in production.
    dev_tokens: bool = False
    # Envoy's public listener address; unset: `host`. A container sets 0.0.0.0.
    edge_bind: str | None = None
    # Audit trail: services record questions, document changes and refusals (0: off, for the
    # benchmark's comparison); deleting a tenant keeps its trail ("keep") or erases it ("erase").
    audit_enabled: bool = True
    audit_on_tenant_delete: str = "keep"
    # Sizes, streams and durations one client may use (see Bounds and docs/bounds.md).
    bounds: Bounds = field(default_factory=Bounds)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            data_dir=Path(os.environ.get("COPILOT_DATA_DIR", ".copilot")).resolve(),
            host=os.environ.get("COPILOT_HOST", "127.0.0.1"),
            edge_port=_int("COPILOT_EDGE_PORT", DEFAULT_PORTS["edge"]),
            envoy_admin_port=_int("COPILOT_ENVOY_ADMIN_PORT", DEFAULT_PORTS["envoy_admin"]),
            retrieval_port=_int("COPILOT_RETRIEVAL_PORT", DEFAULT_PORTS["retrieval"]),
            generation_port=_int("COPILOT_GENERATION_PORT", DEFAULT_PORTS["generation"]),
            metering_port=_int("COPILOT_METERING_PORT", DEFAULT_PORTS["metering"]),
            edge_services_port=_int("COPILOT_EDGE_SERVICES_PORT", DEFAULT_PORTS["edge_services"]),
            metrics_port_base=_int("COPILOT_METRICS_PORT_BASE", 9100),
            jwt_issuer=os.environ.get("COPILOT_JWT_ISSUER", "https://copilot.dev.local"),
            jwt_audience=os.environ.get("COPILOT_JWT_AUDIENCE", "compliance-copilot"),
            redis_url=os.environ.get("REDIS_URL") or None,
            ratelimit_fail_open=_bool("COPILOT_RATELIMIT_FAIL_OPEN", True),
            otel_endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            log_level=os.environ.get("COPILOT_LOG_LEVEL", "INFO").upper(),
            shutdown_grace_s=float(os.environ.get("COPILOT_SHUTDOWN_GRACE_S", "5")),
            tenant_cache_ttl_s=float(os.environ.get("COPILOT_TENANT_CACHE_TTL_S", "5")),
            # One JSON line per call (trace id, tenant, RPC, status, latency).
            access_log=_bool("COPILOT_ACCESS_LOG", True),
            clickhouse_url=os.environ.get("CLICKHOUSE_URL") or None,
            usage_backend=os.environ.get("COPILOT_USAGE_BACKEND", "clickhouse").lower(),
            usage_flush_interval_s=float(os.environ.get("COPILOT_USAGE_FLUSH_INTERVAL_S", "0.2")),
            price_table=os.environ.get("COPILOT_PRICE_TABLE") or None,
            usage_on_delete=os.environ.get("COPILOT_USAGE_ON_DELETE", "anonymise").lower(),
            stripe_api_key=os.environ.get("STRIPE_API_KEY") or None,
            stripe_api_base=os.environ.get("STRIPE_API_BASE") or None,
            edge_http_port=_int("COPILOT_EDGE_HTTP_PORT", 50055),
            jwks_url=os.environ.get("COPILOT_JWKS_URL") or None,
            dev_tokens=_bool("COPILOT_DEV_TOKENS", False),
            edge_bind=os.environ.get("COPILOT_EDGE_BIND") or None,
            audit_enabled=_bool("COPILOT_AUDIT", True),
            audit_on_tenant_delete=os.environ.get("COPILOT_AUDIT_ON_TENANT_DELETE", "keep").strip().lower(),
            bounds=Bounds.from_env(),
        )

    def address(self, service: str) -> str:
        port = {
            "retrieval": self.retrieval_port,
            "generation": self.generation_port,
            "metering": self.metering_port,
            "edge_services": self.edge_services_port,
            "edge_http": self.edge_http_port,
        }[service]
        return f"{self.host}:{port}"

    def metrics_port(self, service: str) -> int:
        return self.metrics_port_base + METRICS_OFFSETS[service] if self.metrics_port_base else 0

    def service_dir(self, service: str) -> Path:
        path = self.data_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path
