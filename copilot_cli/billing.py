"""`copilot usage [--json]` (a tenant's usage and cost this month) and
`copilot billing [show|report|reconcile] [--period P]`."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2

from copilot.v1 import metering_pb2
from copilot_cli.client import Client, CliError, operator_token, token_for
from copilot_cli.jsonout import message_dict
from servers.common.settings import Settings


def add_parsers(sub: Any) -> None:
    usage = sub.add_parser("usage", help="the tenant's usage (and cost) this month")
    usage.add_argument("--json", action="store_true", help="one JSON object (requests, tokens, cost, ...)")
    usage.add_argument("--period", help="YYYY-MM, YYYY-MM-DD or START/END (ISO 8601); default: this month")
    usage.add_argument("--tenant", required=True)
    usage.add_argument("--user", default="cli-user")
    usage.add_argument("--token", help="use this JWT instead of minting one with the dev key")

    billing = sub.add_parser("billing", help="usage cost, Stripe meter events and reconciliation")
    bsub = billing.add_subparsers(dest="billing_command", metavar="ACTION")
    show = bsub.add_parser("show", help="cost of a tenant's usage by model (the default action)")
    show.add_argument("--tenant", required=True)
    report = bsub.add_parser("report", help="send a period's usage to Stripe as meter events (operator)")
    reconcile = bsub.add_parser("reconcile", help="compare ClickHouse with Stripe for a period (operator)")
    for p in (billing, show, report, reconcile):
        p.add_argument("--period", help="YYYY-MM, YYYY-MM-DD or START/END (ISO 8601); default: this month")
        p.add_argument("--json", action="store_true")
        p.add_argument("--token", help="use this JWT instead of minting one with the dev key")
    billing.add_argument("--tenant", help="the tenant for `billing` without an action")


def period(raw: str | None, now: datetime | None = None) -> tuple[datetime, datetime]:
    """A period from the command line: a month, a day, or START/END."""
    now = now or datetime.now(UTC)
    if not raw:
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0), now
    try:
        if "/" in raw:
            start_s, _, end_s = raw.partition("/")
            start, end = (datetime.fromisoformat(s).replace(tzinfo=datetime.fromisoformat(s).tzinfo or UTC)
                          for s in (start_s, end_s))
        elif len(raw) == 7:
            start = datetime.strptime(raw, "%Y-%m").replace(tzinfo=UTC)
            end = (start + timedelta(days=32)).replace(day=1)
        else:
            start = datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=UTC)
            end = start + timedelta(days=1)
    except ValueError:
        raise CliError(f"--period {raw!r}: use YYYY-MM, YYYY-MM-DD or START/END") from None
    if start >= end:
        raise CliError("--period: the start must be before the end")
    return start, min(end, now) if start < now else end


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment.astimezone(UTC))
    return out


def _money(micros: int, currency: str) -> str:
    return f"{micros / 1_000_000:,.6f} {currency.upper()}".rstrip("0").rstrip(".") if currency else str(micros)


async def usage(args: argparse.Namespace, settings: Settings) -> int:
    client = Client.connect(token_for(settings, args.tenant, args.user, ["member"], args.token))
    start, end = period(args.period)
    try:
        got = await client.metering.GetUsage(metering_pb2.GetUsageRequest(start_time=_ts(start), end_time=_ts(end)),
                                             metadata=client.metadata, timeout=10)
    finally:
        await client.close()
    if args.json:
        print(json.dumps({
            "tenant": got.tenant_id, "requests": got.requests, "tokens": got.total_tokens,
            "input_tokens": got.input_tokens, "output_tokens": got.output_tokens, "events": got.events,
            "cost_micros": got.cost_micros, "currency": got.currency,
            "start": got.start_time.ToJsonString(), "end": got.end_time.ToJsonString(),
            "by_model": [message_dict(m) for m in got.by_model],
        }))
    else:
        print(f"tenant {got.tenant_id}: {got.requests} requests, {got.total_tokens} tokens "
              f"({got.input_tokens} in, {got.output_tokens} out), cost {_money(got.cost_micros, got.currency)} "
              f"since {got.start_time.ToJsonString()}")
    return 0


async def run(args: argparse.Namespace, settings: Settings) -> int:
    command = args.billing_command or "show"
    start, end = period(args.period)
    if command == "show":
        if not args.tenant:
            raise CliError("copilot billing: give --tenant (or an action: report, reconcile)")
        client = Client.connect(operator_token(settings, args.token))
        try:
            got = await client.metering.GetUsage(metering_pb2.GetUsageRequest(
                tenant_id=args.tenant, start_time=_ts(start), end_time=_ts(end)), metadata=client.metadata,
                timeout=10)
        finally:
            await client.close()
        if args.json:
            print(json.dumps(message_dict(got)))
            return 0
        print(f"{got.tenant_id} {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC")
        for m in got.by_model:
            print(f"  {m.model:28} {m.requests:>10} req {m.input_tokens + m.output_tokens:>12} tok "
                  f"{_money(m.cost_micros, got.currency):>18}")
        print(f"  {'total':28} {got.requests:>10} req {got.total_tokens:>12} tok "
              f"{_money(got.cost_micros, got.currency):>18}")
        return 0
    client = Client.connect(operator_token(settings, args.token))
    try:
        if command == "report":
            sent = await client.metering.ReportBilling(metering_pb2.ReportBillingRequest(
                start_time=_ts(start), end_time=_ts(end)), metadata=client.metadata, timeout=300)
            print(json.dumps(message_dict(sent)) if args.json else
                  f"sent {sent.meter_events} meter events for {sent.tenants} tenants")
            return 0
        result = await client.metering.ReconcileBilling(metering_pb2.ReconcileBillingRequest(
            start_time=_ts(start), end_time=_ts(end)), metadata=client.metadata, timeout=300)
    finally:
        await client.close()
    if args.json:
        print(json.dumps({"tenants": result.tenants, "differences": [
            message_dict(d) for d in result.differences]}))
    else:
        for d in result.differences:
            print(f"{d.tenant_id:32} {d.meter:18} clickhouse={d.clickhouse} stripe={d.stripe} "
                  f"diff={d.clickhouse - d.stripe:+d}")
        print(f"{len(result.differences)} differences across {result.tenants} tenants")
    return 1 if result.differences else 0
