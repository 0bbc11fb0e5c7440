"""`make bench-edge`: the same cheap RPC (TenantService.GetTenant of the caller's own
tenant) direct to the metering server and through Envoy (JWT verification + the per-tenant
rate-limit check), in the same run, with the project's own load generator.

  python -m bench.edge [--concurrency 32] [--duration 10] [--processes 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from bench import ghz
from bench.load import LoadSpec, run
from copilot.v1 import common_pb2, tenant_pb2, tenant_pb2_grpc
from copilot_cli.supervisor import Mesh, settings_on_free_ports
from servers.common.identity import IDENTITY_HEADERS
from servers.common.settings import Settings

METHOD = "/copilot.v1.TenantService/GetTenant"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    args = parser.parse_args()
    if ghz.find_ghz():
        print("note: ghz is installed; this benchmark uses the project's generator for both targets "
              "so the ratio compares like with like")

    with tempfile.TemporaryDirectory(prefix="copilot-bench-") as tmp:
        settings = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=2.0)
        mesh = Mesh(settings, extra_env={"COPILOT_ACCESS_LOG": "0"})
        issuer = mesh.start()
        try:
            tenant = "bench-tenant"
            operator = (("authorization", f"Bearer {issuer.mint('platform', 'bench', ['operator'])}"),)
            with grpc.insecure_channel(mesh.edge_address) as ch:
                stub = tenant_pb2_grpc.TenantServiceStub(ch)
                created = stub.CreateTenant(tenant_pb2.CreateTenantRequest(
                    tenant_id=tenant, display_name="bench", plan=common_pb2.PLAN_ENTERPRISE),
                    metadata=operator, timeout=10).tenant
                # Limits far above what this machine can send: the check runs on every call
                # (that is its cost we measure) but never refuses.
                created.limits.requests_per_second = 1_000_000
                created.limits.requests_per_minute = 60_000_000
                created.limits.requests_per_hour = 1_000_000_000
                stub.UpdateTenant(tenant_pb2.UpdateTenantRequest(tenant=created, update_mask=field_mask_pb2.FieldMask(
                    paths=["limits.requests_per_second", "limits.requests_per_minute", "limits.requests_per_hour"])),
                    metadata=operator, timeout=10)
            time.sleep(settings.tenant_cache_ttl_s + 1)  # the edge picks up the new limits
            token = issuer.mint(tenant, "bench-user", ["member"], ttl_s=3600)
            request = tenant_pb2.GetTenantRequest().SerializeToString()
            # What Envoy would forward after verifying the token.
            direct_md = tuple(zip(IDENTITY_HEADERS, (tenant, "bench-user", "member", ""), strict=True))
            common = dict(request=request, concurrency=args.concurrency, duration_s=args.duration,
                          warmup_s=args.warmup, method=METHOD)
            direct = run(LoadSpec(target=settings.address("metering"), metadata=direct_md, **common),
                         args.processes)
            edge = run(LoadSpec(target=mesh.edge_address, metadata=(("authorization", f"Bearer {token}"),),
                                **common), args.processes)
        finally:
            mesh.stop()

    print(f"{METHOD}, concurrency {args.concurrency}, {args.duration:.0f}s measured, "
          f"{args.processes} load process(es), {platform.machine()} x{_cores()}")
    print(direct.row("direct to metering"))
    print(edge.row("through Envoy (JWT + RLS)"))
    ratio = edge.rps / direct.rps if direct.rps else float("nan")
    print(f"through-edge / direct throughput: {ratio:.2f}x")
    print(json.dumps({"direct": vars(direct), "edge": vars(edge), "ratio": round(ratio, 3)}))


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
