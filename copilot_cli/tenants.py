"""`copilot tenants create|get|update|list|suspend|resume|delete` (platform operator)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from google.protobuf import field_mask_pb2

from copilot.v1 import common_pb2, tenant_pb2
from copilot_cli.client import Client, CliError, operator_token
from copilot_cli.jsonout import message_dict
from servers.common.settings import Settings

PLANS = {"free": common_pb2.PLAN_FREE, "pro": common_pb2.PLAN_PRO, "enterprise": common_pb2.PLAN_ENTERPRISE}
MODES = {"basic": common_pb2.RETRIEVAL_MODE_BASIC, "hybrid": common_pb2.RETRIEVAL_MODE_HYBRID,
         "decomposed": common_pb2.RETRIEVAL_MODE_DECOMPOSED, "agentic": common_pb2.RETRIEVAL_MODE_AGENTIC}
UNSUPPORTED = {"flag": tenant_pb2.UNSUPPORTED_SENTENCES_FLAG, "remove": tenant_pb2.UNSUPPORTED_SENTENCES_REMOVE,
               "refuse": tenant_pb2.UNSUPPORTED_SENTENCES_REFUSE}
# --set NAME=VALUE: the update mask path and how to read the value.
SETTABLE: dict[str, Any] = {
    "display_name": str, "plan": lambda v: PLANS[v],
    "limits.requests_per_second": int, "limits.requests_per_minute": int, "limits.requests_per_hour": int,
    "limits.tokens_per_month": int, "limits.max_documents": int,
    "config.provider": str, "config.model": str, "config.temperature": float, "config.max_tokens": int,
    "config.system_prompt": str, "config.retrieval_mode": lambda v: MODES[v], "config.top_k": int,
    "config.pii_masking": lambda v: v.lower() in {"1", "true", "yes", "on"},
    "config.agentic_tools": lambda v: v.lower() in {"1", "true", "yes", "on"},
    "config.unsupported_sentences": lambda v: UNSUPPORTED[v],
}


def add_parser(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="create, change, suspend, list and delete tenants (platform operator)")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    create = tsub.add_parser("create", help="create (onboard) a tenant")
    create.add_argument("tenant_id")
    create.add_argument("--plan", choices=sorted(PLANS), default="free")
    create.add_argument("--name", default="", help="display name")
    get = tsub.add_parser("get", help="show one tenant (JSON)")
    get.add_argument("tenant_id")
    update = tsub.add_parser("update", help="change fields: --set plan=pro --set config.top_k=8 ...")
    update.add_argument("tenant_id")
    update.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"repeatable; fields: {', '.join(SETTABLE)}")
    lst = tsub.add_parser("list", help="list tenants")
    lst.add_argument("--json", action="store_true", help="one JSON object per tenant")
    suspend = tsub.add_parser("suspend", help="suspend a tenant: its requests are refused")
    suspend.add_argument("tenant_id")
    resume = tsub.add_parser("resume", help="resume a suspended tenant")
    resume.add_argument("tenant_id")
    delete = tsub.add_parser("delete", help="delete a tenant and erase its data everywhere")
    delete.add_argument("tenant_id")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for p in (create, get, update, lst, suspend, resume, delete):
        p.add_argument("--token", help="use this JWT instead of minting an operator token")


def _changes(pairs: list[str]) -> tuple[tenant_pb2.Tenant, list[str]]:
    tenant = tenant_pb2.Tenant()
    paths: list[str] = []
    if not pairs:
        raise CliError("name at least one --set FIELD=VALUE")
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in SETTABLE:
            raise CliError(f"--set {pair!r}: use FIELD=VALUE with FIELD one of {', '.join(SETTABLE)}")
        try:
            value = SETTABLE[name](raw)
        except (ValueError, KeyError):
            raise CliError(f"--set {pair!r}: not a valid value for {name}") from None
        target: Any = tenant
        *parents, leaf = name.split(".")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
        paths.append(name)
    return tenant, paths


# `tenants list`: the header names each column; CONFIG VERSION is the tenant's config
# version, which every update bumps and the services' caches compare.
HEADER = f"{'TENANT':32} {'PLAN':11} {'STATE':10} CONFIG VERSION"


def _line(tenant: tenant_pb2.Tenant) -> str:
    plan = common_pb2.Plan.Name(tenant.plan).removeprefix("PLAN_").lower()
    state = tenant_pb2.TenantState.Name(tenant.state).removeprefix("TENANT_STATE_").lower()
    return f"{tenant.tenant_id:32} {plan:11} {state:10} {tenant.config_version}"


async def run(args: argparse.Namespace, settings: Settings) -> int:
    client = Client.connect(operator_token(settings, args.token))
    md = client.metadata
    try:
        command = args.tenants_command
        if command == "create":
            created = await client.tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
                tenant_id=args.tenant_id, display_name=args.name or args.tenant_id, plan=PLANS[args.plan]),
                metadata=md, timeout=10)
            print(f"created {created.tenant.tenant_id} on plan {args.plan}")
        elif command == "get":
            got = await client.tenants.GetTenant(tenant_pb2.GetTenantRequest(tenant_id=args.tenant_id),
                                                 metadata=md, timeout=10)
            print(json.dumps(message_dict(got.tenant), indent=2))
        elif command == "update":
            tenant, paths = _changes(args.set)
            tenant.tenant_id = args.tenant_id
            updated = await client.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
                tenant=tenant, update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=md, timeout=10)
            print(f"updated {args.tenant_id} ({', '.join(paths)}): config version {updated.tenant.config_version}")
        elif command in ("suspend", "resume"):
            # UpdateTenant of `state` (what SuspendTenant does too), which every edge routes.
            state = tenant_pb2.TENANT_STATE_SUSPENDED if command == "suspend" else tenant_pb2.TENANT_STATE_ACTIVE
            changed = await client.tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(
                tenant=tenant_pb2.Tenant(tenant_id=args.tenant_id, state=state),
                update_mask=field_mask_pb2.FieldMask(paths=["state"])), metadata=md, timeout=10)
            print(f"{'suspended' if command == 'suspend' else 'resumed'} {args.tenant_id} "
                  f"(config version {changed.tenant.config_version})")
        elif command == "delete":
            if not args.yes:
                answer = await asyncio.to_thread(
                    input, f"Delete {args.tenant_id} and erase its documents and billing customer? [y/N] ")
                if answer.strip().lower() not in {"y", "yes"}:
                    print("not deleted")
                    return 1
            await client.tenants.DeleteTenant(tenant_pb2.DeleteTenantRequest(tenant_id=args.tenant_id),
                                              metadata=md, timeout=30)
            print(f"deleted {args.tenant_id}")
        else:
            token = ""
            if not args.json:
                print(HEADER)
            while True:
                page = await client.tenants.ListTenants(tenant_pb2.ListTenantsRequest(page_token=token),
                                                        metadata=md, timeout=10)
                for tenant in page.tenants:
                    print(json.dumps(message_dict(tenant)) if args.json else _line(tenant))
                token = page.next_page_token
                if not token:
                    break
    finally:
        await client.close()
    return 0
