"""The caller's tenant configuration, cached per tenant, so the answer path does not fetch
it per request. Concurrent misses share one fetch.

Changes are pushed by the tenant service as they happen (`WatchTenants`, the stream the edge
follows too): while that watch is live, the cache holds every tenant's current config and
nothing expires, so a mesh serving a thousand tenants does not refetch each of them every
TTL (measured before: most answers at 1,000 tenants paid a GetTenant). While the watch is
down (metering restarting, the watch reset), entries expire after the TTL as before.

The cascade: system defaults (`config_from_proto` fills what a tenant left unset) →
the tenant's config (this cache) → per-request overrides its plan allows
(`models.allowed_modes`, applied by the pipeline)."""

from __future__ import annotations

import logging
import time

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common import identity
from servers.common.errors import PermissionDenied
from servers.common.retry import Backoff
from servers.common.singleflight import SingleFlight
from servers.common.tenant_watch import TenantFollower, watch_as
from servers.generation.convert import mode_from_proto, plan_from_proto, policy_from_proto
from servers.generation.models import Plan, RetrievalMode, TenantConfig

log = logging.getLogger("copilot.generation.tenants")

WATCH_RECONNECT = Backoff(base_s=0.5, cap_s=10.0)


def config_from_proto(tenant: tenant_pb2.Tenant) -> TenantConfig:
    """The tenant's config with the system defaults filled in where it left a field unset."""
    cfg = tenant.config
    return TenantConfig(
        tenant_id=tenant.tenant_id,
        version=tenant.config_version,
        suspended=tenant.state == tenant_pb2.TENANT_STATE_SUSPENDED,
        provider=cfg.provider or "extractive",
        model=cfg.model,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens or 512,
        system_prompt=cfg.system_prompt,
        retrieval_mode=mode_from_proto(cfg.retrieval_mode) or RetrievalMode.BASIC,
        top_k=cfg.top_k or 5,
        pii_masking=cfg.pii_masking,
        agentic_tools=cfg.agentic_tools,
        plan=plan_from_proto(tenant.plan) or Plan.FREE,
        unsupported_sentences=policy_from_proto(cfg.unsupported_sentences),
    )


class TenantConfigCache:
    def __init__(self, stub: tenant_pb2_grpc.TenantServiceAsyncStub, ttl_s: float) -> None:
        self._stub = stub
        self._ttl = ttl_s
        self._entries: dict[str, tuple[float, TenantConfig]] = {}
        self._inflight: SingleFlight[str, TenantConfig] = SingleFlight()
        self.fetches = 0
        # True while the watch is connected and its snapshot has arrived: entries are current.
        self.live = False
        self._watch = TenantFollower(watch_as(stub, "generation"), self.apply, reconnect=WATCH_RECONNECT,
                                     on_snapshot=self._snapshot_done, on_down=self._watch_down,
                                     name="tenant-config-watch")

    async def start(self) -> None:
        """Follows WatchTenants in the background (reconnecting) until `stop`."""
        await self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()
        self.live = False

    async def get(self) -> TenantConfig:
        """The calling tenant's config; PERMISSION_DENIED when the tenant is suspended."""
        tenant = identity.tenant_id()
        entry = self._entries.get(tenant)
        if entry is not None and (self.live or entry[0] > time.monotonic()):
            config = entry[1]
        else:
            config = await self._fetch(tenant)
        if config.suspended:
            raise PermissionDenied(f"tenant {tenant} is suspended", reason="TENANT_SUSPENDED")
        return config

    async def _fetch(self, tenant: str) -> TenantConfig:
        # One fetch per tenant at a time; a caller that is cancelled does not cancel it.
        return await self._inflight.run(tenant, lambda: self._load(tenant))

    async def _load(self, tenant: str) -> TenantConfig:
        self.fetches += 1
        response = await self._stub.GetTenant(tenant_pb2.GetTenantRequest(), timeout=5)
        return self._store(response.tenant)

    def _store(self, tenant: tenant_pb2.Tenant, *, authoritative: bool = False) -> TenantConfig:
        """Keeps the newer of the cached and the given config (a fetch that started before a
        push may answer after it); a watch's snapshot replaces whatever is cached."""
        config = config_from_proto(tenant)
        current = self._entries.get(config.tenant_id)
        if not authoritative and current is not None and current[1].version > config.version:
            return current[1]
        self._entries[config.tenant_id] = (time.monotonic() + self._ttl, config)
        return config

    def apply(self, change: tenant_pb2.WatchTenantsResponse, snapshot: set[str] | None = None) -> None:
        """One message of the watch. While its snapshot is arriving (`snapshot` collects the
        ids), tenants replace what is cached: a tenant deleted and created again under the
        same id while the watch was down starts again at version 1."""
        for tenant in change.tenants:
            self._store(tenant, authoritative=snapshot is not None)
            if snapshot is not None:
                snapshot.add(tenant.tenant_id)
        for gone in change.deleted_tenant_ids:
            self._entries.pop(gone, None)
        if snapshot is not None and change.snapshot_done:
            # Tenants deleted while the watch was down.
            for gone in set(self._entries) - snapshot:
                self._entries.pop(gone, None)

    def _snapshot_done(self) -> bool:
        self.live = True
        return True

    def _watch_down(self) -> None:
        if self.live:
            # Every entry was current when the watch broke: each gets a full TTL from now,
            # as if just fetched (answers go on through a short metering restart).
            until = time.monotonic() + self._ttl
            self._entries = {tenant: (max(expiry, until), config)
                             for tenant, (expiry, config) in self._entries.items()}
            log.info("tenant watch down; configs expire after the TTL until it is back")
        self.live = False
