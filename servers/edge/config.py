"""Per-tenant request limits, read from TenantService and kept in memory.

The rate limit service looks limits up on every request, so the lookup is a dict read:
the table is loaded in the background (every `tenant_cache_ttl_s`) with the edge's
platform service account and swapped in whole; the request path never waits for it.
A tenant the table does not know (created a moment ago, or never) is confirmed with the
tenant service on its first call: one that exists is added with its own limits, one that
does not is refused (PERMISSION_DENIED) and remembered as missing for a refresh period,
unless the watch reports it created first. A suspended or deleted tenant gets no requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common import identity, lifecycle
from servers.common.retry import Backoff
from servers.common.settings import Settings
from servers.common.singleflight import SingleFlight
from servers.common.tenant_watch import TenantFollower, WatchStream, watch_as
from servers.edge.limiter import HOUR, MINUTE, SECOND, Limits, Window

log = logging.getLogger("copilot.edge.config")

# The free plan's request limits (requests per second, minute, hour). Kept here rather
# than imported from the metering server's plans: the edge must stay up, and keep
# limiting, when metering is down or being redeployed.
FREE_PLAN_RPS, FREE_PLAN_RPM, FREE_PLAN_RPH = 5, 100, 1000


def limits_of(per_second: int, per_minute: int, per_hour: int) -> Limits:
    """Windows for the given rates; a rate of 0 leaves that unit unlimited."""
    pairs = ((SECOND, per_second), (MINUTE, per_minute), (HOUR, per_hour))
    return tuple(Window.of(unit, limit) for unit, limit in pairs if limit > 0)


FREE_LIMITS: Limits = limits_of(FREE_PLAN_RPS, FREE_PLAN_RPM, FREE_PLAN_RPH)
# A suspended tenant may make no requests; the minute window makes its clients back off
# for a while rather than retry every second.
SUSPENDED_LIMITS: Limits = (Window.of(MINUTE, 0),)

# The platform's own tenant (operators, service accounts) is not a customer on a plan;
# it is still limited, so a leaked operator token cannot flood the mesh.
PLATFORM_LIMITS: Limits = limits_of(500, 20_000, 1_000_000)

PAGE_SIZE = 1000
# Bounds one load (a million tenants) even if the server kept returning page tokens.
MAX_PAGES = 1000
CALL_TIMEOUT_S = 5.0
# A tenant the table does not know is confirmed with the tenant service while Envoy waits
# for the rate limit answer: bounded well below a client's patience, and Envoy's own timeout
# (its failure mode decides) covers a slower answer.
LOOKUP_TIMEOUT_S = 1.0
# How long start-up waits for the first load before serving with the defaults.
STARTUP_WAIT_S = 2.0

TenantSource = Callable[[], Awaitable[list[tenant_pb2.Tenant]]]
# One tenant's record, or None when the tenant service does not know it (NOT_FOUND).
TenantLookup = Callable[[str], Awaitable["tenant_pb2.Tenant | None"]]
# Bounds the memory an unlucky or hostile stream of unknown tenant ids can take (each one
# needs a verified token, so this is a safety net, not the defence).
MAX_MISSING = 10_000


async def get_tenant(stub: tenant_pb2_grpc.TenantServiceAsyncStub, tenant_id: str) -> tenant_pb2.Tenant | None:
    """The tenant's record as the edge's platform service account, or None when it does not exist."""
    with identity.acting_as(identity.service_account("edge")):
        try:
            response = await stub.GetTenant(tenant_pb2.GetTenantRequest(tenant_id=tenant_id),
                                            timeout=LOOKUP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
    return response.tenant


def tenant_limits(tenant: tenant_pb2.Tenant) -> Limits:
    if tenant.state == tenant_pb2.TENANT_STATE_SUSPENDED:
        return SUSPENDED_LIMITS
    lim = tenant.limits
    if not (lim.requests_per_second or lim.requests_per_minute or lim.requests_per_hour):
        # No request limits recorded at all is a gap in the tenant record, not a licence
        # to send without limit.
        return FREE_LIMITS
    return limits_of(lim.requests_per_second, lim.requests_per_minute, lim.requests_per_hour)


async def list_all_tenants(stub: tenant_pb2_grpc.TenantServiceAsyncStub) -> list[tenant_pb2.Tenant]:
    """Every tenant, page by page, as the edge's platform service account."""
    tenants: list[tenant_pb2.Tenant] = []
    token = ""
    seen: set[str] = set()
    with identity.acting_as(identity.service_account("edge")):
        for _ in range(MAX_PAGES):
            response = await stub.ListTenants(
                tenant_pb2.ListTenantsRequest(page_size=PAGE_SIZE, page_token=token), timeout=CALL_TIMEOUT_S)
            tenants.extend(response.tenants)
            token = response.next_page_token
            if not token or token in seen:
                return tenants
            seen.add(token)
    log.warning("tenant listing truncated", extra={"pages": MAX_PAGES})
    return tenants


