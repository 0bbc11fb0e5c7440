"""Renders Envoy's config from envoy/envoy.yaml.tmpl and the process settings.

The template keeps the config readable as Envoy YAML; only ports, addresses, JWT
parameters and a few policy knobs are filled in here, so `make run`, the tests (on free
ports) and a production deployment all run the same config.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlsplit

from servers.common.settings import Bounds, Settings
from servers.edge import roles

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml.tmpl"

# gRPC frames a message with 5 bytes: a unary call's body is its message and those 5.
GRPC_FRAME_BYTES = 5

# Envoy keeps a StreamIngestDocuments stream open while it is idle this much longer than the
# service's own idle limit (the service ends it first, with a status that says why), and at
# least as long as one batch may take to ingest.
INGEST_ROUTE_IDLE_MIN_S = 120


def body_limit(message_bytes: int) -> int:
    """The largest request body (one gRPC-framed message) for a message limit."""
    return message_bytes + GRPC_FRAME_BYTES


def _seconds(value: float) -> str:
    return f"{value:g}s"


def bounds_values(bounds: Bounds) -> dict[str, object]:
    """The template's placeholders for the bounds on what one client may cost (docs/bounds.md)."""
    return {
        "QUERY_BODY_BYTES": body_limit(bounds.query_request_bytes),
        "INGEST_BODY_BYTES": body_limit(bounds.ingest_request_bytes),
        "DEFAULT_BODY_BYTES": body_limit(bounds.default_request_bytes),
        "STREAM_IDLE": _seconds(bounds.edge_stream_idle_s),
        "INGEST_ROUTE_IDLE": _seconds(max(INGEST_ROUTE_IDLE_MIN_S, 2 * bounds.ingest_idle_s)),
        "MAX_REQUEST_HEADERS_KB": bounds.edge_max_request_headers_kb,
        "STREAMS_PER_CONNECTION": bounds.edge_streams_per_connection,
        # HTTP/2 windows are at least 64 KiB; a connection carries a few streams' windows.
        "STREAM_WINDOW": bounds.edge_stream_window_bytes,  # at least 65535 (HTTP/2), as the settings check
        "CONNECTION_WINDOW": 4 * bounds.edge_stream_window_bytes,
        "UPSTREAM_REQUESTS": bounds.edge_upstream_requests,
        "MAX_HEAP_BYTES": bounds.edge_max_heap_bytes,
    }

# The rate limit check is on every request's path: when it is slow, the failure mode
# (fail open/closed) decides rather than the client waiting.
RATELIMIT_TIMEOUT_S = 0.2

HEALTH_INTERVAL_S = 2

# Retries (docs/scale-out.md). Always safe: the request never reached a service, so even a
# call that is not idempotent runs at most once.
RETRY_ON_UNSENT = "connect-failure,refused-stream,reset-before-request"
# Also after a service took the request and died (reset) or said UNAVAILABLE (draining, a
# dependency down): only for calls that a second run does not change or bill twice.
RETRY_ON_IDEMPOTENT = "connect-failure,refused-stream,reset,unavailable"
RETRIES = 2
# Idempotent calls to metering besides RecordUsage and the audit trail's reads (routes of their
# own): reads, and reservations, which are keyed by their reservation id (docs/admission.md).
METERING_IDEMPOTENT_RPCS = (
    "MeteringService/GetUsage", "MeteringService/CheckQuota", "MeteringService/ReserveQuota",
    "MeteringService/ReleaseQuota", "TenantService/GetTenant", "TenantService/ListTenants",
)


# Metering's idempotent calls wait out a takeover: when the active metering dies, a standby
# takes its lock and opens its stores (docs/scale-out.md), a second or two in which no replica
# serves; six retries with back-off growing to 1 s span about 3.5 s.
METERING_RETRIES = 6
METERING_BACK_OFF = ("0.1s", "1s")


def retry_policy(retry_on: str, retries: int = RETRIES,
                 back_off: tuple[str, str] = ("0.025s", "0.25s")) -> dict[str, Any]:
    """A route's (or a gRPC service's) retry policy: each retry goes to a replica the call has
    not tried yet while there is one, after a short back-off."""
    return {
        "retry_on": retry_on,
        "num_retries": retries,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": back_off[0], "max_interval": back_off[1]},
    }


