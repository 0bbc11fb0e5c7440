"""Where tenants are kept.

`TenantStore` is the storage interface; `SqliteTenantStore` is the embedded default and
`CachedTenantStore` puts a short-TTL lookup cache in front of any store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from servers.common.errors import AlreadyExists, NotFound
from servers.metering.storage.sqlite import SqliteStore, SqliteWorker, from_micros, to_micros, transaction
from servers.metering.tenants import plans
from servers.metering.tenants.domain import (
    CONFIG_FIELDS,
    LIMIT_FIELDS,
    Tenant,
    TenantPage,
    TenantState,
    decode_page_token,
    encode_page_token,
    page_size,
)
from servers.metering.tenants.plans import Plan, RetrievalMode


class TenantStore(ABC):
    """Where tenants are kept. Implementations are safe to call concurrently."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquires resources; called once before use."""

    @abstractmethod
    async def create(self, tenant: Tenant) -> Tenant:
        """Stores a new tenant; ALREADY_EXISTS when its id is taken."""

    @abstractmethod
    async def get(self, tenant_id: str) -> Tenant:
        """The tenant; NOT_FOUND when there is none."""

    @abstractmethod
    async def update(self, tenant_id: str, mutate: Callable[[Tenant], Tenant]) -> Tenant:
        """Atomically replaces the tenant with `mutate(current)`; NOT_FOUND when there is none.
        `mutate` must be pure: it may run on another thread."""

    @abstractmethod
    async def scan(self, page_size: int, after: str | None) -> list[Tenant]:
        """Up to `page_size` tenants ordered by id, starting after the id `after`."""

    @abstractmethod
    async def delete(self, tenant_id: str) -> None:
        """Removes the tenant; NOT_FOUND when there is none."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the store answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases resources."""

    async def list_page(self, requested_size: int, page_token: str) -> TenantPage:
        """A page of tenants with an opaque token for the next page ("" on the last)."""
        size = page_size(requested_size)
        rows = await self.scan(size + 1, decode_page_token(page_token))
        if len(rows) > size:
            return TenantPage(tenants=rows[:size], next_page_token=encode_page_token(rows[size - 1].tenant_id))
        return TenantPage(tenants=rows, next_page_token="")


_TENANT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tenants (
        tenant_id TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        plan TEXT NOT NULL,
        state TEXT NOT NULL,
        limits TEXT NOT NULL,
        config TEXT NOT NULL,
        config_version INTEGER NOT NULL,
        create_time_us INTEGER NOT NULL,
        update_time_us INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "PRAGMA user_version = 1",
)

_COLUMNS = ("tenant_id, display_name, plan, state, limits, config, config_version, "
            "create_time_us, update_time_us")


def _row(tenant: Tenant) -> tuple[Any, ...]:
    config = asdict(tenant.config)
    return (tenant.tenant_id, tenant.display_name, tenant.plan.value, tenant.state.value,
            json.dumps(asdict(tenant.limits)), json.dumps(config), tenant.config_version,
            to_micros(tenant.create_time), to_micros(tenant.update_time))


def _tenant(row: tuple[Any, ...]) -> Tenant:
    tenant_id, display_name, plan, state, limits, config, version, created, updated = row
    plan = Plan(plan)
    defaults = plans.defaults(plan)
    # Stored as JSON overlaid on the plan's defaults: a field added to Limits or
    # TenantConfig later reads back as its default instead of breaking old rows.
    stored_limits = {k: v for k, v in json.loads(limits).items() if k in LIMIT_FIELDS}
    stored_config = {k: v for k, v in json.loads(config).items() if k in CONFIG_FIELDS}
    if "retrieval_mode" in stored_config:
        stored_config["retrieval_mode"] = RetrievalMode(stored_config["retrieval_mode"])
    return Tenant(tenant_id=tenant_id, display_name=display_name, plan=plan, state=TenantState(state),
                  limits=replace(defaults.limits, **stored_limits),
                  config=replace(defaults.config, **stored_config),
                  config_version=version, create_time=from_micros(created),
                  update_time=from_micros(updated))


def _not_found(tenant_id: str) -> NotFound:
    return NotFound(f"tenant {tenant_id} does not exist", reason="TENANT_NOT_FOUND",
                    metadata={"tenant_id": tenant_id})


