"""Tenants: creation from plans, field-mask updates, paging, the store and its cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from servers.common.errors import AlreadyExists, InvalidArgument, NotFound
from servers.metering.tenants import plans
from servers.metering.tenants.domain import Tenant, TenantState, apply_changes, decode_page_token, new_tenant
from servers.metering.tenants.plans import Plan, RetrievalMode
from servers.metering.tenants.store import CachedTenantStore, SqliteTenantStore

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteTenantStore]:
    s = SqliteTenantStore(tmp_path / "tenants.sqlite")
    await s.open()
    yield s
    await s.close()


def test_plans_grow_from_free_to_enterprise() -> None:
    free, pro, ent = (plans.defaults(p).limits for p in (Plan.FREE, Plan.PRO, Plan.ENTERPRISE))
    assert free.requests_per_second <= 10 and free.requests_per_hour <= 1_000
    for small, large in ((free, pro), (pro, ent)):
        assert large.requests_per_second > small.requests_per_second
        assert large.requests_per_hour > small.requests_per_hour
        assert large.tokens_per_month > small.tokens_per_month
    assert plans.defaults(Plan.FREE).config.provider == "extractive"
    assert plans.defaults(Plan.FREE).config.model == "extractive-v1"


def test_new_tenant_takes_its_plans_defaults() -> None:
    tenant = new_tenant("acme", "", Plan.PRO, T0)
    assert tenant.display_name == "acme"
    assert tenant.limits == plans.defaults(Plan.PRO).limits
    assert tenant.config == plans.defaults(Plan.PRO).config
    assert (tenant.state, tenant.config_version, tenant.create_time) == (TenantState.ACTIVE, 1, T0)


@pytest.mark.parametrize("bad", ["", "ab", "Acme", "-acme", "acme-", "ac_me", "a" * 64])
def test_tenant_ids_are_validated(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        new_tenant(bad, "", Plan.FREE, T0)
    assert info.value.violations[0].field == "tenant_id"


async def test_create_get_delete(store: SqliteTenantStore) -> None:
    created = await store.create(new_tenant("acme", "Acme Corp", Plan.FREE, T0))
    assert await store.get("acme") == created
    with pytest.raises(AlreadyExists):
        await store.create(new_tenant("acme", "Another", Plan.PRO, T0))
    await store.delete("acme")
    with pytest.raises(NotFound):
        await store.get("acme")
    with pytest.raises(NotFound):
        await store.delete("acme")


def test_field_mask_changes_only_the_named_fields() -> None:
    tenant = new_tenant("acme", "Acme", Plan.FREE, T0)
    updated = apply_changes(tenant, {"config.system_prompt": "Be terse.", "limits.requests_per_hour": 10,
                                     "config.retrieval_mode": RetrievalMode.HYBRID,
                                     "config.temperature": 0.699999988079071}, T1)
    assert updated.config.system_prompt == "Be terse."
    assert updated.config.retrieval_mode is RetrievalMode.HYBRID
    assert updated.config.temperature == 0.7
    assert updated.limits.requests_per_hour == 10
    assert updated.limits.tokens_per_month == tenant.limits.tokens_per_month
    assert updated.display_name == "Acme"
    assert (updated.config_version, updated.update_time, updated.create_time) == (2, T1, T0)


def test_plan_change_reapplies_limits_unless_the_update_names_them() -> None:
    tenant = apply_changes(new_tenant("acme", "Acme", Plan.FREE, T0), {"limits.requests_per_hour": 3}, T0)
    upgraded = apply_changes(tenant, {"plan": Plan.PRO}, T1)
    assert upgraded.plan is Plan.PRO
    assert upgraded.limits == plans.defaults(Plan.PRO).limits
    custom = apply_changes(tenant, {"plan": Plan.PRO, "limits.requests_per_hour": 7}, T1)
    assert custom.limits.requests_per_hour == 7
    assert custom.limits.tokens_per_month == plans.defaults(Plan.PRO).limits.tokens_per_month


@pytest.mark.parametrize(("changes", "field"), [
    ({}, "update_mask"),
    ({"tenant_id": "other"}, "update_mask"),
    ({"config_version": 9}, "update_mask"),
    ({"limits.unknown": 1}, "update_mask"),
    ({"display_name": "  "}, "tenant.display_name"),
    ({"plan": None}, "tenant.plan"),
    ({"state": None}, "tenant.state"),
    ({"limits.requests_per_hour": 0}, "tenant.limits.requests_per_hour"),
    ({"config.provider": "mystery"}, "tenant.config.provider"),
    ({"config.temperature": 3.0}, "tenant.config.temperature"),
    ({"config.top_k": 0}, "tenant.config.top_k"),
    ({"config.retrieval_mode": None}, "tenant.config.retrieval_mode"),
    ({"config.model": ""}, "tenant.config.model"),
])
def test_bad_updates_are_invalid_arguments(changes: dict[str, object], field: str) -> None:
    tenant = new_tenant("acme", "Acme", Plan.FREE, T0)
    with pytest.raises(InvalidArgument) as info:
        apply_changes(tenant, changes, T1)
    assert field in [v.field for v in info.value.violations]


async def test_update_is_stored_and_versioned(store: SqliteTenantStore) -> None:
    await store.create(new_tenant("acme", "Acme", Plan.FREE, T0))
    await store.update("acme", lambda t: apply_changes(t, {"state": TenantState.SUSPENDED}, T1))
    stored = await store.get("acme")
    assert stored.suspended
    assert stored.config_version == 2
    assert stored.update_time == T1
    with pytest.raises(NotFound):
        await store.update("nobody", lambda t: t)


async def test_failed_update_changes_nothing(store: SqliteTenantStore) -> None:
    await store.create(new_tenant("acme", "Acme", Plan.FREE, T0))
    with pytest.raises(InvalidArgument):
        await store.update("acme", lambda t: apply_changes(t, {"limits.requests_per_hour": -1}, T1))
    assert (await store.get("acme")).config_version == 1


async def test_tenants_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "tenants.sqlite"
    first = SqliteTenantStore(path)
    await first.open()
    created = await first.create(new_tenant("acme", "Acme", Plan.ENTERPRISE, T0))
    await first.close()
    again = SqliteTenantStore(path)
    await again.open()
    try:
        assert await again.get("acme") == created
    finally:
        await again.close()


async def test_paging_walks_every_tenant_once(store: SqliteTenantStore) -> None:
    ids = sorted(f"tenant-{i:03d}" for i in range(25))
    for tenant_id in ids:
        await store.create(new_tenant(tenant_id, "", Plan.FREE, T0))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await store.list_page(10, token)
        seen += [t.tenant_id for t in page.tenants]
        pages += 1
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == ids
    assert pages == 3
    assert len((await store.list_page(0, "")).tenants) == 25  # 0 means the default (100)


async def test_page_size_and_token_are_validated(store: SqliteTenantStore) -> None:
    with pytest.raises(InvalidArgument):
        await store.list_page(-1, "")
    with pytest.raises(InvalidArgument):
        await store.list_page(10, "not-a-token")
    with pytest.raises(InvalidArgument):
        decode_page_token("djE6Li4v")  # "v1:../": well-formed base64, not a tenant id
    assert (await store.list_page(5000, "")).tenants == []  # clamped to 1000, not refused


async def test_cache_serves_lookups_and_is_invalidated_by_writes(store: SqliteTenantStore) -> None:
    now = [0.0]
    cache = CachedTenantStore(store, ttl_s=5.0, clock=lambda: now[0])
    await cache.create(new_tenant("acme", "Acme", Plan.FREE, T0))
    first = await cache.get("acme")

    # A change made behind the cache's back (another process) shows after the TTL.
    await store.update("acme", lambda t: apply_changes(t, {"display_name": "Elsewhere"}, T1))
    assert (await cache.get("acme")).display_name == first.display_name
    now[0] = 5.1
    assert (await cache.get("acme")).display_name == "Elsewhere"

    # A change made through the cache shows at once.
    await cache.update("acme", lambda t: apply_changes(t, {"display_name": "Here"}, T1))
    assert (await cache.get("acme")).display_name == "Here"
    await cache.delete("acme")
    with pytest.raises(NotFound):
        await cache.get("acme")


async def test_cache_does_not_remember_missing_tenants(store: SqliteTenantStore) -> None:
    cache = CachedTenantStore(store, ttl_s=60.0)
    with pytest.raises(NotFound):
        await cache.get("acme")
    await store.create(new_tenant("acme", "Acme", Plan.FREE, T0))
    assert isinstance(await cache.get("acme"), Tenant)
