"""`make bench-fuzz`: hostile input through the real edge, for much longer than the suite does.

Every RPC of `copilot.v1` (enumerated from the generated descriptors, so a new RPC is fuzzed
without changing this file) gets generated and mutated messages through Envoy: random bytes,
runs of 0xff, valid messages cut short, valid messages with bits flipped, well-formed
messages with extreme field values (odd unicode, huge and negative numbers, unknown enum
numbers, NaN, long repeated fields) and plausible ones (that get past validation into the
services), sent as raw bytes with tokens of each role and with none.
Each answer must be a documented status (`allowed_codes`), never UNKNOWN or INTERNAL; bytes
that are not a valid request must get INVALID_ARGUMENT "request is not a valid <type>"; no
service may log at error level meanwhile; and afterwards a tenant the fuzz never touched
still gets the right Search hit and Answer. tests/integration/test_hostile_input.py runs the
same checks with a few examples per RPC; this command runs many more on a mesh of its own:

  python -m bench.fuzz [--examples 2000] [--seconds 600]
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, field_mask_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import copilot.v1
from copilot.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from servers.common import identity
from servers.common.errors import from_rpc_error
from servers.edge.roles import allowed_roles

PACKAGE = "copilot.v1"
# A token of each role, and none (None). `service` is the platform's service accounts: with
# it the service-to-service RPCs get past the edge too (they act on the token's tenant only).
ROLES: tuple[str | None, ...] = (None, identity.MEMBER, identity.ADMIN, identity.INGEST, identity.OPERATOR,
                                 identity.SERVICE)
CALL_TIMEOUT_S = 15.0
# Server streams that never end on their own (a watch): read a little, then hang up.
OPEN_ENDED = frozenset({"/copilot.v1.TenantService/WatchTenants"})
OPEN_ENDED_WAIT_S = 1.0
MAX_STREAM_MESSAGES = 50
# Sizes stay well inside the edge's message limits: this is about content, not volume.
MAX_STRING = 64
LONG_STRING = 4096
MAX_REPEATED = 4
LONG_REPEATED = 64
MAX_DEPTH = 4

# What any authenticated call that reaches a service may answer: the project's error model
# (servers/common/errors.py) plus the edge's rate limit (RESOURCE_EXHAUSTED).
SERVICE_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
})
# UNAVAILABLE is documented only with these reasons (ErrorInfo), for the RPCs that give them:
# billing off (no STRIPE_API_KEY) in a mesh without Stripe.
DOCUMENTED_UNAVAILABLE = {
    "/copilot.v1.MeteringService/ReportBilling": "BILLING_DISABLED",
    "/copilot.v1.MeteringService/ReconcileBilling": "BILLING_DISABLED",
}
# Words that mean the implementation leaked into a status message.
LEAKS = ("Traceback", "DecodeError", "Unexpected <class", "Exception calling application", "File \"")
# Operator RPCs that act on a tenant the request names: the fuzz confines them to its own
# victim tenant, so it never deletes, suspends or rewrites a tenant other tests rely on.
TENANT_TARGETS = {
    "/copilot.v1.TenantService/CreateTenant": ("tenant_id",),
    "/copilot.v1.TenantService/UpdateTenant": ("tenant", "tenant_id"),
    "/copilot.v1.TenantService/DeleteTenant": ("tenant_id",),
    "/copilot.v1.TenantService/SuspendTenant": ("tenant_id",),
}


# --- The contract ------------------------------------------------------------------------

@dataclass(frozen=True)
class Rpc:
    path: str
    request: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def kind(self) -> str:
        return f"{'stream' if self.client_streaming else 'unary'}_{'stream' if self.server_streaming else 'unary'}"

    def decodes(self, raw: bytes) -> bool:
        try:
            message_factory.GetMessageClass(self.request).FromString(raw)
        except Exception:
            return False
        return True


def copilot_rpcs() -> list[Rpc]:
    """Every RPC of every service in `copilot.v1`, from the generated descriptors."""
    for module in pkgutil.iter_modules(copilot.v1.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"{PACKAGE}.{module.name}")
    pool = descriptor_pool.Default()
    rpcs = []
    for module in pkgutil.iter_modules(copilot.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        file = pool.FindFileByName(f"copilot/v1/{module.name.removesuffix('_pb2')}.proto")
        for service in file.services_by_name.values():
            for method in service.methods:
                rpcs.append(Rpc(f"/{service.full_name}/{method.name}", method.input_type,
                                method.client_streaming, method.server_streaming))
    return sorted(rpcs, key=lambda r: r.path)


# --- Payloads ----------------------------------------------------------------------------

ODD_STRINGS = (
    "", " ", "\x00", "\x00\x01\x02", "\u202eevil", "a\u200bb", "\ufeff", "\U0010ffff", "\ud7ff", "🙂" * 16,
    "Ω≈ç√∫", "../../etc/passwd", "%s%n%x", "'; DROP TABLE tenants; --", "{{7*7}}", "<script>", "\r\nX-Evil: 1",
    "A" * LONG_STRING, "é" * 1000, "tenant-" + "x" * 70,
)
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({lo, hi, 0, 1, min(max(-1, lo), hi), hi // 2 + 1, lo // 2})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -1000), min(hi, 1000)))


PLAIN_WORDS = st.from_regex(r"[a-z][a-z0-9 -]{2,30}[a-z0-9]", fullmatch=True)


def _plausible(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values a well-behaved client might send: they get past validation, into the services."""
    if f.type in INT_RANGES:
        return st.integers(0, 100)
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(0, 1, width=32)
    if f.type == FieldDescriptor.TYPE_STRING:
        return PLAIN_WORDS
    if f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
        return st.sampled_from([v.number for v in f.enum_type.values])
    return _scalar(f)


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type in INT_RANGES:
        return _ints(*INT_RANGES[f.type])
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if f.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if f.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=MAX_STRING), st.sampled_from(ODD_STRINGS),
                         st.text(st.characters(codec="utf-8", categories=("Cc", "Cf", "Co", "Zs", "Mn")),
                                 max_size=MAX_STRING))
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=MAX_STRING)
    if f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
        known = [v.number for v in f.enum_type.values]
        # Open enums (proto3): numbers the contract does not name arrive as they are.
        return st.one_of(st.sampled_from(known), _ints(-2**31, 2**31 - 1))
    raise ValueError(f"no strategy for field type {f.type} ({f.full_name})")


