"""Observability plumbing without the mesh: the tenant label bound of the quota metrics,
circuit-breaker and provider-failure labels, trace links, and Envoy's tracing config
(accepted by Envoy itself, on only with an OTLP endpoint)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, generate_latest

from servers.common import metrics, telemetry
from servers.common.settings import Settings
from servers.edge import envoy_config
from servers.generation.llm import ProviderFailure
from servers.generation.resilience import Breakers

NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)


def _levels(max_series: int) -> metrics.TenantQuotaLevels:
    return metrics.TenantQuotaLevels(max_series=max_series, clock=lambda: NOW)


def test_quota_levels_keep_the_tenants_nearest_their_quota_and_fold_the_rest() -> None:
    levels = _levels(max_series=3)
    resets = NOW + timedelta(minutes=30)
    for i in range(20):
        levels.observe(f"t-{i:02d}", "requests_per_hour", used=i, limit=20, resets_at=resets)
        levels.observe(f"t-{i:02d}", "tokens_per_month", used=1, limit=1000, resets_at=resets)
    series = levels.series()
    assert set(series) == {"t-19", "t-18", "t-17", metrics.OTHER_TENANT}
    used, limit, ratio = series[metrics.OTHER_TENANT]["requests_per_hour"]
    # The folded tenants: their sums, and the highest ratio among them (an alert still fires).
    assert (used, limit) == (sum(range(17)), 17 * 20) and ratio == pytest.approx(16 / 20)
    registry = CollectorRegistry()
    registry.register(levels)
    text = generate_latest(registry).decode()
    tenants = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("copilot_quota_used_ratio{")}
    assert len(tenants) == 4 and 'copilot_quota_used_ratio{quota="requests_per_hour",tenant="t-19"} 0.95' in text


def test_quota_levels_read_zero_once_the_window_has_reset_and_forget_deleted_tenants() -> None:
    levels = _levels(max_series=10)
    levels.observe("acme", "requests_per_hour", used=9, limit=10, resets_at=NOW - timedelta(seconds=1))
    levels.observe("globex", "requests_per_hour", used=5, limit=10, resets_at=NOW + timedelta(hours=1))
    assert levels.series()["acme"]["requests_per_hour"] == (0, 10, 0.0)
    levels.forget("globex")
    assert set(levels.series()) == {"acme"}


def test_quota_levels_remember_a_bounded_number_of_tenants() -> None:
    levels = metrics.TenantQuotaLevels(max_series=2, max_tracked=5, clock=lambda: NOW)
    for i in range(12):
        levels.observe(f"t-{i}", "requests_per_hour", used=1, limit=10, resets_at=NOW + timedelta(hours=1))
    series = levels.series()
    assert len(series) == 3  # two tenants and the folded rest, whatever the number seen
    assert series[metrics.OTHER_TENANT]["requests_per_hour"][1] == 3 * 10  # 5 remembered: 2 + 3 folded


def test_circuit_breaker_state_has_no_tenant_label() -> None:
    breakers = Breakers(tenant_threshold=1)
    breakers.track("openai")
    breakers.record("openai", "acme", ok=False)  # opens acme's own breaker only
    families = {f.name: f for f in breakers.metric_families()}
    states = {tuple(s.labels.values()): s.value for s in families["copilot_circuit_breaker_state"].samples}
    assert states == {("openai", "provider"): 0, ("openai", "tenant"): 2}
    assert [s.value for s in families["copilot_circuit_breaker_open_tenants"].samples] == [1]
    assert all("acme" not in str(s.labels) for f in families.values() for s in f.samples)


def _failure(cause: BaseException) -> ProviderFailure:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise ProviderFailure("x") from exc
    except ProviderFailure as failure:
        return failure


def test_provider_failures_are_labelled_by_a_short_fixed_list_of_reasons() -> None:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")

    def status(code: int) -> openai.APIStatusError:
        return openai.APIStatusError("x", response=httpx.Response(code, request=request), body=None)

    kinds = {
        "rate_limited": status(429), "server_error": status(503), "rejected": status(400),
        "timeout": openai.APITimeoutError(request=request),
        "connection": openai.APIConnectionError(request=request),
        "malformed": KeyError("choices"), "other": RuntimeError("?"),
    }
    for kind, cause in kinds.items():
        assert _failure(cause).kind == kind
    assert set(kinds) == set(metrics.PROVIDER_ERROR_REASONS)


def test_a_stored_traceparent_becomes_a_link() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("answer") as span:
        parent = telemetry.traceparent()
    assert parent is not None and f"{span.get_span_context().trace_id:032x}" in parent
    links = telemetry.link_to(parent)
    assert links[0].context.trace_id == span.get_span_context().trace_id
    assert telemetry.link_to(None) == [] and telemetry.link_to("garbage") == []
    assert trace.get_current_span().get_span_context().is_valid is False


def _envoy() -> str | None:
    candidate = Path(sys.executable).with_name("envoy")
    return str(candidate) if candidate.exists() else shutil.which("envoy")


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:4317", "otel-collector:4317", "https://otel.example.com"])
def test_envoy_traces_only_with_an_otlp_endpoint_and_envoy_accepts_it(tmp_path: Path, endpoint: str | None) -> None:
    settings = dataclasses.replace(Settings.from_env(), otel_endpoint=endpoint)
    text = envoy_config.render(settings)
    assert "${" not in text
    assert ("envoy.tracers.opentelemetry" in text) == (endpoint is not None)
    assert ('"name": "otel_collector"' in text) == (endpoint is not None)
    if endpoint:
        assert '"spawn_upstream_span": true' in text and '"tag": "tenant.id"' in text
    envoy = _envoy()
    if envoy is None:
        pytest.skip("envoy is not installed")
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--log-level", "error"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_debug_logging_never_lets_payload_logging_libraries_below_info() -> None:
    import logging

    from servers.common import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logs.PAYLOAD_LOGGERS})
    try:
        logs.configure("test", "DEBUG")
        assert root.getEffectiveLevel() == logging.DEBUG
        for name in ("anthropic", "openai", "httpx2", "stripe"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.INFO, name
            assert not logging.getLogger(f"{name}._base_client").isEnabledFor(logging.DEBUG), name
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)


def test_stage_spans_cost_nothing_when_nothing_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_exporting", False)
    with telemetry.span("search.fusion", {"copilot.alpha": 0.4}) as span:
        assert not span.is_recording()
    assert not telemetry.start_span("provider.stream").is_recording()
    monkeypatch.setattr(telemetry, "_exporting", True)
    monkeypatch.setattr(telemetry, "tracer", TracerProvider().get_tracer("t"))
    with telemetry.span("search.fusion") as span:
        assert span.is_recording()
