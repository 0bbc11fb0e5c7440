"""The real mesh (Envoy + the four services) on free loopback ports, once per session."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from copilot.v1 import common_pb2, tenant_pb2, tenant_pb2_grpc
from copilot_cli.supervisor import Mesh, settings_on_free_ports
from servers.common.settings import Settings
from servers.edge.issuer import DevIssuer

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

    def auth(self, tenant: str | None, roles: tuple[str, ...] = ("member",), **kw: object) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token(tenant, roles, **kw)}"),)

    def operator(self) -> tuple[tuple[str, str]]:
        return self.auth("platform", ("operator",), user="ops")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    data_dir: Path = tmp_path_factory.mktemp("mesh")
    settings = settings_on_free_ports(Settings.from_env(), data_dir)
    # Short cache TTLs so plan and state changes show within a test.
    from dataclasses import replace

    settings = replace(settings, tenant_cache_ttl_s=1.0)
    runner = Mesh(settings)
    issuer = runner.start(timeout_s=90)
    try:
        yield RunningMesh(runner, issuer)
    finally:
        codes = runner.stop()
        for name in codes:
            print(f"--- {name} log tail ---\n{runner.tail(name, 5)}")


@pytest.fixture
async def channel(mesh: RunningMesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.edge) as ch:
        yield ch


def new_tenant_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create_tenant(mesh: RunningMesh, channel: grpc.aio.Channel, plan: int = common_pb2.PLAN_PRO,
                        prefix: str = "t") -> str:
    tenant_id = new_tenant_id(prefix)
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    await stub.CreateTenant(tenant_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name=tenant_id, plan=plan),
                            metadata=mesh.operator(), timeout=10)
    return tenant_id