def messages(descriptor: Descriptor, depth: int = MAX_DEPTH, *, plausible: bool = False) -> st.SearchStrategy[Message]:
    """Well-formed messages of `descriptor`'s type, nested `depth` deep, with any field values
    (or, `plausible`, with small numbers, known enum values and plain words)."""
    cls = message_factory.GetMessageClass(descriptor)
    scalar = _plausible if plausible else _scalar

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for f in descriptor.fields:
            if f.message_type is not None and depth <= 0:
                continue
            if not draw(st.booleans()):
                continue
            many = LONG_REPEATED if draw(st.integers(0, 9)) == 0 else MAX_REPEATED
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                target = getattr(message, f.name)
                for key in draw(st.lists(scalar(key_f), max_size=many)):
                    if value_f.message_type is not None:
                        target[key].CopyFrom(draw(messages(value_f.message_type, depth - 1, plausible=plausible)))
                    else:
                        target[key] = draw(scalar(value_f))
            elif f.message_type is not None:
                sub = messages(f.message_type, depth - 1, plausible=plausible)
                if f.is_repeated:
                    getattr(message, f.name).extend(draw(st.lists(sub, max_size=min(many, MAX_REPEATED))))
                else:
                    getattr(message, f.name).CopyFrom(draw(sub))
            elif f.is_repeated:
                getattr(message, f.name).extend(draw(st.lists(scalar(f), max_size=many)))
            else:
                setattr(message, f.name, draw(scalar(f)))
        return message

    return build()


@dataclass(frozen=True)
class Payload:
    kind: str
    frames: tuple[bytes, ...]


def _flip(raw: bytes, bits: Sequence[int]) -> bytes:
    out = bytearray(raw)
    for bit in bits:
        out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def _frame(draw: st.DrawFn, rpc: Rpc) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(("random", "0xff", "truncated", "bit-flipped", "extreme", "plausible")))
    if kind == "plausible":
        return kind, draw(messages(rpc.request, plausible=True)).SerializeToString()
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=512))
    if kind == "0xff":
        return kind, b"\xff" * draw(st.integers(1, 64))
    valid = draw(messages(rpc.request)).SerializeToString()
    if kind == "truncated" and len(valid) > 1:
        return kind, valid[:draw(st.integers(1, len(valid) - 1))]
    if kind == "bit-flipped" and valid:
        return kind, _flip(valid, draw(st.lists(st.integers(0, 8 * len(valid) - 1), min_size=1, max_size=8)))
    return "extreme", valid


