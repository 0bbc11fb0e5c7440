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
    jwt_issuer: str
    jwt_audience: str
    redis_url: str | None
    ratelimit_fail_open: bool
    otel_endpoint: str | None
    log_level: str
    shutdown_grace_s: float
    tenant_cache_ttl_s: float
    access_log: bool

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
        )

    def address(self, service: str) -> str:
        port = {
            "retrieval": self.retrieval_port,
            "generation": self.generation_port,
            "metering": self.metering_port,
            "edge_services": self.edge_services_port,
        }[service]
        return f"{self.host}:{port}"

    def service_dir(self, service: str) -> Path:
        path = self.data_dir / service
        path.mkdir(parents=True, exist_ok=True)
        return path
