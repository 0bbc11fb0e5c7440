"""A client of the mesh through its edge: channel, credentials and typed stubs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from copilot.v1 import audit_pb2_grpc, generation_pb2_grpc, metering_pb2_grpc, retrieval_pb2_grpc, tenant_pb2_grpc
from copilot_cli.config import cli_config
from servers.common.channels import CLIENT_OPTIONS
from servers.common.identity import PLATFORM_TENANT
from servers.common.issuer import DevIssuer
from servers.common.settings import Settings


class CliError(Exception):
    """One clear line for the user; the CLI exits non-zero."""


def edge_address() -> str:
    return cli_config().edge


def dev_issuer(settings: Settings) -> DevIssuer:
    keys_dir = settings.data_dir / "keys"
    try:
        return DevIssuer.load_or_create(keys_dir, settings.jwt_issuer, settings.jwt_audience, create=False)
    except FileNotFoundError:
        raise CliError(f"no dev signing key in {keys_dir}: start the mesh with `copilot up` "
                       "(or set COPILOT_DATA_DIR), or pass --token") from None


@dataclass
class Client:
    channel: grpc.aio.Channel
    metadata: Sequence[tuple[str, str]]

    @classmethod
    def connect(cls, token: str, address: str | None = None) -> Client:
        channel = grpc.aio.insecure_channel(address or edge_address(), options=CLIENT_OPTIONS)
        return cls(channel=channel, metadata=(("authorization", f"Bearer {token}"),))

    @property
    def retrieval(self) -> retrieval_pb2_grpc.RetrievalServiceAsyncStub:
        return retrieval_pb2_grpc.RetrievalServiceStub(self.channel)

    @property
    def generation(self) -> generation_pb2_grpc.GenerationServiceAsyncStub:
        return generation_pb2_grpc.GenerationServiceStub(self.channel)

    @property
    def metering(self) -> metering_pb2_grpc.MeteringServiceAsyncStub:
        return metering_pb2_grpc.MeteringServiceStub(self.channel)

    @property
    def tenants(self) -> tenant_pb2_grpc.TenantServiceAsyncStub:
        return tenant_pb2_grpc.TenantServiceStub(self.channel)

    @property
    def audit(self) -> audit_pb2_grpc.AuditServiceAsyncStub:
        return audit_pb2_grpc.AuditServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)


def token_for(settings: Settings, tenant: str | None, user: str, roles: Sequence[str],
              explicit: str | None = None, ttl_s: int = 3600, groups: Sequence[str] = ()) -> str:
    """`groups` go in the claim the edge reads them from (`Settings.groups_claim`); none: no claim."""
    if explicit:
        return explicit
    extra: dict[str, object] = {settings.groups_claim: sorted(set(groups))} if groups else {}
    return dev_issuer(settings).mint(tenant, user, roles, ttl_s=ttl_s, extra=extra)


def operator_token(settings: Settings, explicit: str | None = None) -> str:
    return token_for(settings, PLATFORM_TENANT, "cli-operator", ["operator"], explicit)


def data_dir_default() -> Path:
    return Settings.from_env().data_dir
