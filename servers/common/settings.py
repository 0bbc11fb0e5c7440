"""Settings from environment variables, read once per process.

Every knob a deployment changes is an environment variable, so `make run` and the
production-like stack differ only in their environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    # Requests whose bytes are not a valid message are refused and counted every time, but
    # logged (WARNING) at most once per tenant per this many seconds: garbage in a loop
    # must not flood the logs.
    malformed_log_interval_s: float = 10.0

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
            malformed_log_interval_s=float(os.environ.get("COPILOT_MALFORMED_LOG_INTERVAL_S", "10")),
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
