"""Every service exposes Prometheus metrics; RPCs are counted by method and status; the
provider, circuit-breaker, cache, queue and quota metrics the alerts and dashboards use are
exported by the service that owns them, with a bounded tenant label; Envoy's own stats are
on its admin port."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    tenant_pb2,
    tenant_pb2_grpc,
)
from servers.common import metrics
from tests.fakes.llm_server import FakeLLMServer
from tests.integration.conftest import RunningMesh, create_tenant, running_mesh

pytestmark = pytest.mark.integration


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_metrics_count_rpcs_by_method_and_status(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    await stub.GetTenant(tenant_pb2.GetTenantRequest(), metadata=mesh.auth(tenant), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetTenant(tenant_pb2.GetTenantRequest(tenant_id="someone-else"), metadata=mesh.auth(tenant),
                             timeout=5)
    settings = mesh.settings
    text = await asyncio.to_thread(_scrape, settings.host, settings.metrics_port("metering"))
    ok = [line for line in text.splitlines() if line.startswith("copilot_rpc_requests_total{")
          and 'method="GetTenant"' in line and 'code="OK"' in line]
    denied = [line for line in text.splitlines() if line.startswith("copilot_rpc_requests_total{")
              and 'method="GetTenant"' in line and 'code="PERMISSION_DENIED"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
    assert denied and float(denied[0].rsplit(" ", 1)[1]) >= 1
    assert "copilot_rpc_latency_seconds_bucket" in text
    # No tenant ids in RPC labels (the quota gauges' tenant label is bounded: see below).
    assert tenant not in text
    for service in ("retrieval", "generation", "edge"):
        assert "process_cpu_seconds_total" in await asyncio.to_thread(
            _scrape, settings.host, settings.metrics_port(service))


# --- The named metrics, after real traffic through the edge --------------------------------

MAX_TENANTS = 3


@pytest.fixture(scope="module")
def metrics_mesh(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLMServer) -> Iterator[RunningMesh]:
    """A mesh of its own: the SDK providers on the local fake and a small tenant label bound,
    so a handful of tenants overflow it."""
    with running_mesh(tmp_path_factory, "metricsmesh", {
            **fake_llm.provider_env(), "COPILOT_LLM_MAX_RETRIES": "2", "COPILOT_EMBEDDER": "hash",
            "COPILOT_METRICS_MAX_TENANTS": str(MAX_TENANTS)}) as running:
        yield running


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def _value(text: str, name: str, **labels: str) -> float | None:
    for got, value in _samples(text, name):
        if all(got.get(k) == v for k, v in labels.items()):
            return value
    return None


async def _openai_tenant(mesh: RunningMesh, channel: grpc.aio.Channel) -> str:
    return await create_tenant(mesh, channel, common_pb2.PLAN_ENTERPRISE, "met", provider="openai", documents=[
        retrieval_pb2.Document(document_id="records", title="Records",
                               text="KYC records are kept for five years after the relationship ends.")])


async def test_named_metrics_are_exported_by_the_right_service_with_bounded_tenant_labels(
        metrics_mesh: RunningMesh, fake_llm: FakeLLMServer) -> None:
    mesh = metrics_mesh
    async with grpc.aio.insecure_channel(mesh.edge) as channel:
        tenants = [await _openai_tenant(mesh, channel) for _ in range(MAX_TENANTS + 2)]
        await asyncio.sleep(mesh.settings.tenant_cache_ttl_s * 2 + 0.5)  # the edge learns their plans
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        question = generation_pb2.AnswerRequest(question="How long are KYC records kept?",
                                                mode=common_pb2.RETRIEVAL_MODE_HYBRID)
        for i, tenant in enumerate(tenants):
            # The first tenant asks more: it is nearest its quota and keeps a series of its own.
            for _ in range(3 if i == 0 else 1):
                await stub.Answer(question, metadata=mesh.auth(tenant), timeout=20)
        # Every attempt rate limited (the SDK retries twice): one provider failure, answered extractively.
        fake_llm.reset()
        fake_llm.state.script[:] = ["429"] * 3
        degraded = await stub.Answer(question, metadata=mesh.auth(tenants[1]), timeout=20)
        fake_llm.reset()
    assert degraded.details.degraded and degraded.details.provider == "extractive"

    s = mesh.settings
    generation, retrieval, metering = [await asyncio.to_thread(_scrape, s.host, s.metrics_port(name))
                                       for name in ("generation", "retrieval", "metering")]
    # Generation: provider latency and failures, circuit breakers, the usage outbox.
    assert (_value(generation, "copilot_provider_latency_seconds_count", provider="openai", call="stream") or 0) >= 5
    assert _value(generation, "copilot_provider_errors_total", provider="openai", reason="rate_limited") == 1
    assert _value(generation, "copilot_provider_errors_total", provider="openai", reason="server_error") == 0
    assert _value(generation, "copilot_circuit_breaker_state", provider="openai", scope="provider") == 0
    assert _value(generation, "copilot_circuit_breaker_state", provider="openai", scope="tenant") == 0
    assert _value(generation, "copilot_usage_outbox_depth") is not None
    # Retrieval: both caches; the same question asked again by a tenant is a result-cache hit.
    assert (_value(retrieval, "copilot_cache_requests_total", cache="query_results", result="hit") or 0) >= 2
    assert (_value(retrieval, "copilot_cache_requests_total", cache="query_results", result="miss") or 0) >= 5
    assert (_value(retrieval, "copilot_cache_requests_total", cache="query_embeddings", result="miss") or 0) >= 1
    # Metering: the durable log's backlog and per-tenant quota levels, bounded.
    assert _value(metering, "copilot_usage_log_depth") is not None
    ratios = _samples(metering, "copilot_quota_used_ratio")
    labelled = {labels["tenant"] for labels, _ in ratios}
    assert len(labelled) <= MAX_TENANTS + 1 and metrics.OTHER_TENANT in labelled, labelled
    assert tenants[0] in labelled
    assert {labels["quota"] for labels, _ in ratios} == {"requests_per_hour", "tokens_per_month"}
    assert (_value(metering, "copilot_quota_used", tenant=tenants[0], quota="requests_per_hour") or 0) >= 2
    assert 0 < (_value(metering, "copilot_quota_used_ratio", tenant=tenants[0], quota="requests_per_hour") or 0) < 1
    # Each only where it is owned; no tenant id anywhere else.
    for name in ("copilot_usage_outbox_depth", "copilot_usage_log_depth", "copilot_circuit_breaker_state"):
        assert sum(_value(text, name) is not None for text in (generation, retrieval, metering)) == 1, name
    for text in (generation, retrieval):
        assert not any(t in text for t in tenants)


async def test_envoy_stats_are_on_its_admin_port(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel)
    await tenant_pb2_grpc.TenantServiceStub(channel).GetTenant(tenant_pb2.GetTenantRequest(),
                                                               metadata=mesh.auth(tenant), timeout=5)
    url = f"http://{mesh.settings.host}:{mesh.settings.envoy_admin_port}/stats/prometheus"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    text = await asyncio.to_thread(fetch)
    assert (_value(text, "envoy_cluster_upstream_rq_total", envoy_cluster_name="metering") or 0) >= 1
    assert _value(text, "envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix="edge") is not None