@st.composite
def payloads(draw: st.DrawFn, rpc: Rpc) -> Payload:
    """One request (or, for a client stream, one to three messages) of mixed hostility."""
    frames = draw(st.lists(_frame(rpc), min_size=1, max_size=3 if rpc.client_streaming else 1))
    kinds = sorted({k for k, _ in frames})
    return Payload("+".join(kinds), tuple(f for _, f in frames))


# --- Calls and their judgement -----------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    message: str
    reason: str
    responses: int


def call(channel: grpc.Channel, rpc: Rpc, frames: Sequence[bytes], metadata: Sequence[tuple[str, str]]) -> Outcome:
    """One call with the bytes sent as they are (no serializer) and the answers counted, not decoded."""
    responses = 0
    md = tuple(metadata)
    open_ended = rpc.path in OPEN_ENDED
    timeout = OPEN_ENDED_WAIT_S * 3 if open_ended else CALL_TIMEOUT_S
    try:
        if rpc.kind == "unary_unary":
            channel.unary_unary(rpc.path, None, None)(frames[0], metadata=md, timeout=timeout)
            responses = 1
        elif rpc.kind == "stream_unary":
            channel.stream_unary(rpc.path, None, None)(iter(frames), metadata=md, timeout=timeout)
            responses = 1
        else:
            if rpc.kind == "unary_stream":
                stream: Any = channel.unary_stream(rpc.path, None, None)(frames[0], metadata=md, timeout=timeout)
            else:
                stream = channel.stream_stream(rpc.path, None, None)(iter(frames), metadata=md, timeout=timeout)
            hang_up = time.monotonic() + OPEN_ENDED_WAIT_S if open_ended else float("inf")
            try:
                for _ in stream:
                    responses += 1
                    if responses >= MAX_STREAM_MESSAGES or time.monotonic() > hang_up:
                        break
            finally:
                stream.cancel()  # no-op once the stream ended; hangs up on a watch
    except grpc.RpcError as exc:
        code, message, details = from_rpc_error(exc)
        if code == grpc.StatusCode.CANCELLED and responses:
            return Outcome(grpc.StatusCode.OK, "", "", responses)  # we hung up after reading
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and open_ended:
            return Outcome(grpc.StatusCode.OK, "", "", responses)  # a quiet watch: nothing changed
        reason = next((d.reason for d in details if hasattr(d, "reason")), "")
        return Outcome(code, message, reason, responses)
    return Outcome(grpc.StatusCode.OK, "", "", responses)


def allowed_codes(rpc: Rpc, role: str | None) -> frozenset[grpc.StatusCode]:
    """The statuses the contract documents for this RPC called with this role."""
    if role is None:
        return frozenset({grpc.StatusCode.UNAUTHENTICATED})  # the edge's jwt_authn
    roles = allowed_roles(rpc.path) or frozenset()
    if role not in roles:
        return frozenset({grpc.StatusCode.PERMISSION_DENIED})  # the edge's RBAC
    return SERVICE_CODES | ({grpc.StatusCode.UNAVAILABLE} if rpc.path in DOCUMENTED_UNAVAILABLE else frozenset())


def violations(rpc: Rpc, role: str | None, frames: Sequence[bytes], outcome: Outcome) -> list[str]:
    """What is wrong with this answer (nothing when it is one the contract documents)."""
    found = []
    allowed = allowed_codes(rpc, role)
    if outcome.code not in allowed:
        found.append(f"{outcome.code.name} not in {sorted(c.name for c in allowed)}")
    elif outcome.code == grpc.StatusCode.UNAVAILABLE and outcome.reason != DOCUMENTED_UNAVAILABLE.get(rpc.path):
        found.append(f"UNAVAILABLE with reason {outcome.reason!r}")
    if any(word in outcome.message for word in LEAKS):
        found.append("the status message leaks the implementation")
    # A request that is not a valid message is refused as such (unless the edge refused first);
    # in a client stream, only when the first message is the bad one (later ones may be
    # refused for what an earlier one said).
    if role is not None and role in (allowed_roles(rpc.path) or ()) and not rpc.decodes(frames[0]) \
            and outcome.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        expected = f"request is not a valid {rpc.request.full_name}"
        if (outcome.code, outcome.message) != (grpc.StatusCode.INVALID_ARGUMENT, expected):
            found.append(f"undecodable request got {outcome.code.name} {outcome.message!r}, not INVALID_ARGUMENT "
                         f"{expected!r}")
    sent = " | ".join(f[:48].hex() + ("..." if len(f) > 48 else "") for f in frames)
    return [f"{rpc.path} as {role or 'no token'}: {v}: {outcome.message[:200]!r} (sent {sent})" for v in found]