METERING_IDEMPOTENT_RETRY = retry_policy(RETRY_ON_IDEMPOTENT, METERING_RETRIES, METERING_BACK_OFF)


# A replica that refuses connections or resets (it died) is ejected after this many failures
# in a row, one that answers UNAVAILABLE (draining) after a few more; it is tried again after
# the ejection time (longer each time it is ejected again). Never more than half of a
# cluster's replicas at once: a cause common to all (a dependency down) must not empty it.
OUTLIER_DETECTION = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 2,
    "enforcing_consecutive_local_origin_failure": 100,
    "consecutive_gateway_failure": 3,
    "enforcing_consecutive_gateway_failure": 100,
    # Other server errors (INTERNAL, UNKNOWN) say more about a request than about a replica.
    "enforcing_consecutive_5xx": 0,
    "enforcing_success_rate": 0,
    "enforcing_local_origin_success_rate": 0,
    "interval": "1s",
    "base_ejection_time": "5s",
    "max_ejection_percent": 50,
}


# Metering's replicas: only a dead one (connections refused or reset) is ejected. An active that
# answers UNAVAILABLE is opening its stores after a takeover (or a dependency is down): ejecting
# the only serving replica would send every call to the standbys (a panic, none healthy).
METERING_OUTLIER_DETECTION = {**OUTLIER_DETECTION, "enforcing_consecutive_gateway_failure": 0}


def metering_idempotent_routes(bounds: Bounds) -> str:
    """The routes of METERING_IDEMPOTENT_RPCS (template lines): like the metering prefix
    routes after them, with the idempotent retry policy."""
    return "\n".join("              - " + json.dumps({
        "match": {"path": f"/copilot.v1.{rpc}"},
        "route": {"cluster": "metering", "retry_policy": METERING_IDEMPOTENT_RETRY, "timeout": "30s",
                  "max_stream_duration": {"grpc_timeout_header_max": "30s"}},
        "metadata": {"filter_metadata": {"copilot.bounds": {
            "request_bytes": str(body_limit(bounds.default_request_bytes))}}},
    }) for rpc in METERING_IDEMPOTENT_RPCS)


def endpoints(settings: Settings, service: str) -> str:
    """The lb_endpoints of a cluster: one per replica of `service` (YAML flow style)."""
    host = _yaml_str(settings.host)
    return "[" + ", ".join(
        f"{{ endpoint: {{ address: {{ socket_address: {{ address: {host}, "
        f"port_value: {settings.port(service, replica)} }} }} }} }}"
        for replica in range(len(settings.addresses(service)))) + "]"

def metering_panic_threshold(settings: Settings) -> float:
    """Envoy's healthy_panic_threshold for metering: with one active replica and N-1 standbys
    (NOT_SERVING by design) the cluster is 1/N healthy, which must not count as panic (Envoy
    would then spread calls over the standbys); with none healthy (a takeover under way) it
    does, and calls go to every replica, retried until the new active serves."""
    return round(100 / (settings.replicas + 1), 1)


# A retrieval call goes to the replica that owns its tenant on a ring of the verified tenant
# header (jwt_authn sets it; a client's own copy is removed first): that replica holds the
# tenant's indexes and caches hot. Ownership moves to the next replica on the ring when one is
# unhealthy or ejected. Correctness never depends on it: every replica reads the same files
# and checks them for changes (docs/scale-out.md).
TENANT_HASH = [{"header": {"header_name": "x-tenant-id"}}]


# How often Envoy refetches the JWKS: the dev one is local and cheap, so a rotated dev key
# is live within seconds; an identity provider's is refetched less often.
DEV_JWKS_CACHE_S = 5
REMOTE_JWKS_CACHE_S = 300
DEV_JWKS_PATH = "/.well-known/jwks.json"


def _yaml_str(value: str) -> str:
    # JSON strings are valid YAML scalars and escape anything a value could contain.
    return json.dumps(value)


def _origins(allowed_origins: Sequence[str] | None) -> str:
    if not allowed_origins:
        # Dev: any origin. Tokens travel in the Authorization header (no cookies), so an
        # open origin policy grants a page nothing its user's token does not.
        return json.dumps([{"safe_regex": {"regex": ".*"}}])
    return json.dumps([{"exact": origin} for origin in allowed_origins])