class SqliteTenantStore(SqliteStore, TenantStore):
    """The embedded default: one SQLite database (WAL) under the data directory."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteWorker(path, "tenants", _TENANT_SCHEMA)

    async def create(self, tenant: Tenant) -> Tenant:
        def insert(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                f"INSERT INTO tenants ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (tenant_id) DO NOTHING", _row(tenant))
            if cursor.rowcount == 0:
                raise AlreadyExists(f"tenant {tenant.tenant_id} already exists", reason="TENANT_EXISTS",
                                    metadata={"tenant_id": tenant.tenant_id})

        await self._db.call(lambda conn: transaction(conn, insert))
        return tenant

    async def get(self, tenant_id: str) -> Tenant:
        def select(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {_COLUMNS} FROM tenants WHERE tenant_id = ?", (tenant_id,)).fetchone()
            return row

        row = await self._db.call(select)
        if row is None:
            raise _not_found(tenant_id)
        return _tenant(row)

    async def update(self, tenant_id: str, mutate: Callable[[Tenant], Tenant]) -> Tenant:
        def read_modify_write(conn: sqlite3.Connection) -> Tenant:
            row = conn.execute(f"SELECT {_COLUMNS} FROM tenants WHERE tenant_id = ?",
                               (tenant_id,)).fetchone()
            if row is None:
                raise _not_found(tenant_id)
            updated = mutate(_tenant(row))
            if updated.tenant_id != tenant_id:
                raise ValueError("an update cannot change the tenant id")
            conn.execute(
                "UPDATE tenants SET display_name = ?, plan = ?, state = ?, limits = ?, config = ?, "
                "config_version = ?, create_time_us = ?, update_time_us = ? WHERE tenant_id = ?",
                (*_row(updated)[1:], tenant_id))
            return updated

        return await self._db.call(lambda conn: transaction(conn, read_modify_write))

    async def scan(self, page_size: int, after: str | None) -> list[Tenant]:
        def select(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                f"SELECT {_COLUMNS} FROM tenants WHERE tenant_id > ? ORDER BY tenant_id LIMIT ?",
                (after or "", page_size)).fetchall()

        return [_tenant(row) for row in await self._db.call(select)]

    async def delete(self, tenant_id: str) -> None:
        def remove(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM tenants WHERE tenant_id = ?", (tenant_id,)).rowcount == 0:
                raise _not_found(tenant_id)

        await self._db.call(lambda conn: transaction(conn, remove))


class CachedTenantStore(TenantStore):
    """Caches lookups by id for a short TTL in front of another store.

    Only found tenants are cached (a tenant created elsewhere is visible at once), and
    every write through this object drops the entry, so within this process a change is
    seen by the next call; another process's change is seen within the TTL.
    """

    def __init__(self, inner: TenantStore, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self._ttl = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[float, Tenant]] = {}
        # Bumped by every write: a read that overlapped a write must not cache what it read,
        # as it may be the version the write just replaced.
        self._writes = 0

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        self._entries.clear()
        await self.inner.close()

    async def ping(self) -> bool:
        return await self.inner.ping()

    def invalidate(self, tenant_id: str | None = None) -> None:
        self._writes += 1
        if tenant_id is None:
            self._entries.clear()
        else:
            self._entries.pop(tenant_id, None)

    async def get(self, tenant_id: str) -> Tenant:
        entry = self._entries.get(tenant_id)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        writes = self._writes
        tenant = await self.inner.get(tenant_id)
        if self._ttl > 0 and writes == self._writes:
            self._entries[tenant_id] = (self._clock() + self._ttl, tenant)
        return tenant

    async def create(self, tenant: Tenant) -> Tenant:
        self.invalidate(tenant.tenant_id)
        return await self.inner.create(tenant)

    async def update(self, tenant_id: str, mutate: Callable[[Tenant], Tenant]) -> Tenant:
        self.invalidate(tenant_id)
        try:
            return await self.inner.update(tenant_id, mutate)
        finally:
            self.invalidate(tenant_id)

    async def delete(self, tenant_id: str) -> None:
        self.invalidate(tenant_id)
        try:
            await self.inner.delete(tenant_id)
        finally:
            self.invalidate(tenant_id)

    async def scan(self, page_size: int, after: str | None) -> list[Tenant]:
        return await self.inner.scan(page_size, after)
