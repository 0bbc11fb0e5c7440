"""TenantService over grpc.aio: onboarding, plans and configuration, the tenant watch.

The caller's tenant always comes from the verified identity (`identity.current()`); a
request names another tenant only where an operator may act for it. Domain errors raised
here become rich gRPC statuses in the server interceptor.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from grpc.aio import ServicerContext

from copilot.v1 import audit_pb2, tenant_pb2, tenant_pb2_grpc
from servers.common import identity, metrics
from servers.common.errors import InvalidArgument, PermissionDenied, Unavailable
from servers.metering import convert
from servers.metering.tenants.domain import (
    Tenant,
    TenantState,
    apply_changes,
    new_tenant,
    validate_changes,
    validate_tenant_id,
)
from servers.metering.tenants.onboarding import Onboarding, TenantChange, TenantWatchers
from servers.metering.tenants.plans import Plan
from servers.metering.tenants.store import TenantStore
from servers.metering.usage.store import UsageStore

if TYPE_CHECKING:
    from servers.metering.audit.service import MeteringAudit

log = logging.getLogger("copilot.metering")

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def target_tenant(requested: str) -> str:
    """The tenant a request acts on: the caller's own unless it names another, which only an
    operator may do."""
    caller = identity.current()
    if not requested or requested == caller.tenant_id:
        return caller.tenant_id
    if not caller.has_any((identity.OPERATOR,)):
        raise PermissionDenied("only an operator may act on another tenant", reason="CROSS_TENANT")
    return validate_tenant_id(requested)


class TenantServiceServicer(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, tenants: TenantStore, clock: Clock = utcnow, onboarding: Onboarding | None = None,
                 watchers: TenantWatchers | None = None, usage: UsageStore | None = None,
                 usage_on_delete: str = "anonymise", audit: MeteringAudit | None = None,
                 audit_on_delete: str = "keep") -> None:
        self._audit = audit
        self._audit_on_delete = audit_on_delete
        self._tenants = tenants
        self._clock = clock
        self._onboarding = onboarding or Onboarding()
        self.watchers = watchers or TenantWatchers()
        self._usage = usage
        self._usage_on_delete = usage_on_delete

    async def CreateTenant(
        self, request: tenant_pb2.CreateTenantRequest,
        context: ServicerContext[tenant_pb2.CreateTenantRequest, tenant_pb2.CreateTenantResponse],
    ) -> tenant_pb2.CreateTenantResponse:
        identity.require_role(identity.OPERATOR)
        # Onboarding without a plan starts on free; upgrading is an explicit update.
        plan = Plan.FREE if request.plan == 0 else convert.plan(request.plan)
        if plan is None:
            raise InvalidArgument.field("plan", f"unknown plan {request.plan}")
        tenant = await self._tenants.create(
            new_tenant(request.tenant_id, request.display_name, plan, self._clock()))
        try:
            await self._onboarding.provision(tenant)
        except BaseException:
            # Not provisioned everywhere: the tenant does not exist, and a retry starts over.
            await self._tenants.delete(tenant.tenant_id)
            raise
        self.watchers.publish(TenantChange(tenants=(tenant,)))
        if self._audit is not None:
            await self._audit.tenant_change(audit_pb2.AUDIT_EVENT_KIND_TENANT_CREATED, None, tenant)
        log.info("tenant created", extra={"tenant_id": tenant.tenant_id, "plan": tenant.plan.value})
        return tenant_pb2.CreateTenantResponse(tenant=convert.tenant_pb(tenant))

    async def GetTenant(
        self, request: tenant_pb2.GetTenantRequest,
        context: ServicerContext[tenant_pb2.GetTenantRequest, tenant_pb2.GetTenantResponse],
    ) -> tenant_pb2.GetTenantResponse:
        tenant = await self._tenants.get(target_tenant(request.tenant_id))
        return tenant_pb2.GetTenantResponse(tenant=convert.tenant_pb(tenant))

    async def UpdateTenant(
        self, request: tenant_pb2.UpdateTenantRequest,
        context: ServicerContext[tenant_pb2.UpdateTenantRequest, tenant_pb2.UpdateTenantResponse],
    ) -> tenant_pb2.UpdateTenantResponse:
        caller = identity.require_role(identity.ADMIN)
        tenant_id = validate_tenant_id(request.tenant.tenant_id, "tenant.tenant_id")
        changes = convert.update_changes(request.tenant, request.update_mask.paths)
        validate_changes(changes)
        if identity.OPERATOR not in caller.roles:
            # A tenant's admin manages its own settings; plan, limits and state are the platform's.
            if tenant_id != caller.tenant_id:
                raise PermissionDenied("an admin may only update its own tenant", reason="OTHER_TENANT")
            reserved = sorted(p for p in changes if not (p.startswith("config.") or p == "display_name"))
            if reserved:
                raise PermissionDenied(f"only a platform operator may change {', '.join(reserved)}",
                                       reason="OPERATOR_ONLY_FIELD")
        now = self._clock()
        before: list[Tenant] = []

        def change(current: Tenant) -> Tenant:
            before.append(current)
            return apply_changes(current, changes, now)

        tenant = await self._tenants.update(tenant_id, change)
        self.watchers.publish(TenantChange(tenants=(tenant,)))
        if self._audit is not None:
            await self._audit.tenant_change(audit_pb2.AUDIT_EVENT_KIND_TENANT_UPDATED, before[-1], tenant, changes)
        log.info("tenant updated", extra={"tenant_id": tenant_id, "paths": sorted(changes),
                                          "config_version": tenant.config_version})
        return tenant_pb2.UpdateTenantResponse(tenant=convert.tenant_pb(tenant))

    async def ListTenants(
        self, request: tenant_pb2.ListTenantsRequest,
        context: ServicerContext[tenant_pb2.ListTenantsRequest, tenant_pb2.ListTenantsResponse],
    ) -> tenant_pb2.ListTenantsResponse:
        identity.require_role(identity.OPERATOR)
        page = await self._tenants.list_page(request.page_size, request.page_token)
        return tenant_pb2.ListTenantsResponse(tenants=[convert.tenant_pb(t) for t in page.tenants],
                                              next_page_token=page.next_page_token)

    async def DeleteTenant(
        self, request: tenant_pb2.DeleteTenantRequest,
        context: ServicerContext[tenant_pb2.DeleteTenantRequest, tenant_pb2.DeleteTenantResponse],
    ) -> tenant_pb2.DeleteTenantResponse:
        identity.require_role(identity.OPERATOR)
        tenant_id = validate_tenant_id(request.tenant_id)
        doomed = await self._tenants.get(tenant_id)  # NOT_FOUND before erasing anything
        # Erased everywhere first: a failure leaves the tenant in place, and the deletion
        # can be retried (every erasure is idempotent).
        await self._onboarding.erase(tenant_id)
        if self._usage is not None and self._usage_on_delete != "keep":
            await self._usage.forget_tenant(tenant_id, anonymise=self._usage_on_delete == "anonymise")
        await self._tenants.delete(tenant_id)
        metrics.QUOTA_LEVELS.forget(tenant_id)
        self.watchers.publish(TenantChange(deleted=(tenant_id,)))
        if self._audit is not None:
            kind = audit_pb2.AUDIT_EVENT_KIND_TENANT_DELETED
            if self._audit_on_delete == "erase":
                # The tenant's trail goes; the deletion itself stays audited, in the trail of
                # the operator's own tenant.
                await self._audit.store.erase_tenant(tenant_id)
                await self._audit.tenant_change(kind, doomed, None, tenant_id=identity.tenant_id())
            else:
                await self._audit.tenant_change(kind, doomed, None)
        log.info("tenant deleted", extra={"tenant_id": tenant_id, "usage": self._usage_on_delete})
        return tenant_pb2.DeleteTenantResponse()

    async def SuspendTenant(
        self, request: tenant_pb2.SuspendTenantRequest,
        context: ServicerContext[tenant_pb2.SuspendTenantRequest, tenant_pb2.SuspendTenantResponse],
    ) -> tenant_pb2.SuspendTenantResponse:
        identity.require_role(identity.OPERATOR)
        tenant_id = validate_tenant_id(request.tenant_id)
        state = TenantState.SUSPENDED if request.suspended else TenantState.ACTIVE
        now = self._clock()
        before: list[Tenant] = []

        def change(current: Tenant) -> Tenant:
            before.append(current)
            return apply_changes(current, {"state": state}, now)

        tenant = await self._tenants.update(tenant_id, change)
        self.watchers.publish(TenantChange(tenants=(tenant,)))
        if self._audit is not None:
            await self._audit.tenant_change(audit_pb2.AUDIT_EVENT_KIND_TENANT_UPDATED, before[-1], tenant, ["state"])
        log.info("tenant suspended" if request.suspended else "tenant resumed",
                 extra={"tenant_id": tenant_id, "config_version": tenant.config_version})
        return tenant_pb2.SuspendTenantResponse(tenant=convert.tenant_pb(tenant))

    async def WatchTenants(
        self, request: tenant_pb2.WatchTenantsRequest,
        context: ServicerContext[tenant_pb2.WatchTenantsRequest, tenant_pb2.WatchTenantsResponse],
    ) -> AsyncIterator[tenant_pb2.WatchTenantsResponse]:
        identity.require_role(identity.SERVICE, identity.OPERATOR)
        # Subscribed before the snapshot is read, so no change falls between the two (a
        # change may arrive twice; its config_version tells which is newer).
        queue = self.watchers.subscribe()
        try:
            token = ""
            while True:
                page = await self._tenants.list_page(1000, token)
                yield tenant_pb2.WatchTenantsResponse(tenants=[convert.tenant_pb(t) for t in page.tenants])
                token = page.next_page_token
                if not token:
                    break
            yield tenant_pb2.WatchTenantsResponse(snapshot_done=True)
            while True:
                change = await queue.get()
                if change is None:
                    raise Unavailable("this watch fell behind or the server is stopping; watch again",
                                      reason="WATCH_RESET")
                yield tenant_pb2.WatchTenantsResponse(tenants=[convert.tenant_pb(t) for t in change.tenants],
                                                      deleted_tenant_ids=list(change.deleted))
        finally:
            self.watchers.unsubscribe(queue)