def jwks_uri(settings: Settings) -> str:
    """Where Envoy fetches the JWKS: the identity provider's, else the edge companion's dev one."""
    return settings.jwks_url or f"http://{settings.address('edge_http')}{DEV_JWKS_PATH}"


def _jwks_cluster(settings: Settings) -> dict[str, Any]:
    uri = jwks_uri(settings)
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"COPILOT_JWKS_URL must be an http(s) URL, got {uri!r}")
    tls = parts.scheme == "https"
    cluster = _url_cluster("jwks", parts.hostname, parts.port or (443 if tls else 80), tls)
    if not settings.jwks_url:
        # The dev JWKS: any edge companion replica serves the same keys.
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": settings.host,
                                                         "port_value": settings.port("edge_http", i)}}}}
            for i in range(settings.replicas)]
    return cluster


# Envoy's span exporter sends a batch when this many spans are waiting (or every 5 s, its
# runtime default): small, so a trace shows up in the collector soon after the request.
OTEL_MAX_CACHE_SPANS = 16
OTEL_SERVICE_NAME = "copilot-envoy"


def _otel_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an OTLP/gRPC endpoint as OTEL_EXPORTER_OTLP_ENDPOINT gives it:
    `http://host:4317`, `https://host`, or a bare `host:port`."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme not in ("http", "https", "grpc") or not parts.hostname:
        raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT must be an http(s) URL or host:port, got {endpoint!r}")
    return parts.hostname, parts.port or 4317, parts.scheme == "https"


def tracing(otel_endpoint: str | None) -> tuple[str, str]:
    """The HTTP connection manager's `tracing` block and the collector's cluster, as template
    lines; YAML comments when no OTLP endpoint is set (Envoy then traces nothing)."""
    if not otel_endpoint:
        return ("# tracing: off (OTEL_EXPORTER_OTLP_ENDPOINT is not set)",
                "# otel_collector: none (OTEL_EXPORTER_OTLP_ENDPOINT is not set)")
    host, port, tls = _otel_endpoint(otel_endpoint)
    cluster = _url_cluster("otel_collector", host, port, tls)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    block = {
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "2s"},
            "service_name": OTEL_SERVICE_NAME,
            "max_cache_size": OTEL_MAX_CACHE_SPANS}},
        # A client span per upstream call under the request's span: the services' server
        # spans hang off it, so Envoy's time and the service's time are told apart.
        "spawn_upstream_span": True,
        # The verified claims jwt_authn put in these headers (a client's own copies were
        # removed first): the tenant on Envoy's spans too.
        "custom_tags": [{"tag": "tenant.id", "request_header": {"name": "x-tenant-id"}},
                        {"tag": "enduser.id", "request_header": {"name": "x-user-id"}}],
    }
    return f"tracing: {json.dumps(block)}", f"- {json.dumps(cluster)}"


def _url_cluster(name: str, host: str, port: int, tls: bool) -> dict[str, Any]:
    is_ip = host.replace(".", "").isdigit() or ":" in host
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}]}},
            },
        }
    return cluster


def rate_limits() -> list[dict[str, Any]]:
    """The ratelimit filter's descriptors: the verified tenant, and whether the call is one
    of its self-inspection reads (roles.INSPECTION_RPCS), which the rate limit service keeps
    out of the hourly quota. Exactly one of the two matches a call that carries a tenant."""
    tenant = {"request_headers": {"header_name": "x-tenant-id", "descriptor_key": "tenant_id",
                                  "skip_if_absent": True}}
    inspection = [{"name": ":path", "string_match": {"safe_regex": {
        "regex": "|".join(re.escape(p) for p in roles.INSPECTION_RPCS)}}}]
    return [{"actions": [tenant, {"header_value_match": {
        "descriptor_key": "kind", "descriptor_value": value, "expect_match": expect, "headers": inspection}}]}
        for value, expect in (("request", False), ("inspect", True))]