# --- Tenants of its own, and a witness -----------------------------------------------------

WITNESS_DOC = retrieval_pb2.Document(
    document_id="witness-retention", title="Record retention", content_type="text/markdown",
    text="# Record retention\n\n## 1. Audit logs\n\nAudit logs are kept for seven years in the archive vault. "
         "Access to the vault needs two approvals.\n")
WITNESS_QUESTION = "How long are audit logs kept?"

Mint = Callable[[str, Sequence[str]], str]


@dataclass
class FuzzTarget:
    """The edge, a way to mint tokens, and the fuzz's own tenants: `home` (every token's tenant),
    `victim` (where tenant-naming operator RPCs are sent) and `witness` (never fuzzed)."""

    edge: str
    mint: Mint
    home: str
    victim: str
    witness: str
    channel: grpc.Channel = field(init=False)
    _tokens: dict[str | None, tuple[tuple[str, str], ...]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.edge)

    def close(self) -> None:
        self.channel.close()

    def metadata(self, role: str | None) -> tuple[tuple[str, str], ...]:
        if role is None:
            return ()
        if role not in self._tokens:
            self._tokens[role] = (("authorization", f"Bearer {self.mint(self.home, (role,))}"),)
        return self._tokens[role]

    def confine(self, rpc: Rpc, role: str | None, frames: Sequence[bytes]) -> tuple[bytes, ...]:
        """`frames`, with a tenant an operator RPC names moved to the victim unless it is already
        the victim or not a valid tenant id (so it is refused before touching anything)."""
        path = TENANT_TARGETS.get(rpc.path)
        if path is None or role != identity.OPERATOR or not rpc.decodes(frames[0]):
            return tuple(frames)
        request = message_factory.GetMessageClass(rpc.request).FromString(frames[0])
        holder: Any = request
        for name in path[:-1]:
            holder = getattr(holder, name)
        named = getattr(holder, path[-1])
        if named != self.victim and identity.TENANT_ID_RE.match(named):
            setattr(holder, path[-1], self.victim)
        return (request.SerializeToString(), *frames[1:])

    def check(self, rpc: Rpc, role: str | None, payload: Payload) -> tuple[Outcome, list[str]]:
        frames = self.confine(rpc, role, payload.frames)
        outcome = call(self.channel, rpc, frames, self.metadata(role))
        return outcome, violations(rpc, role, frames, outcome)


def operator_metadata(mint: Mint) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint(identity.PLATFORM_TENANT, (identity.OPERATOR,))}"),)


def create_tenant(channel: grpc.Channel, mint: Mint, tenant_id: str) -> None:
    """An enterprise tenant with rate limits above anything the fuzz sends: its calls reach the
    services instead of the edge's limiter."""
    operator = operator_metadata(mint)
    tenants = tenant_pb2_grpc.TenantServiceStub(channel)
    created = tenants.CreateTenant(tenant_pb2.CreateTenantRequest(
        tenant_id=tenant_id, display_name=tenant_id, plan=common_pb2.PLAN_ENTERPRISE),
        metadata=operator, timeout=15).tenant
    created.limits.requests_per_second = 100_000
    created.limits.requests_per_minute = 6_000_000
    created.limits.requests_per_hour = 360_000_000
    tenants.UpdateTenant(tenant_pb2.UpdateTenantRequest(tenant=created, update_mask=field_mask_pb2.FieldMask(
        paths=["limits.requests_per_second", "limits.requests_per_minute", "limits.requests_per_hour"])),
        metadata=operator, timeout=15)


