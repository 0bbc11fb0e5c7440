"""Tenants: the domain (a tenant, its validated changes) and where tenants are kept.

`TenantStore` is the storage interface; `SqliteTenantStore` is the embedded default and
`CachedTenantStore` puts a short-TTL lookup cache in front of any store.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from servers.common.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from servers.common.identity import PLATFORM_TENANT, TENANT_ID_RE
from servers.metering.storage.sqlite import SqliteStore, SqliteWorker, from_micros, to_micros, transaction
from servers.metering.tenants import plans
from servers.metering.tenants.plans import PROVIDERS, Limits, Plan, RetrievalMode, TenantConfig

log = logging.getLogger("copilot.metering.tenants")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_DISPLAY_NAME = 200
MAX_SYSTEM_PROMPT = 16_000
MAX_MODEL_NAME = 200


class TenantState(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    display_name: str
    plan: Plan
    state: TenantState
    limits: Limits
    config: TenantConfig
    config_version: int
    create_time: datetime
    update_time: datetime

    @property
    def suspended(self) -> bool:
        return self.state is TenantState.SUSPENDED


@dataclass(frozen=True)
class TenantPage:
    tenants: list[Tenant]
    next_page_token: str


def validate_tenant_id(tenant_id: str, field: str = "tenant_id") -> str:
    if not TENANT_ID_RE.match(tenant_id):
        raise InvalidArgument.field(
            field, "must be 3..63 lowercase letters, digits or dashes, starting and ending with a "
                   "letter or digit")
    return tenant_id


def new_tenant(tenant_id: str, display_name: str, plan: Plan, now: datetime) -> Tenant:
    """A tenant on `plan` with the plan's limits and config, validated."""
    validate_tenant_id(tenant_id)
    if tenant_id == PLATFORM_TENANT:
        # The operators' and service accounts' home: a customer there would share their limits.
        raise InvalidArgument.field("tenant_id", f"{PLATFORM_TENANT!r} is reserved for the platform")
    name = display_name.strip() or tenant_id
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidArgument.field("display_name", f"at most {MAX_DISPLAY_NAME} characters")
    defaults = plans.defaults(plan)
    return Tenant(tenant_id=tenant_id, display_name=name, plan=plan, state=TenantState.ACTIVE,
                  limits=defaults.limits, config=defaults.config, config_version=1,
                  create_time=now, update_time=now)


# --- Updates -----------------------------------------------------------------------------

LIMIT_FIELDS = tuple(f.name for f in fields(Limits))
CONFIG_FIELDS = tuple(f.name for f in fields(TenantConfig))
# Every leaf path an update may set; "limits" and "config" expand to all their leaves.
UPDATABLE_PATHS = frozenset({"display_name", "plan", "state",
                             *(f"limits.{n}" for n in LIMIT_FIELDS),
                             *(f"config.{n}" for n in CONFIG_FIELDS)})

# Upper bounds well above any plan: they catch typos (an extra zero or three), not policy.
_LIMIT_MAX = {
    "requests_per_second": 1_000_000, "requests_per_minute": 60_000_000,
    "requests_per_hour": 2_000_000_000, "tokens_per_month": 10**15, "max_documents": 2_000_000_000,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CONFIG_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "provider": lambda v: None if v in PROVIDERS else f"must be one of {', '.join(sorted(PROVIDERS))}",
    "model": lambda v: None if isinstance(v, str) and 0 < len(v) <= MAX_MODEL_NAME
    else f"1..{MAX_MODEL_NAME} characters",
    "temperature": lambda v: None if isinstance(v, float | int) and math.isfinite(v) and 0 <= v <= 2
    else "must be between 0 and 2",
    "max_tokens": lambda v: None if _is_int(v) and 1 <= v <= 200_000 else "must be between 1 and 200000",
    "system_prompt": lambda v: None if isinstance(v, str) and len(v) <= MAX_SYSTEM_PROMPT
    else f"at most {MAX_SYSTEM_PROMPT} characters",
    "retrieval_mode": lambda v: None if isinstance(v, RetrievalMode)
    else "must be basic, hybrid, decomposed or agentic",
    "top_k": lambda v: None if _is_int(v) and 1 <= v <= 100 else "must be between 1 and 100",
    "pii_masking": lambda v: None if isinstance(v, bool) else "must be a boolean",
    "agentic_tools": lambda v: None if isinstance(v, bool) else "must be a boolean",
}


