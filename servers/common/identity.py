"""The caller's verified identity, carried in a contextvar for the duration of a call.

Envoy verifies the JWT and sets these headers from its claims (replacing anything the
client sent); the server interceptor reads them into the contextvar and the client
interceptor forwards them on every service-to-service call. Application code reads
`current()` and never passes tenant ids around by hand.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from servers.common.errors import PermissionDenied, Unauthenticated

TENANT_HEADER = "x-tenant-id"
SUBJECT_HEADER = "x-user-id"
ROLES_HEADER = "x-roles"
# The caller's groups (a verified claim, `Settings.groups_claim`): who may read which
# documents (docs/access-control.md). Stripped from clients and set by Envoy like the others.
GROUPS_HEADER = "x-groups"
IDENTITY_HEADERS = (TENANT_HEADER, SUBJECT_HEADER, ROLES_HEADER, GROUPS_HEADER)
# Set on every call one service of the mesh makes to another (the client interceptor) and
# stripped by Envoy from what clients send: a service may tell its peers what it tells no
# end user (e.g. how many documents retrieval withheld from the caller, for generation's audit).
INTERNAL_HEADER = "x-copilot-internal"

# Platform-wide role: manages all tenants. Its holder still has a home tenant.
OPERATOR = "operator"
ADMIN = "admin"
MEMBER = "member"
INGEST = "ingest"
# Held by the platform's own services acting for a tenant (e.g. writing its usage).
SERVICE = "service"

# The tenant the platform's own service accounts act as (e.g. the edge reading plans).
PLATFORM_TENANT = "platform"

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Identity:
    tenant_id: str
    subject: str
    roles: frozenset[str]
    # Groups from the verified token; none when its issuer sends no groups claim.
    groups: frozenset[str] = frozenset()

    def has_any(self, roles: Iterable[str]) -> bool:
        return not self.roles.isdisjoint(roles)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            (TENANT_HEADER, self.tenant_id),
            (SUBJECT_HEADER, self.subject),
            (ROLES_HEADER, ",".join(sorted(self.roles))),
            (GROUPS_HEADER, ",".join(sorted(self.groups))),
        )


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "copilot_identity", default=None
)


def parse_roles(raw: str) -> frozenset[str]:
    """Roles from the x-roles header (groups from x-groups alike). Envoy's claim_to_headers
    renders a JSON list claim (`"roles": ["member", "admin"]`) as base64 of the JSON; a
    string claim arrives as it is (comma- or space-separated)."""
    raw = raw.strip()
    if raw and not any(sep in raw for sep in ", "):
        try:
            decoded = json.loads(base64.b64decode(raw, validate=True))
        except (ValueError, UnicodeDecodeError):
            decoded = None
        if isinstance(decoded, list):
            return frozenset(str(r) for r in decoded if str(r))
    return frozenset(r for r in re.split(r"[,\s]+", raw) if r)


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity | None:
    """The identity in request metadata, or None when there is no tenant header."""
    values: dict[str, str] = {}
    for key, value in metadata or ():
        if key in IDENTITY_HEADERS:
            values[key] = value.decode() if isinstance(value, bytes) else value
    tenant = values.get(TENANT_HEADER, "").strip()
    if not tenant:
        return None
    if not TENANT_ID_RE.match(tenant):
        raise Unauthenticated(f"malformed tenant id in verified identity: {tenant!r}")
    return Identity(
        tenant_id=tenant,
        subject=values.get(SUBJECT_HEADER, "").strip() or "anonymous",
        roles=parse_roles(values.get(ROLES_HEADER, "")),
        groups=parse_roles(values.get(GROUPS_HEADER, "")),
    )


def is_internal(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call's metadata says it came from another service of the mesh."""
    return any(key == INTERNAL_HEADER for key, _ in metadata or ())


def current() -> Identity:
    """The caller's identity; raises UNAUTHENTICATED when the call carries none."""
    identity = _current.get()
    if identity is None:
        raise Unauthenticated("this call carries no verified tenant identity")
    return identity


def current_or_none() -> Identity | None:
    return _current.get()


def tenant_id() -> str:
    return current().tenant_id


def require_role(*roles: str) -> Identity:
    """The caller's identity if it holds one of `roles` (operators hold them all)."""
    identity = current()
    if not identity.has_any((*roles, OPERATOR)):
        raise PermissionDenied(
            f"this operation needs one of the roles {', '.join(sorted(roles))}",
            reason="MISSING_ROLE",
        )
    return identity


@contextmanager
def acting_as(identity: Identity) -> Iterator[Identity]:
    """Runs a block as `identity`: used by the server interceptor and by background work
    that acts for a service account."""
    token = _current.set(identity)
    try:
        yield identity
    finally:
        _current.reset(token)


def service_subject(name: str) -> str:
    """How the platform's service `name` (e.g. "generation") appears as an actor."""
    return f"service:{name}"


def service_account(name: str) -> Identity:
    """The service `name` acting for the platform itself (e.g. the edge reading every tenant's plan)."""
    return Identity(tenant_id=PLATFORM_TENANT, subject=service_subject(name), roles=frozenset({OPERATOR}))


def service_identity(tenant_id: str, name: str) -> Identity:
    """The service `name` acting for one tenant (writing its usage or audit, admitting its
    requests, provisioning it): the service role only, which no end user holds."""
    return Identity(tenant_id=tenant_id, subject=service_subject(name), roles=frozenset({SERVICE}))


def acting_as_service(tenant_id: str, name: str) -> contextlib.AbstractContextManager[Identity]:
    """Runs a block as the service `name` acting for `tenant_id` (`service_identity`)."""
    return acting_as(service_identity(tenant_id, name))
