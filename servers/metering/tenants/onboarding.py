"""What happens around a tenant's creation and deletion, beyond the tenant store.

Creation provisions the tenant everywhere (the retrieval namespace, the billing customer);
deletion erases its data everywhere (retrieval index and caches, billing customer) and
keeps or anonymises its usage rows as configured. Every change is also pushed to the
services watching tenants (`TenantService.WatchTenants`).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from copilot.v1 import retrieval_pb2, retrieval_pb2_grpc
from servers.common import identity
from servers.common.errors import Unavailable
from servers.metering.tenants.domain import Tenant

log = logging.getLogger("copilot.metering.onboarding")

# The service acting on a tenant in other services.
SERVICE_NAME = "metering"


class TenantHook(ABC):
    name = "hook"

    @abstractmethod
    async def provision(self, tenant: Tenant) -> None:
        """Makes the tenant ready; raises if it cannot (the creation is then undone)."""

    @abstractmethod
    async def erase(self, tenant_id: str) -> None:
        """Erases the tenant's data; idempotent."""


class RetrievalHook(TenantHook):
    """RetrievalService.ProvisionTenant / EraseTenant, called as the tenant's service account."""

    name = "retrieval"

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 5.0) -> None:
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        self._timeout = timeout_s

    async def provision(self, tenant: Tenant) -> None:
        with identity.acting_as_service(tenant.tenant_id, SERVICE_NAME):
            await self._stub.ProvisionTenant(retrieval_pb2.ProvisionTenantRequest(), timeout=self._timeout)

    async def erase(self, tenant_id: str) -> None:
        with identity.acting_as_service(tenant_id, SERVICE_NAME):
            await self._stub.EraseTenant(retrieval_pb2.EraseTenantRequest(), timeout=self._timeout)


@dataclass
class Onboarding:
    hooks: Sequence[TenantHook] = ()

    async def provision(self, tenant: Tenant) -> None:
        """Runs every hook concurrently; on a failure, erases what was provisioned and
        raises UNAVAILABLE."""
        results = await asyncio.gather(*(h.provision(tenant) for h in self.hooks), return_exceptions=True)
        failed = [(h.name, r) for h, r in zip(self.hooks, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            log.warning("provisioning failed", extra={"tenant_id": tenant.tenant_id,
                                                      "failed": {n: repr(e)[:300] for n, e in failed}})
            await self.erase(tenant.tenant_id, quiet=True)
            names = ", ".join(n for n, _ in failed)
            raise Unavailable(f"tenant {tenant.tenant_id} could not be provisioned ({names}); retry",
                              reason="PROVISIONING_FAILED", metadata={"tenant_id": tenant.tenant_id})

    async def erase(self, tenant_id: str, quiet: bool = False) -> None:
        results = await asyncio.gather(*(h.erase(tenant_id) for h in self.hooks), return_exceptions=True)
        failed = [(h.name, r) for h, r in zip(self.hooks, results, strict=True) if isinstance(r, BaseException)]
        if failed and not quiet:
            log.warning("erasure failed", extra={"tenant_id": tenant_id,
                                                 "failed": {n: repr(e)[:300] for n, e in failed}})
            raise Unavailable(f"tenant {tenant_id} was not erased everywhere ({', '.join(n for n, _ in failed)}); "
                              "retry the deletion", reason="ERASURE_FAILED", metadata={"tenant_id": tenant_id})


@dataclass(frozen=True)
class TenantChange:
    tenants: tuple[Tenant, ...] = ()
    deleted: tuple[str, ...] = ()


@dataclass
class TenantWatchers:
    """Fans tenant changes out to the open WatchTenants streams of this process."""

    max_queue: int = 10_000
    _queues: set[asyncio.Queue[TenantChange | None]] = field(default_factory=set)

    def subscribe(self) -> asyncio.Queue[TenantChange | None]:
        queue: asyncio.Queue[TenantChange | None] = asyncio.Queue(self.max_queue)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[TenantChange | None]) -> None:
        self._queues.discard(queue)

    def publish(self, change: TenantChange) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                # A watcher this far behind must start over from a snapshot.
                self._queues.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
                log.warning("dropped a slow tenant watcher")

    def close(self) -> None:
        for queue in list(self._queues):
            if not queue.full():
                queue.put_nowait(None)
        self._queues.clear()

    @property
    def watchers(self) -> int:
        return len(self._queues)
