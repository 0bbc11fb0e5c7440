"""`copilot audit list|export|verify --tenant T`: a tenant's audit trail.

Reads need the tenant's admin role or the platform operator's: in development the CLI mints
an operator token with the dev key; --token uses yours (a tenant admin's token reads only
its own tenant).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from copilot.v1 import audit_pb2
from copilot_cli.client import Client, CliError, operator_token
from servers.common.settings import Settings

KINDS = {audit_pb2.AuditEventKind.Name(v).removeprefix("AUDIT_EVENT_KIND_").lower(): v
         for v in audit_pb2.AuditEventKind.values() if v}


def add_parser(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="list, export (JSON Lines) and verify a tenant's audit trail",
        description="A tenant's audit trail: questions (masked), cited documents, ingests and deletes, "
                    "tenant and search-setting changes, refused requests. Append-only and hash-chained.")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    lst = asub.add_parser("list", help="events, oldest first, one line each (or --json: one JSON object each)")
    lst.add_argument("--page-size", type=int, default=100, help="events per request (1..1000, default 100)")
    lst.add_argument("--limit", type=int, default=0, help="stop after this many events (default: all)")
    lst.add_argument("--json", action="store_true", help="one JSON object per event")
    export = asub.add_parser("export", help="every matching event as JSON Lines, to stdout or --output")
    export.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")
    verify = asub.add_parser("verify", help="recompute the hash chain; exit 1 and name the first break if broken")
    verify.add_argument("--json", action="store_true", help="the result as one JSON object")
    verify.add_argument("--expect-head", metavar="SEQ:HASH", type=_head,
                        help="a head an earlier verify printed (kept somewhere else): broken if the chain no "
                             "longer holds that event with that hash")
    for p in (lst, export, verify):
        p.add_argument("--tenant", required=True, help="the tenant whose trail to read")
        p.add_argument("--token", help="use this JWT instead of minting an operator token")
    for p in (lst, export):
        p.add_argument("--since", help="ISO 8601 time (UTC unless it says otherwise): events at or after it")
        p.add_argument("--until", help="ISO 8601 time: events before it")
        p.add_argument("--user", default="", help="only this actor's events (the token subject)")
        p.add_argument("--kind", action="append", default=[], choices=sorted(KINDS),
                       help="only this kind (repeatable)")


def _head(raw: str) -> audit_pb2.AuditChainHead:
    seq, _, digest = raw.strip().partition(":")
    digest = digest.lower()
    if not seq.isdigit() or int(seq) < 1 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError(f"{raw!r}: expected SEQ:HASH as verify prints it (e.g. 42:9f86d0…, "
                                         "a 64-character SHA-256)")
    return audit_pb2.AuditChainHead(seq=int(seq), hash=digest)


def _time(raw: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise CliError(f"--{name} {raw!r}: not an ISO 8601 time (e.g. 2026-11-27 or 2026-11-27T10:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _filter(args: argparse.Namespace) -> audit_pb2.AuditFilter:
    # (protoc's stubs type AuditEventKind.values() as plain ints, not the enum the field takes)
    f = audit_pb2.AuditFilter(actor=args.user, kinds=[KINDS[k] for k in args.kind])  # type: ignore[misc]
    if args.since:
        f.start_time.FromDatetime(_time(args.since, "since"))
    if args.until:
        f.end_time.FromDatetime(_time(args.until, "until"))
    return f


def event_json(event: audit_pb2.AuditEvent) -> str:
    return json.dumps(json_format.MessageToDict(event, preserving_proto_field_name=True), ensure_ascii=False,
                      separators=(",", ":"))


def _line(event: audit_pb2.AuditEvent) -> str:
    kind = audit_pb2.AuditEventKind.Name(event.kind).removeprefix("AUDIT_EVENT_KIND_").lower()
    when = event.occur_time.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
    what = ""
    if event.HasField("question"):
        docs = sorted({c.document_id for c in event.question.citations})
        what = f"{event.question.question[:60]!r} → {', '.join(docs) or 'no citations'}"
    elif event.HasField("documents"):
        what = ", ".join(d.document_id for d in event.documents.documents[:5])
    elif event.HasField("tenant_change"):
        what = ", ".join(event.tenant_change.changed_fields)
    elif event.HasField("refusal"):
        what = f"{event.refusal.rpc} {event.refusal.code} {event.refusal.reason}"
    return f"{event.seq:>6} {when} {kind:19} {event.actor:24} {what}"


async def run(args: argparse.Namespace, settings: Settings) -> int:
    client = Client.connect(operator_token(settings, args.token))
    stub = client.audit
    md = client.metadata
    try:
        if args.audit_command == "verify":
            request = audit_pb2.VerifyAuditChainRequest(tenant_id=args.tenant)
            if args.expect_head is not None:
                request.expected_head.CopyFrom(args.expect_head)
            result = await stub.VerifyAuditChain(request, metadata=md, timeout=300)
            head = f"{result.last_seq}:{result.head_hash}" if result.head_hash else "-"
            if args.json:
                print(json.dumps(json_format.MessageToDict(result, preserving_proto_field_name=True)))
            elif result.ok:
                print(f"{args.tenant}: chain intact, {result.events_checked} events "
                      f"(seq {result.first_seq}..{result.last_seq}), head {head}")
                # The witness: kept outside the platform, it catches a later rewrite or truncation
                # even of the store's own anchor.
                if result.head_hash:
                    print(f"keep the head to check later: copilot audit verify --tenant {args.tenant} "
                          f"--expect-head {head}")
            else:
                problem = audit_pb2.AuditChainProblem.Name(result.first_break.problem).removeprefix(
                    "AUDIT_CHAIN_PROBLEM_").lower()
                print(f"{args.tenant}: chain BROKEN at seq {result.first_break.seq} ({problem}): "
                      f"{result.first_break.detail}")
                print(f"walked {result.events_checked} events, to head {head}")
            return 0 if result.ok else 1
        request_filter = _filter(args)
        if args.audit_command == "export":
            # The CLI runs one call at a time: a local file write blocks nothing else.
            out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115, ASYNC230
            count = 0
            try:
                call = stub.ExportAuditEvents(audit_pb2.ExportAuditEventsRequest(
                    tenant_id=args.tenant, filter=request_filter), metadata=md, timeout=600)
                async for batch in call:
                    for event in batch.events:
                        out.write(event_json(event) + "\n")
                        count += 1
            finally:
                if args.output:
                    out.close()
            if args.output:
                print(f"exported {count} events to {args.output}", file=sys.stderr)
            return 0
        if not 1 <= args.page_size <= 1000:
            raise CliError("--page-size must be between 1 and 1000")
        token, shown = "", 0
        while True:
            page = await stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(
                tenant_id=args.tenant, filter=request_filter, page_size=args.page_size, page_token=token),
                metadata=md, timeout=30)
            for event in page.events:
                print(event_json(event) if args.json else _line(event))
                shown += 1
                if args.limit and shown >= args.limit:
                    return 0
            token = page.next_page_token
            if not token:
                return 0
    finally:
        await client.close()
