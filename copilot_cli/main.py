"""`copilot`: run the mesh and use it from the command line.

Every command except `up` and `token` talks to the edge (COPILOT_EDGE, default
localhost:8080) with a JWT: in development the CLI mints one with the dev key in the
data directory; --token uses yours instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from copilot.v1 import common_pb2, generation_pb2, retrieval_pb2
from copilot_cli import audit as audit_cli
from copilot_cli import billing as billing_cli
from copilot_cli import documents, eval_answers
from copilot_cli import eval as eval_command
from copilot_cli import tenants as tenants_cli
from copilot_cli.client import Client, CliError, edge_address, token_for
from copilot_cli.jsonout import message_dict
from servers.common.errors import from_rpc_error
from servers.common.settings import Settings, SettingsError

PLANS = {"free": common_pb2.PLAN_FREE, "pro": common_pb2.PLAN_PRO, "enterprise": common_pb2.PLAN_ENTERPRISE}

FRIENDLY = {
    grpc.StatusCode.UNAUTHENTICATED: "not signed in or token rejected",
    grpc.StatusCode.PERMISSION_DENIED: "not allowed",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate limit or quota reached",
    grpc.StatusCode.UNAVAILABLE: "the mesh is not reachable (is `copilot up` running?)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timed out",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copilot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Envoy and the four services on loopback (Ctrl-C stops them)")
    up.add_argument("--no-demo", action="store_true", help="do not create the demo tenants and corpus")
    up.add_argument("--replicas", type=int, default=None, metavar="N",
                    help="processes each of retrieval, generation, metering (one active, the others standing by) "
                         "and the edge companion (default: COPILOT_REPLICAS, 1); above 1 without REDIS_URL a "
                         "local redis-server is started (docs/scale-out.md)")

    tok = sub.add_parser("token", help="print a JWT signed with the dev key")
    tok.add_argument("--tenant", required=True)
    tok.add_argument("--user", required=True)
    tok.add_argument("--roles", default="member", help="comma-separated, e.g. member,admin (default: member)")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default: 3600)")
    tok.add_argument("--groups", default="", help="comma-separated groups (the groups claim), e.g. hr,legal: "
                                                  "which access-labelled documents the holder may read")

    tenants_cli.add_parser(sub)

    ingest = sub.add_parser("ingest", help="ingest .txt/.md/.pdf files, folders of them, or a BEIR corpus.jsonl")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument("--batch", type=int, default=64, help="documents per batch (default: 64)")
    ingest.add_argument("--access", default="", metavar="LABELS",
                        help="who may read the documents, e.g. group:hr,user:alice, for those that name no "
                             "access of their own (front matter `access:`, BEIR metadata `_access`); "
                             "default: the whole tenant")

    access = sub.add_parser("access", help="set who may read documents (admin; no re-embedding)")
    access.add_argument("document_ids", nargs="+", metavar="DOCUMENT_ID")
    access.add_argument("--labels", required=True,
                        help="comma-separated group:NAME / user:SUBJECT; an empty string: the whole tenant")

    ask = sub.add_parser("ask", help="ask a question; the answer streams, then its citations")
    ask.add_argument("question")
    ask.add_argument("--top-k", type=int, default=0)
    ask.add_argument("--json", action="store_true", help="print the whole response as one JSON object")

    search = sub.add_parser("search", help="search the tenant's documents")
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--json", action="store_true", help="print the whole response as one JSON object")

    billing_cli.add_parsers(sub)
    audit_cli.add_parser(sub)

    sub.add_parser("status", help="health of every service through the edge")
    eval_command.add_parser(sub)
    eval_answers.add_parser(sub)

    for p in (ingest, ask, search, access):
        p.add_argument("--tenant", required=True)
        p.add_argument("--user", default="cli-user")
        p.add_argument("--token", help="use this JWT instead of minting one with the dev key")
    for p in (ask, search):
        p.add_argument("--groups", default="", help="comma-separated groups of the minted token (dev key)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    try:
        if args.command == "up":
            from copilot_cli.up import up

            if args.replicas is not None:
                try:
                    settings = replace(settings, replicas=args.replicas)
                except SettingsError as exc:
                    print(f"copilot up: {exc}", file=sys.stderr)
                    return 2
            return up(settings, demo_data=not args.no_demo)
        if args.command == "token":
            print(token_for(settings, args.tenant, args.user, _roles(args.roles), ttl_s=args.ttl,
                            groups=documents.access_labels(args.groups)))
            return 0
        command: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]] = COMMANDS[args.command]
        return asyncio.run(command(args, settings))
    except CliError as exc:
        print(f"copilot: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code, message, _ = from_rpc_error(exc)
        hint = FRIENDLY.get(code)
        print(f"copilot: {code.name}: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
        return 1
    except documents.DocumentError as exc:
        print(f"copilot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _roles(raw: str) -> list[str]:
    roles = [r.strip() for r in raw.split(",") if r.strip()]
    if not roles:
        raise CliError("--roles needs at least one role")
    return roles


def _client(args: argparse.Namespace, settings: Settings, roles: list[str]) -> Client:
    groups = documents.access_labels(getattr(args, "groups", ""))
    return Client.connect(token_for(settings, args.tenant, args.user, roles, args.token, groups=groups))


async def ingest_paths(client: Client, paths: list[Path], batch: int, progress: bool = True,
                       access: list[str] | None = None) -> dict[str, int]:
    """Streams documents in batches; returns counts by status."""
    from tqdm import tqdm

    if not 1 <= batch <= 1000:
        raise CliError("--batch must be between 1 and 1000")
    files = documents.expand(paths)
    if not files:
        raise CliError(f"no {documents.SUPPORTED} files found in the given paths")
    total = documents.count(files)
    root = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
    counts: dict[str, int] = {}
    bar = tqdm(total=total, unit="doc", disable=not progress, file=sys.stderr, desc="ingest")

    async def batches() -> AsyncIterator[retrieval_pb2.StreamIngestDocumentsRequest]:
        chunk: list[retrieval_pb2.Document] = []
        for doc in documents.read(files, root):
            if access and not doc.access:
                doc.access.extend(access)
            chunk.append(doc)
            if len(chunk) >= batch:
                yield retrieval_pb2.StreamIngestDocumentsRequest(documents=chunk)
                chunk = []
        if chunk:
            yield retrieval_pb2.StreamIngestDocumentsRequest(documents=chunk)

    try:
        call = client.retrieval.StreamIngestDocuments(batches(), metadata=client.metadata)
        async for ack in call:
            for result in ack.results:
                name = retrieval_pb2.IngestStatus.Name(result.status).removeprefix("INGEST_STATUS_").lower()
                counts[name] = counts.get(name, 0) + 1
            bar.update(len(ack.results))
    finally:
        bar.close()
    return counts


async def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings, ["member", "admin"])
    try:
        counts = await ingest_paths(client, args.paths, args.batch, access=documents.access_labels(args.access))
    finally:
        await client.close()
    print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing ingested")
    return 0


async def _access(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings, ["member", "admin"])
    labels = documents.access_labels(args.labels)
    try:
        response = await client.retrieval.SetDocumentAccess(retrieval_pb2.SetDocumentAccessRequest(documents=[
            retrieval_pb2.DocumentAccess(document_id=d, access=labels) for d in args.document_ids]),
            metadata=client.metadata, timeout=30)
    finally:
        await client.close()
    print(f"{response.updated} updated, {response.unchanged} unchanged"
          + (f", not found: {', '.join(response.not_found)}" if response.not_found else ""))
    return 0 if not response.not_found else 1


async def _ask(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings, ["member"])
    try:
        request = generation_pb2.StreamAnswerRequest(question=args.question, top_k=args.top_k)
        text: list[str] = []
        details = None
        async for event in client.generation.StreamAnswer(request, metadata=client.metadata, timeout=60):
            if event.HasField("details"):
                details = event.details
            else:
                text.append(event.delta)
                if not args.json:
                    print(event.delta, end="", flush=True)
    finally:
        await client.close()
    if args.json:
        body = {"answer": "".join(text), **(message_dict(details) if details is not None else {})}
        print(json.dumps(body))
        return 0
    print()
    if details is not None:
        if details.citations:
            print("\nSources:")
        for c in details.citations:
            readers = f"; readable by {', '.join(c.access)}" if c.access else ""
            print(f"  [{c.index}] {_where(c.title, c.section)} ({c.document_id}{readers})")
            for span in details.spans:
                if span.citation_index == c.index:
                    print(f"      {_span_line(span)}")
        _print_verdict("".join(text), details)
        if details.pii_masks:
            # Say what left the machine masked, so the user knows why the answer may not
            # mention a detail they typed.
            masked = ", ".join(m.placeholder for m in details.pii_masks)
            print(f"\nmasked before retrieval and the model: {masked}")
        if details.degraded:
            print(f"\nnote: {details.degraded_reason}")
    return 0


def _span_line(span: generation_pb2.CitedSpan) -> str:
    """The quoted span, where it is in the document, and how it was matched."""
    quoted = " ".join(span.text.split())
    if len(quoted) > 300:
        quoted = quoted[:297] + "..."
    where = f"chars {span.start}-{span.end}" if span.end > span.start else "no offsets (re-ingest the document)"
    how = {generation_pb2.SPAN_ORIGIN_EXTRACTED: "extracted", generation_pb2.SPAN_ORIGIN_INFERRED: "nearest sentence"}
    quality = how.get(span.origin) or ("exact quote" if span.match_quality >= 1 else
                                        f"quote matched {span.match_quality:.0%}")
    return f"\u201c{quoted}\u201d  ({where}; {quality})"


def _print_verdict(answer: str, details: generation_pb2.AnswerDetails) -> None:
    verdict = details.groundedness
    if not details.sentences:
        return
    total = len(details.sentences)
    print(f"\nGroundedness {verdict.score:.2f}: {total - verdict.unsupported_sentences} of {total} "
          f"sentences supported by their citations")
    for s in details.sentences:
        if s.supported:
            continue
        what = "removed" if s.removed else "unsupported"
        shown = f": \u201c{answer[s.start:s.end]}\u201d" if s.end > s.start else ""
        print(f"  {what} (support {s.support:.2f}){shown} - {'; '.join(s.issues)}")
    if verdict.refused:
        print("  the answer was refused: the tenant refuses answers with unsupported sentences")
    if verdict.unmatched_quotes:
        print(f"  {verdict.unmatched_quotes} quote(s) of the model not found in their sources (dropped)")


async def _search(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings, ["member"])
    try:
        response = await client.retrieval.Search(
            retrieval_pb2.SearchRequest(query=args.query, top_k=args.top_k), metadata=client.metadata, timeout=10)
    finally:
        await client.close()
    if args.json:
        print(json.dumps(message_dict(response)))
        return 0
    for i, hit in enumerate(response.hits, start=1):
        print(f"{i:2}. {hit.score:7.3f}  {_where(hit.title, hit.section)}  ({hit.document_id})")
        print(f"    {' '.join(hit.text.split())[:160]}")
    return 0


def _where(title: str, section: str) -> str:
    # Retrieval already leaves the title out of the section (see section_below_title).
    return " › ".join(filter(None, [title, section]))


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.aio.insecure_channel(edge_address())
    stub = health_pb2_grpc.HealthStub(channel)
    worst = 0
    not_serving: list[str] = []
    try:
        for name in ("", "copilot.v1.RetrievalService", "copilot.v1.GenerationService",
                     "copilot.v1.MeteringService", "copilot.v1.TenantService", "copilot.v1.AuditService"):
            try:
                status = (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=3)).status
                label = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.aio.AioRpcError as exc:
                label = f"{exc.code().name}"
                status = 0
            if status != health_pb2.HealthCheckResponse.SERVING:
                worst = 1
                not_serving.append(name)
            print(f"{name or 'edge':32} {label}")
    finally:
        await channel.close(None)
    if not_serving == [""]:
        # Every service answers, the mesh as a whole does not yet: `copilot up` is still
        # provisioning the demo tenants (scripts should wait for this command to exit 0).
        print("the mesh is still starting (demo tenants not provisioned yet)")
    return worst


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]] = {
    "tenants": tenants_cli.run, "ingest": _ingest, "ask": _ask, "search": _search, "usage": billing_cli.usage,
    "billing": billing_cli.run, "status": _status, "audit": audit_cli.run,
    "eval": eval_command.run, "access": _access, "eval-answers": eval_answers.run,
}

if __name__ == "__main__":
    sys.exit(main())