def prepare(edge: str, mint: Mint, prefix: str = "fuzz") -> FuzzTarget:
    """Creates the fuzz's tenants and the witness's document (the edge learns the new tenants'
    limits within its tenant cache TTL)."""
    suffix = uuid.uuid4().hex[:8]
    target = FuzzTarget(edge, mint, f"{prefix}-home-{suffix}", f"{prefix}-victim-{suffix}",
                        f"{prefix}-witness-{suffix}")
    for tenant_id in (target.home, target.victim, target.witness):
        create_tenant(target.channel, mint, tenant_id)
    retrieval_pb2_grpc.RetrievalServiceStub(target.channel).IngestDocuments(
        retrieval_pb2.IngestDocumentsRequest(documents=[WITNESS_DOC]),
        metadata=(("authorization", f"Bearer {mint(target.witness, (identity.ADMIN,))}"),), timeout=30)
    return target


def witness_problems(target: FuzzTarget) -> list[str]:
    """What is wrong with the witness tenant's normal Search and Answer (nothing: the mesh serves)."""
    metadata = (("authorization", f"Bearer {target.mint(target.witness, (identity.MEMBER,))}"),)
    problems = []
    try:
        hits = retrieval_pb2_grpc.RetrievalServiceStub(target.channel).Search(
            retrieval_pb2.SearchRequest(query="audit logs retention years", top_k=3), metadata=metadata,
            timeout=30).hits
        if not hits or hits[0].document_id != WITNESS_DOC.document_id:
            problems.append(f"Search: top hit {[h.document_id for h in hits]}, not {WITNESS_DOC.document_id}")
        answer = generation_pb2_grpc.GenerationServiceStub(target.channel).Answer(
            generation_pb2.AnswerRequest(question=WITNESS_QUESTION), metadata=metadata, timeout=60)
        if "seven years" not in answer.answer:
            problems.append(f"Answer: {answer.answer[:200]!r} does not say 'seven years'")
        if WITNESS_DOC.document_id not in {c.document_id for c in answer.details.citations}:
            problems.append("Answer: the witness document is not cited")
    except grpc.RpcError as exc:
        code, message, _ = from_rpc_error(exc)
        problems.append(f"{code.name}: {message}")
    return problems


# --- Logs ----------------------------------------------------------------------------------

LOGGED_SERVICES = ("retrieval", "generation", "metering", "edge")


