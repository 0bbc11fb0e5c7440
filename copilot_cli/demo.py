"""Demo tenants (one per plan) and their corpora, created through the public API."""

from __future__ import annotations

from pathlib import Path

import grpc

from copilot.v1 import common_pb2, tenant_pb2
from copilot_cli.client import Client
from servers.common.issuer import DevIssuer

CORPUS_DIR = Path(__file__).resolve().parent.parent / "demo" / "corpus"

# tenant id, plan, display name; each tenant's documents live in demo/corpus/<tenant id>/.
DEMO_TENANTS = (
    ("northwind-fintech", common_pb2.PLAN_FREE, "Northwind Fintech"),
    ("contoso-health", common_pb2.PLAN_PRO, "Contoso Health"),
    ("globex-bank", common_pb2.PLAN_ENTERPRISE, "Globex Bank"),
)


async def seed(address: str, issuer: DevIssuer) -> dict[str, dict[str, int]]:
    """Creates the demo tenants that do not exist yet and ingests their corpora
    (unchanged documents are skipped by content hash, so this is safe to repeat)."""
    from copilot_cli.main import ingest_paths

    operator = Client.connect(issuer.mint("platform", "demo-seeder", ["operator"]), address)
    results: dict[str, dict[str, int]] = {}
    try:
        for tenant_id, plan, name in DEMO_TENANTS:
            try:
                await operator.tenants.CreateTenant(
                    tenant_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name=name, plan=plan),
                    metadata=operator.metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            admin = Client.connect(issuer.mint(tenant_id, "demo-admin", ["member", "admin"]), address)
            try:
                results[tenant_id] = await ingest_paths(admin, [CORPUS_DIR / tenant_id], batch=32, progress=False)
            finally:
                await admin.close()
    finally:
        await operator.close()
    return results
