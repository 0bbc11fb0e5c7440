"""Which roles may call which RPCs at the edge: rendered into Envoy's RBAC filter, which
reads the verified token's claims from jwt_authn's metadata, so the check costs no extra
hop per request. The services check again before changing data (defence in depth).

- member: ask and search, read its tenant's usage, quota and record;
- admin (or the narrower ingest role): also ingest and delete documents; admin may also
  update its own tenant (the metering service decides which fields);
- operator (platform): also manage every tenant (TenantService) and read any tenant's usage;
- service (platform service accounts only): the service-to-service RPCs (usage records,
  tenant provisioning and erasure), which no end-user role reaches, operators included.
"""

from __future__ import annotations

from typing import Any

from servers.common import identity

JWT_FILTER = "envoy.filters.http.jwt_authn"
PAYLOAD_KEY = "jwt_payload"

SERVICES = ("GenerationService", "RetrievalService", "MeteringService", "TenantService", "AuditService")

# Reachable without a token (probes, reflection, the console's files, dev sign-in).
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/assets/", "/.well-known/", "/dev/")
PUBLIC_PATHS = ("/", "/favicon.ico")

MEMBER_RPCS = (
    "/copilot.v1.GenerationService/Answer",
    "/copilot.v1.GenerationService/StreamAnswer",
    "/copilot.v1.RetrievalService/Search",
    "/copilot.v1.MeteringService/GetUsage",
    "/copilot.v1.MeteringService/CheckQuota",
    "/copilot.v1.TenantService/GetTenant",
    # Reading search defaults; changing them needs admin, which the retrieval service checks.
    "/copilot.v1.RetrievalService/ConfigureSearch",
)
# A tenant's read-only look at itself: its usage, its quota, its own record. Not counted
# against its hourly request quota (a tenant that used it up must still be able to see
# so), but rate limited on a counter of their own (servers/edge/service.py).
INSPECTION_RPCS = (
    "/copilot.v1.MeteringService/GetUsage",
    "/copilot.v1.MeteringService/CheckQuota",
    "/copilot.v1.TenantService/GetTenant",
)
ADMIN_RPCS = (
    "/copilot.v1.RetrievalService/IngestDocuments",
    "/copilot.v1.RetrievalService/StreamIngestDocuments",
    "/copilot.v1.RetrievalService/DeleteDocuments",
)
# Its own tenant's settings; which fields an admin may change is the metering service's call
# (it refuses another tenant, and plan/limits/state, to anyone but an operator).
TENANT_ADMIN_RPCS = (
    "/copilot.v1.TenantService/UpdateTenant",
    # Who may read a document (docs/access-control.md): admin only, not the ingest role.
    "/copilot.v1.RetrievalService/SetDocumentAccess",
    # Its own tenant's audit trail (an operator reads any tenant's; the metering service checks).
    "/copilot.v1.AuditService/ListAuditEvents",
    "/copilot.v1.AuditService/ExportAuditEvents",
    "/copilot.v1.AuditService/VerifyAuditChain",
)
OPERATOR_RPCS = (
    "/copilot.v1.TenantService/CreateTenant",
    "/copilot.v1.TenantService/ListTenants",
    "/copilot.v1.TenantService/DeleteTenant",
    "/copilot.v1.TenantService/SuspendTenant",
    "/copilot.v1.TenantService/WatchTenants",
    "/copilot.v1.MeteringService/ReportBilling",
    "/copilot.v1.MeteringService/ReconcileBilling",
)
# Service-to-service RPCs: a platform service account's token (role `service`, e.g. a batch
# job recording usage) may call them through the edge; no end-user role may, operators included.
SERVICE_RPCS = (
    "/copilot.v1.MeteringService/RecordUsage",
    # Admission holds a share of the tenant's budget: a member able to hold it could lock
    # its own tenant out; the generation service reserves for the member's request.
    "/copilot.v1.MeteringService/ReserveQuota",
    "/copilot.v1.MeteringService/ReleaseQuota",
    "/copilot.v1.AuditService/RecordAuditEvents",
    "/copilot.v1.RetrievalService/ProvisionTenant",
    "/copilot.v1.RetrievalService/EraseTenant",
    "/copilot.v1.TenantService/WatchTenants",
)

# Who may call what: policy name -> (roles, any of which admits, paths).
POLICIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "member": ((identity.MEMBER, identity.ADMIN, identity.OPERATOR), MEMBER_RPCS),
    "admin": ((identity.ADMIN, identity.INGEST, identity.OPERATOR), ADMIN_RPCS),
    "tenant-admin": ((identity.ADMIN, identity.OPERATOR), TENANT_ADMIN_RPCS),
    "operator": ((identity.OPERATOR,), OPERATOR_RPCS),
    "service": ((identity.SERVICE,), SERVICE_RPCS),
}


def allowed_roles(path: str) -> frozenset[str] | None:
    """The roles that may call `path` (None: public, no token needed; empty: nobody)."""
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return None
    roles: set[str] = set()
    for policy_roles, paths in POLICIES.values():
        if path in paths:
            roles.update(policy_roles)
    return frozenset(roles)


def public_path_rules() -> list[dict[str, Any]]:
    return ([{"url_path": {"path": {"exact": p}}} for p in PUBLIC_PATHS]
            + [{"url_path": {"path": {"prefix": p}}} for p in PUBLIC_PREFIXES])


def _has_role(role: str) -> dict[str, Any]:
    path = [{"key": PAYLOAD_KEY}, {"key": "roles"}]
    return {"or_ids": {"ids": [
        # The usual form: "roles": ["member", "admin"].
        {"sourced_metadata": {"metadata_matcher": {
            "filter": JWT_FILTER, "path": path,
            "value": {"list_match": {"one_of": {"string_match": {"exact": role}}}}}}},
        # Some identity providers send one string: "member admin" or "member,admin".
        {"sourced_metadata": {"metadata_matcher": {
            "filter": JWT_FILTER, "path": path,
            "value": {"string_match": {"safe_regex": {"regex": f"(.*[ ,])?{role}([ ,].*)?"}}}}}},
    ]}}


def rbac_policies() -> dict[str, Any]:
    policies: dict[str, Any] = {
        "public": {"permissions": [{"or_rules": {"rules": public_path_rules()}}], "principals": [{"any": True}]},
        # Paths no route serves get the router's "no such service" (UNIMPLEMENTED), not a 403
        # that would suggest the service exists.
        "unrouted": {"permissions": [{"not_rule": {"or_rules": {"rules": [
            {"url_path": {"path": {"prefix": f"/copilot.v1.{name}/"}}} for name in SERVICES]}}}],
                     "principals": [{"any": True}]},
    }
    for name, (roles, paths) in POLICIES.items():
        policies[name] = {
            "permissions": [{"or_rules": {"rules": [{"url_path": {"path": {"exact": p}}} for p in paths]}}],
            "principals": [_has_role(role) for role in roles],
        }
    return policies