def _table(tenants: Iterable[tenant_pb2.Tenant]) -> dict[str, Limits]:
    table = {identity.PLATFORM_TENANT: PLATFORM_LIMITS}
    table.update((t.tenant_id, tenant_limits(t)) for t in tenants)
    return table


# Why a tenant is refused outright (PERMISSION_DENIED at the edge, not a rate limit).
SUSPENDED = "suspended"
DELETED = "deleted"
# A verified token for a tenant the tenant service has never heard of (never created, or
# deleted before this edge started).
UNKNOWN = "unknown"


class TenantLimits:
    """Limits per tenant id, refreshed in the background."""

    def __init__(self, source: TenantSource, refresh_s: float, *,
                 on_close: Callable[[], Awaitable[None]] | None = None, watch: WatchStream | None = None,
                 lookup: TenantLookup | None = None) -> None:
        self._source = source
        # Without a lookup (tests of limits alone) a tenant the table does not know gets the
        # free plan's limits; with one, it is confirmed before it is admitted or refused.
        self._lookup = lookup
        # Tenant id -> when its "does not exist" answer expires (monotonic): a negative cache,
        # so a token for a missing tenant costs one lookup per refresh period, not one per call.
        # A tenant created meanwhile leaves it at once through the watch (or the next listing).
        self._missing: dict[str, float] = {}
        self._inflight: SingleFlight[str, str | None] = SingleFlight()
        self._refresh_s = max(0.1, refresh_s)
        # The periodic refresh is the safety net while the watch is down; once a watch is past
        # its snapshot, one full load reconciles what changed while it was down (tenants
        # deleted meanwhile), and pushed changes keep the table current from then on.
        quick = min(1.0, self._refresh_s)
        self._watch = None if watch is None else TenantFollower(
            watch, lambda change, _snapshot: self.apply(change), on_snapshot=self.refresh,
            reconnect=Backoff(base_s=quick, cap_s=quick), name="tenant-watch")
        self._table: dict[str, Limits] = _table(())
        self._count = 0
        # Tenant id -> SUSPENDED or DELETED: refused before any limit is counted.
        self.refused: dict[str, str] = {}
        self._known: set[str] = set()
        self._active: list[tuple[str, str]] = []
        self._loaded = False
        self._healthy = True
        self._task: asyncio.Task[None] | None = None
        self._on_close = on_close

    @property
    def watch_live(self) -> bool:
        """True while the watch is connected and past its snapshot: the periodic listing
        (every tenant, every refresh period) is skipped, since every change arrives pushed."""
        return self._watch is not None and self._watch.live

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantLimits:
        channel = lifecycle.connect_peer(settings, "metering")
        stub = tenant_pb2_grpc.TenantServiceStub(channel)

        async def close() -> None:
            await channel.close(None)

        return cls(lambda: list_all_tenants(stub), settings.tenant_cache_ttl_s, on_close=close,
                   watch=watch_as(stub, "edge"), lookup=lambda tenant_id: get_tenant(stub, tenant_id))

    def get(self, tenant_id: str) -> Limits:
        return self._table.get(tenant_id, FREE_LIMITS)

    def known(self, tenant_id: str) -> Limits | None:
        """The tenant's limits if the table knows it; None: confirm it first (`confirm`)."""
        limits = self._table.get(tenant_id)
        if limits is None and self._lookup is None:
            return FREE_LIMITS
        return limits

    async def confirm(self, tenant_id: str) -> str | None:
        """For a tenant the table does not know: None when the tenant service has it (it is
        added to the table, so the next call is a dict read again), else why it is refused.
        Concurrent calls for one tenant share one lookup; errors propagate (the limiter's
        failure mode decides)."""
        expiry = self._missing.get(tenant_id)
        if expiry is not None:
            if expiry > time.monotonic():
                return self.refused.get(tenant_id, UNKNOWN)
            del self._missing[tenant_id]
        # Envoy giving up on one call must not cancel the lookup others wait on.
        return await self._inflight.run(tenant_id, lambda: self._confirm(tenant_id))

    async def _confirm(self, tenant_id: str) -> str | None:
        assert self._lookup is not None
        tenant = await self._lookup(tenant_id)
        if tenant is None:
            if len(self._missing) >= MAX_MISSING:
                self._missing.clear()
            self._missing[tenant_id] = time.monotonic() + self._refresh_s
            log.info("refusing a token for an unknown tenant", extra={"tenant_id": tenant_id})
            return self.refused.get(tenant_id, UNKNOWN)
        # Created since the last listing: known from now on, with its own limits.
        self._table = {**self._table, tenant_id: tenant_limits(tenant)}
        self._known.add(tenant_id)
        if tenant.state == tenant_pb2.TENANT_STATE_SUSPENDED:
            self.refused = {**self.refused, tenant_id: SUSPENDED}
            return SUSPENDED
        if tenant_id in self.refused:
            self.refused = {k: v for k, v in self.refused.items() if k != tenant_id}
        return None

    def active_tenants(self) -> list[tuple[str, str]]:
        """(tenant id, display name) of the active tenants, as last loaded."""
        return list(self._active)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def __len__(self) -> int:
        """How many tenants the last load returned."""
        return self._count

    async def refresh(self) -> bool:
        """Loads the table once; on failure the previous one stays in use."""
        try:
            tenants = await self._source()
        except Exception as exc:  # a failed refresh must never stop the refresher
            if self._healthy:
                log.warning("cannot load tenant limits; keeping the previous ones",
                            extra={"error": str(exc), "tenants": len(self._table)})
            self._healthy = False
            return False
        self._table = _table(tenants)
        self._count = len(tenants)
        ids = {t.tenant_id for t in tenants}
        refused = {t.tenant_id: SUSPENDED for t in tenants if t.state == tenant_pb2.TENANT_STATE_SUSPENDED}
        # A tenant an earlier load listed and this one does not was deleted (one created since
        # the last load is unknown, not deleted: it gets the free plan's limits until listed).
        refused.update((gone, DELETED) for gone in (self._known - ids) | {
            t for t, why in self.refused.items() if why == DELETED and t not in ids})
        self.refused = refused
        self._known = ids
        for listed in ids & self._missing.keys():
            del self._missing[listed]
        self._active = sorted((t.tenant_id, t.display_name or t.tenant_id) for t in tenants
                              if t.state != tenant_pb2.TENANT_STATE_SUSPENDED)
        if not self._healthy or not self._loaded:
            log.info("tenant limits loaded", extra={"tenants": len(self._table)})
        self._loaded = self._healthy = True
        return True

    async def start(self) -> None:
        # One attempt now so limits are right from the first request when metering is
        # already up; the loop keeps trying when it is not (start order is not fixed).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.refresh(), STARTUP_WAIT_S)
        self._task = asyncio.create_task(self._loop(), name="tenant-limits")
        if self._watch is not None:
            await self._watch.start()

    async def _loop(self) -> None:
        while True:
            # Until the first load succeeds, retry sooner than the refresh period.
            await asyncio.sleep(self._refresh_s if self._loaded else min(1.0, self._refresh_s))
            if not self.watch_live:
                await self.refresh()

    def apply(self, change: tenant_pb2.WatchTenantsResponse) -> None:
        """Applies pushed changes at once: a tenant created, changed, suspended or deleted is
        limited (or refused) by its own record within moments, not after the next refresh."""
        table = dict(self._table)
        refused = dict(self.refused)
        active = dict(self._active)
        for tenant in change.tenants:
            table[tenant.tenant_id] = tenant_limits(tenant)
            self._known.add(tenant.tenant_id)
            # Created just now, perhaps after a token for it was refused: admitted at once.
            self._missing.pop(tenant.tenant_id, None)
            if tenant.state == tenant_pb2.TENANT_STATE_SUSPENDED:
                refused[tenant.tenant_id] = SUSPENDED
                active.pop(tenant.tenant_id, None)
            else:
                refused.pop(tenant.tenant_id, None)
                active[tenant.tenant_id] = tenant.display_name or tenant.tenant_id
        for gone in change.deleted_tenant_ids:
            table.pop(gone, None)
            active.pop(gone, None)
            self._known.discard(gone)
            refused[gone] = DELETED
        self._table, self.refused, self._active = table, refused, sorted(active.items())

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._on_close is not None:
            await self._on_close()
