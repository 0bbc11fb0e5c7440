"""The real mesh (Envoy + the four services) on free loopback ports, once per session."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from copilot.v1 import (
    common_pb2,
    metering_pb2,
    metering_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from copilot_cli.supervisor import Mesh, settings_on_free_ports
from servers.common.issuer import DevIssuer
from servers.common.settings import Settings
from tests.fakes.llm_server import FakeLLMServer

pytestmark = pytest.mark.integration


class RunningMesh:
    def __init__(self, mesh: Mesh, issuer: DevIssuer) -> None:
        self.mesh = mesh
        self.issuer = issuer
        self.settings = mesh.settings

    @property
    def edge(self) -> str:
        return self.mesh.edge_address

    def token(self, tenant: str | None, roles: tuple[str, ...] = ("member",), user: str = "alice",
              **kw: object) -> str:
        return self.issuer.mint(tenant, user, roles, **kw)  # type: ignore[arg-type]

    def auth(self, tenant: str | None, roles: tuple[str, ...] = ("member",), **kw: Any) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token(tenant, roles, **kw)}"),)

    def operator(self) -> tuple[tuple[str, str]]:
        return self.auth("platform", ("operator",), user="ops")


@contextmanager
def running_mesh(tmp_path_factory: pytest.TempPathFactory, name: str, extra_env: dict[str, str] | None = None,
                 **overrides: Any) -> Iterator[RunningMesh]:
    """A whole mesh of its own on free ports, for tests that kill its services or need other
    settings; `overrides` replace fields of Settings, `extra_env` reaches every process."""
    data_dir: Path = tmp_path_factory.mktemp(name)
    # Short cache TTLs so plan and state changes show within a test.
    # Overrides first: the ports allocated depend on them (one block per replica).
    settings = settings_on_free_ports(replace(Settings.from_env(), tenant_cache_ttl_s=1.0, **overrides), data_dir)
    runner = Mesh(settings, extra_env=extra_env or {})
    issuer = runner.start(timeout_s=90)
    try:
        yield RunningMesh(runner, issuer)
    finally:
        codes = runner.stop()
        for service in codes:
            print(f"--- {service} log tail ---\n{runner.tail(service, 5)}")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    with running_mesh(tmp_path_factory, "mesh") as running:
        yield running


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLMServer]:
    """OpenAI and Anthropic on one loopback port (tests script its failures)."""
    server = FakeLLMServer().start()
    yield server
    server.stop()


@pytest.fixture
async def channel(mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.edge) as ch:
        yield ch


def new_tenant_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create_tenant(mesh: RunningMesh, channel: grpc.aio.Channel,
                        plan: common_pb2.Plan = common_pb2.PLAN_PRO,
                        prefix: str = "t", provider: str = "",
                        documents: Sequence[retrieval_pb2.Document] = ()) -> str:
    """A new tenant (created by the operator), optionally on another LLM provider and with
    `documents` ingested by one of its admins."""
    tenant_id = new_tenant_id(prefix)
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    created = await stub.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name=tenant_id,
                                                                     plan=plan),
                                      metadata=mesh.operator(), timeout=10)
    if provider:
        tenant = created.tenant
        tenant.config.provider = provider
        await stub.UpdateTenant(tenant_pb2.UpdateTenantRequest(
            tenant=tenant, update_mask={"paths": ["config.provider"]}), metadata=mesh.operator(), timeout=5)
    if documents:
        await retrieval_pb2_grpc.RetrievalServiceStub(channel).IngestDocuments(
            retrieval_pb2.IngestDocumentsRequest(documents=documents),
            metadata=mesh.auth(tenant_id, ("member", "admin")), timeout=10)
    return tenant_id


# How long billed usage may take to arrive: an answer returns once metering OR its outbox has
# its usage, so the outbox may still be delivering it (or a killed replica's outbox replaying).
SETTLE_S = 60.0


async def settled_usage(mesh: RunningMesh, channel: grpc.aio.Channel, tenant: str,
                        expected_requests: int) -> metering_pb2.GetUsageResponse:
    """The tenant's usage (GetUsage through the edge, this month) once its requests reach
    `expected_requests`, or as it is after a bounded wait; then a moment more, so a late
    duplicate would show."""
    stub = metering_pb2_grpc.MeteringServiceStub(channel)

    async def read() -> metering_pb2.GetUsageResponse:
        return await stub.GetUsage(metering_pb2.GetUsageRequest(), metadata=mesh.auth(tenant), timeout=10)

    deadline = time.monotonic() + SETTLE_S
    usage = await read()
    while usage.requests < expected_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        usage = await read()
    await asyncio.sleep(1)
    return await read()
