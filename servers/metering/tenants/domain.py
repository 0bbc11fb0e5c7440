"""Tenants: the domain (a tenant, its validated changes, paging through tenants).

Where tenants are kept is `store.py`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from servers.common.errors import FieldViolation, InvalidArgument
from servers.common.identity import PLATFORM_TENANT, TENANT_ID_RE
from servers.metering.tenants import plans
from servers.metering.tenants.plans import (
    PROVIDERS,
    UNSUPPORTED_SENTENCES,
    Limits,
    Plan,
    RetrievalMode,
    TenantConfig,
)

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
    "unsupported_sentences": lambda v: None if v in UNSUPPORTED_SENTENCES
    else f"must be one of {', '.join(UNSUPPORTED_SENTENCES)}",
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
