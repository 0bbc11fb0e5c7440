"""Whether the tenant a write is for exists in metering's tenant registry.

The edge refuses tokens for tenants that do not exist; this is the defence in depth behind
it: retrieval creates no index, settings or audit trail for a tenant the registry does not
know, whoever calls (a token signed for a made-up tenant, a caller inside the network).
Only writes are checked (reads of a tenant with no index find nothing and create nothing),
so the search path pays nothing. A tenant this process provisioned (ProvisionTenant, which
only metering's onboarding calls, right after it registered the tenant) is known without
asking; any other is confirmed with metering and remembered for the tenant cache TTL.

What is remembered is only trusted while the tenant's index exists (`require`'s
`remembered_ok`): erasing a tenant, on this replica or on any other sharing the store,
deletes its index, so the next write for it asks metering again instead of re-creating the
index of a tenant metering no longer knows. Erasing it here also forgets it at once.
"""

from __future__ import annotations

import time

import grpc

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common.errors import FailedPrecondition, Unavailable

LOOKUP_TIMEOUT_S = 5.0


class TenantRegistry:
    def __init__(self, stub: tenant_pb2_grpc.TenantServiceAsyncStub, ttl_s: float) -> None:
        self._stub = stub
        self._ttl = ttl_s
        self._confirmed: dict[str, float] = {}
        self._provisioned: set[str] = set()

    @classmethod
    def over(cls, channel: grpc.aio.Channel, ttl_s: float) -> TenantRegistry:
        return cls(tenant_pb2_grpc.TenantServiceStub(channel), ttl_s)

    async def require(self, tenant_id: str, *, remembered_ok: bool = True) -> None:
        """Returns when the registry knows the caller's tenant (asked as the caller, whose
        identity the channel forwards); FAILED_PRECONDITION when it does not.
        `remembered_ok` False: ask even if this process confirmed it before (its index is
        gone, so it may have been deleted since)."""
        now = time.monotonic()
        if remembered_ok and (tenant_id in self._provisioned or self._confirmed.get(tenant_id, 0.0) > now):
            return
        try:
            await self._stub.GetTenant(tenant_pb2.GetTenantRequest(), timeout=LOOKUP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise FailedPrecondition(
                    f"tenant {tenant_id} does not exist in the tenant registry: nothing is stored for it "
                    "(a platform operator creates tenants: `copilot tenants create`)",
                    reason="TENANT_NOT_PROVISIONED", metadata={"tenant_id": tenant_id}) from None
            raise Unavailable(f"cannot confirm tenant {tenant_id} with the tenant registry ({exc.code().name}); "
                              "retry", reason="TENANT_REGISTRY_UNAVAILABLE",
                              metadata={"tenant_id": tenant_id}) from None
        if len(self._confirmed) > 100_000:
            self._confirmed.clear()
        self._confirmed[tenant_id] = now + self._ttl

    def provisioned(self, tenant_id: str) -> None:
        self._provisioned.add(tenant_id)

    def forget(self, tenant_id: str) -> None:
        self._provisioned.discard(tenant_id)
        self._confirmed.pop(tenant_id, None)