class LogWatch:
    """Error-level lines and tracebacks the services write from now on (their JSON logs)."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._offsets = {name: self._size(name) for name in LOGGED_SERVICES}

    def _size(self, name: str) -> int:
        path = self._log_dir / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def problems(self) -> list[str]:
        found = []
        for name, offset in self._offsets.items():
            path = self._log_dir / f"{name}.log"
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(offset)
                new = f.read().decode(errors="replace")
            for line in new.splitlines():
                try:
                    level = str(json.loads(line).get("level", ""))
                except ValueError:
                    level = ""
                if level in ("error", "critical") or "Traceback" in line:
                    found.append(f"{name}: {line[:300]}")
        return found

    def malformed_lines(self) -> int:
        return sum(1 for name, offset in self._offsets.items()
                   if (self._log_dir / f"{name}.log").exists()
                   for line in _read_from(self._log_dir / f"{name}.log", offset).splitlines()
                   if '"malformed request refused"' in line)


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# --- A run ---------------------------------------------------------------------------------

# Calls through a real mesh: no per-example deadline, no health checks about slow data, and no
# example database; Hypothesis's other caches go to a temp dir, not into the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "copilot-hypothesis")
HYPOTHESIS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@dataclass
class Tally:
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    found: list[str] = field(default_factory=list)

    def add(self, rpc: Rpc, payload: Payload, outcome: Outcome, problems: Iterable[str]) -> None:
        self.calls[(rpc.path, outcome.code.name)] += 1
        self.kinds[payload.kind] += 1
        for problem in problems:
            if problem not in self.found:
                self.found.append(problem)


def roles_for(rpc: Rpc) -> st.SearchStrategy[str | None]:
    """Any role or none, but mostly one the edge lets through (the services see most calls)."""
    through = sorted(r for r in ROLES if r is not None and r in (allowed_roles(rpc.path) or ()))
    return st.one_of(st.sampled_from(ROLES), *([st.sampled_from(through)] * 3 if through else []))


def fuzz_rpc(target: FuzzTarget, rpc: Rpc, examples: int, tally: Tally, *, raise_on_violation: bool,
             run_seed: int | None = None) -> None:
    """`examples` generated calls of `rpc` (roles drawn too), judged one by one."""

    @settings(HYPOTHESIS, max_examples=examples)
    @given(role=roles_for(rpc), payload=payloads(rpc))
    def run(role: str | None, payload: Payload) -> None:
        outcome, problems = target.check(rpc, role, payload)
        tally.add(rpc, payload, outcome, problems)
        if raise_on_violation:
            assert not problems, "\n".join(problems)

    (run if run_seed is None else seed(run_seed)(run))()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="generated calls in all (spread over the RPCs)")
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="start no new batch of calls after this many seconds (a batch: one RPC, <= 50 calls)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random)")
    args = parser.parse_args()

    from copilot_cli.supervisor import Mesh, settings_on_free_ports
    from servers.common.settings import Settings

    rpcs = copilot_rpcs()
    run_seed = args.seed if args.seed is not None else random.randrange(2**32)
    started = time.monotonic()
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="copilot-fuzz-") as tmp:
        settings_ = replace(settings_on_free_ports(Settings.from_env(), Path(tmp)), tenant_cache_ttl_s=1.0)
        mesh = Mesh(settings_, extra_env={"COPILOT_ACCESS_LOG": "0"})
        issuer = mesh.start(timeout_s=120)
        try:
            target = prepare(mesh.edge_address, lambda tenant, roles: issuer.mint(tenant, "fuzz", roles))
            time.sleep(settings_.tenant_cache_ttl_s * 2)  # the edge has the fuzz tenants' limits
            logs = LogWatch(mesh.log_dir)
            per_round = max(1, min(50, args.examples // len(rpcs)))
            done, rounds = 0, 0
            print(f"fuzzing {len(rpcs)} RPCs through {mesh.edge_address}: up to {args.examples} calls or "
                  f"{args.seconds:.0f}s, seed {run_seed}", flush=True)
            while done < args.examples and time.monotonic() - started < args.seconds:
                for i, rpc in enumerate(rpcs):
                    n = min(per_round, args.examples - done)
                    if n <= 0 or time.monotonic() - started >= args.seconds:
                        break
                    fuzz_rpc(target, rpc, n, tally, raise_on_violation=False,
                             run_seed=run_seed + rounds * len(rpcs) + i)
                    done += n
                rounds += 1
                print(f"  round {rounds}: {sum(tally.calls.values())} calls, {len(tally.found)} violations, "
                      f"{time.monotonic() - started:.0f}s", flush=True)
            log_problems = logs.problems()
            malformed_lines = logs.malformed_lines()
            witness = witness_problems(target)
            target.close()
        finally:
            mesh.stop()
    elapsed = time.monotonic() - started
    _summary(rpcs, tally, log_problems, malformed_lines, witness, elapsed, run_seed)
    sys.exit(1 if tally.found or log_problems or witness else 0)


def _summary(rpcs: Sequence[Rpc], tally: Tally, log_problems: list[str], malformed_lines: int, witness: list[str],
             elapsed: float, seed: int) -> None:
    codes = sorted({code for _, code in tally.calls})
    width = max(len(r.path) for r in rpcs)
    print(f"\n{sum(tally.calls.values())} calls in {elapsed:.1f}s (seed {seed}); payloads: "
          + ", ".join(f"{k} {n}" for k, n in tally.kinds.most_common()))
    print(f"{'RPC':<{width}}  " + "  ".join(f"{c:>18}" for c in codes))
    for rpc in rpcs:
        print(f"{rpc.path:<{width}}  " + "  ".join(f"{tally.calls.get((rpc.path, c), 0):>18}" for c in codes))
    print(f"\nmalformed-request log lines (rate-limited): {malformed_lines}")
    print(f"violations: {len(tally.found)}")
    for problem in tally.found[:50]:
        print(f"  {problem}")
    print(f"error-level log lines or tracebacks: {len(log_problems)}")
    for line in log_problems[:20]:
        print(f"  {line}")
    print("witness Search/Answer afterwards: " + ("ok" if not witness else "; ".join(witness)))


if __name__ == "__main__":
    main()