def render(settings: Settings, *, allowed_origins: Sequence[str] | None = None,
           template_path: Path = TEMPLATE_PATH) -> str:
    """Envoy's YAML config for `settings`."""
    uri = jwks_uri(settings)
    tracing_block, otel_cluster = tracing(settings.otel_endpoint)
    values = {
        "HOST": _yaml_str(settings.host),
        "EDGE_PORT": settings.edge_port,
        "EDGE_BIND": _yaml_str(settings.edge_bind or settings.host),
        "ADMIN_PORT": settings.envoy_admin_port,
        "RETRIEVAL_ENDPOINTS": endpoints(settings, "retrieval"),
        "TENANT_HASH": json.dumps(TENANT_HASH),
        "GENERATION_ENDPOINTS": endpoints(settings, "generation"),
        "METERING_ENDPOINTS": endpoints(settings, "metering"),
        "METERING_PANIC": metering_panic_threshold(settings),
        "RETRY_METERING": json.dumps(METERING_IDEMPOTENT_RETRY),
        "EDGE_SERVICES_ENDPOINTS": endpoints(settings, "edge_services"),
        "EDGE_HTTP_ENDPOINTS": endpoints(settings, "edge_http"),
        "OUTLIER_DETECTION": f"outlier_detection: {json.dumps(OUTLIER_DETECTION)}",
        "METERING_OUTLIER_DETECTION": f"outlier_detection: {json.dumps(METERING_OUTLIER_DETECTION)}",
        "RETRY_UNSENT": json.dumps(retry_policy(RETRY_ON_UNSENT)),
        "RETRY_IDEMPOTENT": json.dumps(retry_policy(RETRY_ON_IDEMPOTENT)),
        # A rate limit check that never reached a replica goes to another one (within the
        # check's timeout); one that did is not repeated (it counted).
        "RATELIMIT_RETRY": json.dumps(retry_policy(RETRY_ON_UNSENT, retries=1)),
        "METERING_IDEMPOTENT_ROUTES": metering_idempotent_routes(settings.bounds),
        "JWT_ISSUER": _yaml_str(settings.jwt_issuer),
        "JWT_AUDIENCE": _yaml_str(settings.jwt_audience),
        "JWKS_URI": _yaml_str(uri),
        "GROUPS_CLAIM": _yaml_str(settings.groups_claim),
        "JWKS_CACHE": f"{REMOTE_JWKS_CACHE_S if settings.jwks_url else DEV_JWKS_CACHE_S}s",
        "JWKS_CLUSTER": json.dumps(_jwks_cluster(settings)),
        "PUBLIC_PATHS": json.dumps(roles.public_path_rules()),
        "ROLE_POLICIES": json.dumps(roles.rbac_policies()),
        "RATE_LIMITS": json.dumps(rate_limits()),
        "FAILURE_MODE_DENY": "false" if settings.ratelimit_fail_open else "true",
        "RATELIMIT_TIMEOUT": f"{RATELIMIT_TIMEOUT_S}s",
        "HEALTH_INTERVAL": f"{HEALTH_INTERVAL_S}s",
        **bounds_values(settings.bounds),
        "CORS_ORIGINS": _origins(allowed_origins),
        "TRACING": tracing_block,
        # Always: the request id is also an answer's billing key (a retried attempt of one edge
        # request is billed once), and it is Envoy's, never a client's.
        "GENERATE_REQUEST_ID": "true",
        "OTEL_CLUSTER": otel_cluster,
    }
    return Template(template_path.read_text()).substitute(values)


def write(settings: Settings, out_path: Path, *, allowed_origins: Sequence[str] | None = None) -> Path:
    """Renders the config to `out_path` (atomically, so Envoy never reads half a file)."""
    text = render(settings, allowed_origins=allowed_origins)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(out_path)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m servers.edge.envoy_config OUT`: renders the config from the environment
    (compose renders it this way into a volume the Envoy container reads)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m servers.edge.envoy_config", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--allowed-origin", action="append", default=None,
                        help="CORS origin allowed to call the edge (repeatable; default: any)")
    parser.add_argument("--dev-keys", action="store_true",
                        help="without COPILOT_JWKS_URL, make the dev key pair the edge serves the JWKS of")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.dev_keys and not settings.jwks_url:
        from servers.common.issuer import DevIssuer

        DevIssuer.load_or_create(settings.data_dir / "keys", settings.jwt_issuer, settings.jwt_audience)
    write(settings, args.out, allowed_origins=args.allowed_origin)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
