"""Hostile message bytes through the real Envoy: malformed requests are INVALID_ARGUMENT on
every RPC (gRPC and gRPC-Web, public ones too), counted and logged within the per-tenant
limit; and a Hypothesis fuzzer sends generated and mutated messages to every RPC of
copilot.v1 with each role's token and none (bench/fuzz.py has the strategies and the
judgement; `make bench-fuzz` is the long run)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fuzz import (
    ROLES,
    FuzzTarget,
    LogWatch,
    Payload,
    Rpc,
    Tally,
    copilot_rpcs,
    create_tenant,
    fuzz_rpc,
    prepare,
    witness_problems,
)
from servers.common.errors import from_rpc_error
from servers.edge.roles import allowed_roles
from tests.integration.conftest import RunningMesh
from tests.integration.test_edge_protocols import _grpc_web_call

pytestmark = pytest.mark.integration

RPCS = copilot_rpcs()
# Per RPC in the suite (25 RPCs: about 150 calls through the edge); `make bench-fuzz` runs more.
EXAMPLES_PER_RPC = 6
GARBAGE = b"\xff" * 16
INVALID_ARGUMENT = str(grpc.StatusCode.INVALID_ARGUMENT.value[0])


@pytest.fixture(scope="module")
def target(mesh: RunningMesh) -> Iterator[FuzzTarget]:
    fuzz = prepare(mesh.edge, lambda tenant, roles: mesh.token(tenant, tuple(roles), user="fuzz"))
    time.sleep(mesh.settings.tenant_cache_ttl_s * 2)  # the edge knows the fuzz tenants' limits
    yield fuzz
    fuzz.close()


def _caller_role(rpc: Rpc) -> str:
    """A role the edge lets through to `rpc`."""
    roles = allowed_roles(rpc.path) or frozenset()
    return next(r for r in ROLES if r is not None and r in roles)


def test_the_fuzz_knows_every_service() -> None:
    services = {r.path.split("/")[1] for r in RPCS}
    assert services == {f"copilot.v1.{s}" for s in
                        ("AuditService", "GenerationService", "MeteringService", "RetrievalService", "TenantService")}
    assert {r.kind for r in RPCS} >= {"unary_unary", "unary_stream", "stream_stream"}


def test_garbage_to_every_rpc_is_invalid_argument(mesh: RunningMesh, target: FuzzTarget) -> None:
    logs = LogWatch(mesh.mesh.log_dir)
    wrong = []
    for rpc in RPCS:
        role = _caller_role(rpc)
        outcome, problems = target.check(rpc, role, Payload("0xff", (GARBAGE,)))
        expected = f"request is not a valid {rpc.request.full_name}"
        if (outcome.code, outcome.message, outcome.reason) != (
                grpc.StatusCode.INVALID_ARGUMENT, expected, "MALFORMED_REQUEST"):
            wrong.append(f"{rpc.path} as {role}: {outcome.code.name} {outcome.message!r} {outcome.reason}")
        wrong.extend(problems)
    assert not wrong, "\n".join(wrong)
    assert not logs.problems(), "\n".join(logs.problems())


def test_public_rpcs_refuse_garbage_too(mesh: RunningMesh) -> None:
    # Health and reflection need no token; the edge's companion answers them.
    logs = LogWatch(mesh.mesh.log_dir)
    with grpc.insecure_channel(mesh.edge) as channel:
        for method, call in (
                ("/grpc.health.v1.Health/Check", lambda m: channel.unary_unary(m, None, None)(GARBAGE, timeout=10)),
                ("/grpc.health.v1.Health/Watch",
                 lambda m: list(channel.unary_stream(m, None, None)(GARBAGE, timeout=10))),
                ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                 lambda m: list(channel.stream_stream(m, None, None)(iter([GARBAGE]), timeout=10))),
                ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                 lambda m: list(channel.stream_stream(m, None, None)(iter([GARBAGE]), timeout=10)))):
            with pytest.raises(grpc.RpcError) as info:
                call(method)
            code, message, _ = from_rpc_error(info.value)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, message)
            assert message.startswith("request is not a valid grpc."), message
    assert not logs.problems(), "\n".join(logs.problems())


async def test_grpc_web_malformed_body_is_invalid_argument(mesh: RunningMesh, target: FuzzTarget) -> None:
    token = target.mint(target.home, ("member",))
    for path, headers, type_name in (
            ("/copilot.v1.RetrievalService/Search", {"authorization": f"Bearer {token}"}, "copilot.v1.SearchRequest"),
            ("/copilot.v1.TenantService/GetTenant", {"authorization": f"Bearer {token}"},
             "copilot.v1.GetTenantRequest"),
            ("/grpc.health.v1.Health/Check", {}, "grpc.health.v1.HealthCheckRequest")):
        status, _, trailers = await asyncio.to_thread(_grpc_web_call, mesh.edge, path, GARBAGE, headers)
        assert status == 200 and trailers.get("grpc-status") == INVALID_ARGUMENT, (path, trailers)
        assert urllib.parse.unquote(trailers.get("grpc-message", "")) == f"request is not a valid {type_name}"


def _malformed_total(mesh: RunningMesh, service: str, rpc: str) -> float:
    settings = mesh.settings
    with urllib.request.urlopen(f"http://{settings.host}:{settings.metrics_port(service)}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "copilot_malformed_requests_total" and s.labels.get("rpc") == rpc)


def test_malformed_requests_are_counted_and_logged_once_per_tenant(mesh: RunningMesh, target: FuzzTarget) -> None:
    tenant = f"garbage-{uuid.uuid4().hex[:8]}"
    create_tenant(target.channel, target.mint, tenant)
    time.sleep(mesh.settings.tenant_cache_ttl_s * 2)
    before = _malformed_total(mesh, "retrieval", "Search")
    offset = (mesh.mesh.log_dir / "retrieval.log").stat().st_size
    metadata = (("authorization", f"Bearer {target.mint(tenant, ('member',))}"),)
    search = target.channel.unary_unary("/copilot.v1.RetrievalService/Search", None, None)
    started = time.monotonic()
    for _ in range(12):
        with pytest.raises(grpc.RpcError) as info:
            search(GARBAGE, metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    elapsed = time.monotonic() - started
    assert _malformed_total(mesh, "retrieval", "Search") - before == 12
    with (mesh.mesh.log_dir / "retrieval.log").open("rb") as f:
        f.seek(offset)
        new = [json.loads(line) for line in f.read().decode().splitlines() if line.startswith("{")]
    lines = [e for e in new if e.get("msg") == "malformed request refused" and e.get("tenant") == tenant]
    # One line per tenant per interval, however many requests (the interval is 10 s by default).
    assert 1 <= len(lines) <= 1 + int(elapsed // mesh.settings.malformed_log_interval_s)
    assert all(e["level"] == "warning" and "exc" not in e for e in lines)
    assert lines[0]["message_type"] == "copilot.v1.SearchRequest" and lines[0]["bytes"] == len(GARBAGE)


@pytest.mark.parametrize("rpc", RPCS, ids=[r.path.rsplit(".", 1)[-1] for r in RPCS])
def test_fuzz(mesh: RunningMesh, target: FuzzTarget, rpc: Rpc) -> None:
    logs = LogWatch(mesh.mesh.log_dir)
    tally = Tally()
    fuzz_rpc(target, rpc, EXAMPLES_PER_RPC, tally, raise_on_violation=True)
    assert sum(tally.calls.values()) >= EXAMPLES_PER_RPC
    assert not logs.problems(), "\n".join(logs.problems())


def test_mesh_still_serves_after_the_fuzz(target: FuzzTarget) -> None:
    assert not witness_problems(target)