def _check_value(path: str, value: Any) -> str | None:
    """Why `value` is not acceptable at `path`, or None."""
    if path == "display_name":
        if not isinstance(value, str) or not value.strip():
            return "must not be empty"
        return None if len(value) <= MAX_DISPLAY_NAME else f"at most {MAX_DISPLAY_NAME} characters"
    if path == "plan":
        return None if isinstance(value, Plan) else "must be free, pro or enterprise"
    if path == "state":
        return None if isinstance(value, TenantState) else "must be active or suspended"
    section, _, name = path.partition(".")
    if section == "limits":
        if not _is_int(value):
            return "must be an integer"
        top = _LIMIT_MAX[name]
        return None if 1 <= value <= top else f"must be between 1 and {top}"
    return _CONFIG_CHECKS[name](value)


def validate_changes(changes: Mapping[str, Any]) -> None:
    """Raises INVALID_ARGUMENT listing every unknown path and bad value in `changes`."""
    if not changes:
        raise InvalidArgument.field("update_mask", "name at least one field to update")
    violations: list[FieldViolation] = []
    for path, value in changes.items():
        if path not in UPDATABLE_PATHS:
            violations.append(FieldViolation("update_mask", f"{path!r} cannot be updated"))
            continue
        why = _check_value(path, value)
        if why is not None:
            violations.append(FieldViolation(f"tenant.{path}", why))
    if violations:
        raise InvalidArgument("invalid tenant update: " + "; ".join(
            f"{v.field}: {v.description}" for v in violations), violations)


def apply_changes(tenant: Tenant, changes: Mapping[str, Any], now: datetime) -> Tenant:
    """`tenant` with `changes` (leaf path → value) applied, as the next config version.

    A plan change re-applies that plan's limits first, so limits named in the same update
    override the plan's rather than being overwritten by them.
    """
    validate_changes(changes)
    updated = tenant
    if "plan" in changes:
        plan = changes["plan"]
        updated = replace(updated, plan=plan, limits=plans.defaults(plan).limits)
    limits = {p.partition(".")[2]: v for p, v in changes.items() if p.startswith("limits.")}
    config = {p.partition(".")[2]: v for p, v in changes.items() if p.startswith("config.")}
    if "temperature" in config:
        # Arrives as a float32 from protobuf: 0.7 would otherwise read back as 0.699999988.
        config["temperature"] = round(float(config["temperature"]), 6)
    updated = replace(
        updated,
        display_name=changes["display_name"].strip() if "display_name" in changes else updated.display_name,
        state=changes.get("state", updated.state),
        limits=replace(updated.limits, **limits),
        config=replace(updated.config, **config),
        config_version=tenant.config_version + 1,
        update_time=max(now, tenant.update_time),
    )
    return updated


# --- Paging ------------------------------------------------------------------------------

_TOKEN_PREFIX = "v1:"


def encode_page_token(last_tenant_id: str) -> str:
    raw = (_TOKEN_PREFIX + last_tenant_id).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> str | None:
    """The tenant id a page continues after; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not raw.startswith(_TOKEN_PREFIX) or not TENANT_ID_RE.match(raw[len(_TOKEN_PREFIX):]):
        raise InvalidArgument.field("page_token", "not a token this service issued")
    return raw[len(_TOKEN_PREFIX):]


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


# --- Storage -----------------------------------------------------------------------------

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
