"""The caller's tenant configuration, cached per tenant and refreshed after a short TTL,
so the answer path does not fetch it per request. Concurrent misses share one fetch.

The cascade: system defaults (`TenantConfig.from_proto` fills what a tenant left unset) →
the tenant's config (this cache) → per-request overrides its plan allows
(`allowed_modes`, applied by the pipeline)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from copilot.v1 import common_pb2, tenant_pb2, tenant_pb2_grpc
from servers.common import identity
from servers.common.errors import PermissionDenied


@dataclass(frozen=True)
class TenantConfig:
    tenant_id: str
    version: int
    suspended: bool
    provider: str
    model: str
    temperature: float
    max_tokens: int
    system_prompt: str
    retrieval_mode: int
    top_k: int
    pii_masking: bool = True
    agentic_tools: bool = False
    plan: int = common_pb2.PLAN_FREE

    @classmethod
    def from_proto(cls, tenant: tenant_pb2.Tenant) -> TenantConfig:
        cfg = tenant.config
        return cls(
            tenant_id=tenant.tenant_id,
            version=tenant.config_version,
            suspended=tenant.state == tenant_pb2.TENANT_STATE_SUSPENDED,
            provider=cfg.provider or "extractive",
            model=cfg.model,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens or 512,
            system_prompt=cfg.system_prompt,
            retrieval_mode=cfg.retrieval_mode or common_pb2.RETRIEVAL_MODE_BASIC,
            top_k=cfg.top_k or 5,
            pii_masking=cfg.pii_masking,
            agentic_tools=cfg.agentic_tools,
            plan=tenant.plan or common_pb2.PLAN_FREE,
        )


class TenantConfigCache:
    def __init__(self, stub: tenant_pb2_grpc.TenantServiceAsyncStub, ttl_s: float) -> None:
        self._stub = stub
        self._ttl = ttl_s
        self._entries: dict[str, tuple[float, TenantConfig]] = {}
        self._inflight: dict[str, asyncio.Future[TenantConfig]] = {}
        self.fetches = 0

    async def get(self) -> TenantConfig:
        """The calling tenant's config; PERMISSION_DENIED when the tenant is suspended."""
        tenant = identity.tenant_id()
        entry = self._entries.get(tenant)
        if entry is not None and entry[0] > time.monotonic():
            config = entry[1]
        else:
            config = await self._fetch(tenant)
        if config.suspended:
            raise PermissionDenied(f"tenant {tenant} is suspended", reason="TENANT_SUSPENDED")
        return config

    async def _fetch(self, tenant: str) -> TenantConfig:
        # One fetch per tenant at a time, run as its own task so a caller that is cancelled
        # does not cancel the others waiting on it.
        task = self._inflight.get(tenant)
        if task is None:
            task = asyncio.ensure_future(self._load(tenant))
            self._inflight[tenant] = task
            task.add_done_callback(lambda _t: self._inflight.pop(tenant, None))
        return await asyncio.shield(task)

    async def _load(self, tenant: str) -> TenantConfig:
        self.fetches += 1
        response = await self._stub.GetTenant(tenant_pb2.GetTenantRequest(), timeout=5)
        config = TenantConfig.from_proto(response.tenant)
        self._entries[tenant] = (time.monotonic() + self._ttl, config)
        return config


# Retrieval modes each plan may ask for per request (and run at all).
PLAN_MODES: dict[int, frozenset[int]] = {
    common_pb2.PLAN_FREE: frozenset({common_pb2.RETRIEVAL_MODE_BASIC, common_pb2.RETRIEVAL_MODE_HYBRID}),
    common_pb2.PLAN_PRO: frozenset({common_pb2.RETRIEVAL_MODE_BASIC, common_pb2.RETRIEVAL_MODE_HYBRID,
                                    common_pb2.RETRIEVAL_MODE_DECOMPOSED}),
    common_pb2.PLAN_ENTERPRISE: frozenset({common_pb2.RETRIEVAL_MODE_BASIC, common_pb2.RETRIEVAL_MODE_HYBRID,
                                           common_pb2.RETRIEVAL_MODE_DECOMPOSED,
                                           common_pb2.RETRIEVAL_MODE_AGENTIC}),
}


def allowed_modes(config: TenantConfig) -> frozenset[int]:
    """The plan's modes, plus whatever mode the tenant itself was configured with."""
    return PLAN_MODES.get(config.plan, PLAN_MODES[common_pb2.PLAN_FREE]) | {config.retrieval_mode}
