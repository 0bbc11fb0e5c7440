"""The Envoy config renders for any ports and settings, and Envoy itself accepts it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

from servers.common.settings import Bounds, Settings
from servers.edge import envoy_config, roles


def envoy_binary() -> str | None:
    candidate = Path(sys.executable).with_name("envoy")
    return str(candidate) if candidate.exists() else shutil.which("envoy")


def settings(**overrides: object) -> Settings:
    ports = dict(edge_port=18080, envoy_admin_port=19901, retrieval_port=15051, generation_port=15052,
                 metering_port=15053, edge_services_port=15054)
    return dataclasses.replace(Settings.from_env(), host="127.0.0.1", **{**ports, **overrides})  # type: ignore[arg-type]


def test_render_fills_every_placeholder(tmp_path: Path) -> None:
    s = settings(edge_port=28080, envoy_admin_port=29901, retrieval_port=25051, generation_port=25052,
                 metering_port=25053, edge_services_port=25054)
    text = envoy_config.render(s)
    assert "${" not in text
    for port in (28080, 29901, 25051, 25052, 25053, 25054):
        assert f"port_value: {port}" in text
    assert json.dumps(s.jwt_issuer) in text and json.dumps(s.jwt_audience) in text
    # Dev: the edge companion serves the JWKS over HTTP, refetched every few seconds.
    assert f'"http://127.0.0.1:{s.edge_http_port}/.well-known/jwks.json"' in text
    assert "rate_limited_as_resource_exhausted: true" in text


def test_filter_order_strips_identity_headers_before_anything_reads_them(tmp_path: Path) -> None:
    text = envoy_config.render(settings())
    filters = [line.split("name:")[1].strip() for line in text.splitlines()
               if line.strip().startswith("- name: envoy.filters.http.")]
    assert filters == [
        "envoy.filters.http.header_mutation", "envoy.filters.http.cors", "envoy.filters.http.grpc_web",
        "envoy.filters.http.jwt_authn", "envoy.filters.http.rbac", "envoy.filters.http.rbac",
        "envoy.filters.http.buffer", "envoy.filters.http.ratelimit",
        "envoy.filters.http.router",
    ]
    for header in ("x-tenant-id", "x-user-id", "x-roles"):
        assert f"- remove: {header}" in text


def test_failure_mode_follows_the_setting(tmp_path: Path) -> None:
    assert "failure_mode_deny: false" in envoy_config.render(settings(ratelimit_fail_open=True))
    assert "failure_mode_deny: true" in envoy_config.render(settings(ratelimit_fail_open=False))


def test_cors_origins_any_in_dev_or_a_given_list(tmp_path: Path) -> None:
    assert '[{"safe_regex": {"regex": ".*"}}]' in envoy_config.render(settings())
    text = envoy_config.render(settings(), allowed_origins=["https://console.example"])
    assert '[{"exact": "https://console.example"}]' in text


def test_write_is_atomic_and_returns_the_path(tmp_path: Path) -> None:
    out = envoy_config.write(settings(), tmp_path / "run" / "envoy.yaml")
    assert out.read_text() == envoy_config.render(settings())
    assert [p.name for p in out.parent.iterdir()] == ["envoy.yaml"]


def test_production_jwks_url_gets_its_own_tls_cluster() -> None:
    text = envoy_config.render(settings(jwks_url="https://idp.example.com/tenant/.well-known/jwks.json"))
    assert '"https://idp.example.com/tenant/.well-known/jwks.json"' in text
    assert '"sni": "idp.example.com"' in text and '"port_value": 443' in text
    assert "cache_duration: 300s" in text
    with pytest.raises(ValueError):
        envoy_config.render(settings(jwks_url="file:///etc/jwks.json"))


def test_role_matrix() -> None:
    assert roles.allowed_roles("/copilot.v1.GenerationService/StreamAnswer") == frozenset(
        {"member", "admin", "operator"})
    assert roles.allowed_roles("/copilot.v1.RetrievalService/IngestDocuments") == frozenset(
        {"admin", "ingest", "operator"})
    assert roles.allowed_roles("/copilot.v1.TenantService/CreateTenant") == frozenset({"operator"})
    assert roles.allowed_roles("/copilot.v1.TenantService/UpdateTenant") == frozenset({"admin", "operator"})
    # Service-to-service RPCs: platform service accounts only, no end-user role.
    for rpc in ("/copilot.v1.MeteringService/RecordUsage", "/copilot.v1.RetrievalService/EraseTenant",
                "/copilot.v1.RetrievalService/ProvisionTenant"):
        assert roles.allowed_roles(rpc) == frozenset({"service"})
    assert roles.allowed_roles("/copilot.v1.NoSuchService/Do") == frozenset()
    assert roles.allowed_roles("/") is None and roles.allowed_roles("/grpc.health.v1.Health/Check") is None


def _route(text: str, match: str) -> str:
    """The rendered route whose match line contains `match`, up to the next route."""
    start = text.index(match)
    end = text.find("- match:", start + len(match))
    return text[start:end]


def test_bounds_flow_into_the_edge_config() -> None:
    bounds = Bounds(query_request_bytes=1000, ingest_request_bytes=5000, default_request_bytes=2000,
                    edge_stream_idle_s=42, edge_streams_per_connection=17, edge_max_request_headers_kb=24,
                    edge_stream_window_bytes=262144, edge_upstream_requests=99, edge_max_heap_bytes=123456789,
                    ingest_idle_s=90)
    text = envoy_config.render(settings(bounds=bounds))
    # Each RPC's body limit is its message limit plus gRPC's 5-byte frame header.
    for route, limit in (("/copilot.v1.GenerationService/", 1005), ("path: /copilot.v1.RetrievalService/Search", 1005),
                         ("path: /copilot.v1.RetrievalService/IngestDocuments", 5005),
                         ("path: /copilot.v1.AuditService/RecordAuditEvents", 5005)):
        assert f"max_request_bytes: {limit} }}" in _route(text, route), route
        assert f'request_bytes: "{limit}"' in _route(text, route), route
    # Every other route: the filter's own (default) limit; uploads are not buffered at all.
    assert "max_request_bytes: 2005\n" in text
    upload = _route(text, "/copilot.v1.RetrievalService/StreamIngestDocuments")
    assert "disabled: true" in upload and "idle_timeout: 180s" in upload
    assert "stream_idle_timeout: 42s" in text and "max_request_headers_kb: 24" in text
    assert "max_concurrent_streams: 17" in text
    assert "initial_stream_window_size: 262144" in text and "initial_connection_window_size: 1048576" in text
    assert text.count("max_requests: 99, max_pending_requests: 99") == 3
    assert "max_heap_size_bytes: 123456789" in text


def test_replicated_clusters_balance_over_every_replica() -> None:
    s = settings(replicas=3, replica_port_stride=10, edge_http_port=15055)
    clusters = _clusters(envoy_config.render(s))
    for cluster, base in (("retrieval", 15051), ("generation", 15052), ("metering", 15053),
                          ("edge_services", 15054), ("edge_http", 15055), ("jwks", 15055)):
        text = clusters[cluster]
        for port in (base, base + 10, base + 20):
            assert f"port_value: {port} " in text or f'"port_value": {port}' in text, (cluster, port)
        assert str(base + 30) not in text, cluster
    # Replicas that fail are ejected (the jwks fetch retries instead).
    for cluster in ("retrieval", "generation", "metering", "edge_services", "edge_http"):
        assert "outlier_detection:" in clusters[cluster], cluster
    # A tenant's retrieval calls go to its owner on the ring of the verified tenant header.
    assert "lb_policy: RING_HASH" in clusters["retrieval"]
    text = envoy_config.render(s)
    for route in ("/copilot.v1.RetrievalService/StreamIngestDocuments", "path: /copilot.v1.RetrievalService/Search",
                  "path: /copilot.v1.RetrievalService/IngestDocuments", "prefix: /copilot.v1.RetrievalService/ }"):
        assert json.loads(_route(text, route).split("hash_policy: ", 1)[1].splitlines()[0]) == \
            [{"header": {"header_name": "x-tenant-id"}}], route
    # Metering ejects a dead replica, never the active for answering UNAVAILABLE (opening its stores).
    assert '"enforcing_consecutive_gateway_failure": 0' in clusters["metering"]
    assert '"enforcing_consecutive_gateway_failure": 100' in clusters["generation"]
    # One active metering and two standbys are a third healthy: not a panic; none healthy is.
    assert "healthy_panic_threshold: { value: 25.0 }" in clusters["metering"]


def _retry_on(route: str) -> str:
    return json.loads(route.split("retry_policy: ", 1)[1].splitlines()[0])["retry_on"]


def test_only_idempotent_rpcs_are_retried_after_they_reached_a_service() -> None:
    text = envoy_config.render(settings())
    # The default (the virtual host's): only what never reached a service.
    assert _retry_on(text.split("virtual_hosts:", 1)[1]) == envoy_config.RETRY_ON_UNSENT
    assert "reset," not in envoy_config.RETRY_ON_UNSENT and "unavailable" not in envoy_config.RETRY_ON_UNSENT
    for route in ("/copilot.v1.GenerationService/", "path: /copilot.v1.RetrievalService/Search",
                  "path: /copilot.v1.MeteringService/RecordUsage", "prefix: /copilot.v1.AuditService/"):
        assert _retry_on(_route(text, route)) == envoy_config.RETRY_ON_IDEMPOTENT, route
    # Metering's wait out a standby's takeover.
    assert json.loads(_route(text, "path: /copilot.v1.MeteringService/RecordUsage").split(
        "retry_policy: ", 1)[1].splitlines()[0])["num_retries"] == envoy_config.METERING_RETRIES
    for rpc in envoy_config.METERING_IDEMPOTENT_RPCS:
        line = next(line for line in text.splitlines() if f'"path": "/copilot.v1.{rpc}"' in line)
        assert json.loads(line.strip()[2:])["route"]["retry_policy"]["retry_on"] == envoy_config.RETRY_ON_IDEMPOTENT
    # Writes that are not idempotent keep the default: no route of their own, or one without a policy.
    for write in ("TenantService/CreateTenant", "TenantService/DeleteTenant", "MeteringService/ReportBilling"):
        assert not [line for line in text.splitlines() if ("- match:" in line and write in line)
                    or f'"match": {{"path": "/copilot.v1.{write}"' in line], write
    assert "retry_policy" not in _route(text, "path: /copilot.v1.RetrievalService/IngestDocuments")


def _clusters(text: str) -> dict[str, str]:
    body = text.split("\n  clusters:\n", 1)[1]
    out: dict[str, str] = {}
    for chunk in body.split("\n  - ")[1:]:
        if chunk.startswith("name: "):
            out[chunk.split()[1]] = chunk
        elif chunk.startswith("{"):
            cluster = json.loads(chunk.splitlines()[0])
            out[cluster["name"]] = json.dumps(cluster)
    return out


@pytest.mark.skipif(envoy_binary() is None, reason="envoy is not installed")
@pytest.mark.parametrize("variant", ["fail_open", "fail_closed", "production", "small_bounds", "replicas"])
async def test_envoy_validates_the_rendered_config(tmp_path: Path, variant: str) -> None:
    s = settings(ratelimit_fail_open=variant == "fail_open",
                 jwks_url="https://idp.example.com/jwks.json" if variant == "production" else None,
                 replicas=3 if variant == "replicas" else 1)
    if variant == "small_bounds":
        s = dataclasses.replace(s, bounds=Bounds(query_request_bytes=512, edge_stream_window_bytes=65535,
                                                 edge_stream_idle_s=0.5, ingest_idle_s=0.25))
    out = envoy_config.write(s, tmp_path / "envoy.yaml")
    binary = envoy_binary()
    assert binary is not None
    proc = await asyncio.create_subprocess_exec(
        binary, "--mode", "validate", "-c", str(out), "--disable-hot-restart",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "OK" in text
    # Deprecated fields (e.g. route-level cors) would warn here.
    assert "deprecated" not in text.lower(), text
