"""The one retry helper (servers/common/retry.py): full-jitter bounds, attempts, a peer's
RetryInfo and the served call's deadline, against a real loopback grpc.aio server behind the
identity interceptor, called through a channel built like the services' (`lifecycle.connect`)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from servers.common import identity
from servers.common.errors import CopilotError, InvalidArgument, ResourceExhausted, Unavailable
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.lifecycle import connect
from servers.common.retry import Backoff, retry, retry_sync, transient

CALLER = identity.Identity("acme-corp", "user-1", frozenset({identity.MEMBER}))
PEER = "/test.Retry/Peer"
FRONT = "/test.Retry/Front"
EXHAUSTED_OR_TRANSIENT = transient({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass
class Script:
    """What the peer answers, call by call (an error to raise, or None: OK); OK once it runs out."""

    outcomes: list[CopilotError | None] = field(default_factory=list)
    calls: int = 0
    # The front's policy, and what its retry reported.
    policy: Backoff = field(default_factory=lambda: Backoff(base_s=0.001, cap_s=0.01, max_attempts=5))
    waits: list[float] = field(default_factory=list)


@dataclass
class Mesh:
    script: Script
    channel: grpc.aio.Channel

    async def call(self, method: str, deadline_s: float = 10.0) -> bytes:
        # Called from outside the mesh with a caller's identity, as Envoy would.
        response: bytes = await self.channel.unary_unary(method, None, None)(
            b"", metadata=CALLER.metadata(), timeout=deadline_s)
        return response


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    script = Script()
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    port = server.add_insecure_port("127.0.0.1:0")
    outgoing = connect(f"127.0.0.1:{port}")

    async def peer(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        script.calls += 1
        outcome = script.outcomes.pop(0) if script.outcomes else None
        if outcome is not None:
            raise outcome
        return b"ok"

    async def front(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        # A service calling its peer for the caller, retrying under the script's policy.
        response: bytes = await retry(lambda: outgoing.unary_unary(PEER, None, None)(b""), script.policy,
                                      retryable=EXHAUSTED_OR_TRANSIENT,
                                      on_retry=lambda _exc, _attempt, wait: script.waits.append(wait))
        return response

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Retry", {
        "Peer": grpc.unary_unary_rpc_method_handler(peer),
        "Front": grpc.unary_unary_rpc_method_handler(front),
    })])
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Mesh(script, channel)
    finally:
        await channel.close(None)
        await outgoing.close(None)
        await server.stop(None)


def test_full_jitter_stays_within_the_exponential_ceiling() -> None:
    policy = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(7))
    assert [policy.ceiling(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.ceiling(10_000) == 1.0  # no overflow however long the outage
    for failures in range(1, 8):
        draws = [policy.delay(failures) for _ in range(500)]
        ceiling = policy.ceiling(failures)
        assert all(0.0 <= d <= ceiling for d in draws)
        # Full jitter: the whole range is used, not a band around the ceiling.
        assert min(draws) < 0.1 * ceiling and max(draws) > 0.9 * ceiling
    # Seeded: the same seed draws the same waits.
    again, other = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(7)), Backoff(base_s=0.1, cap_s=1.0,
                                                                                 rng=random.Random(8))
    first = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(7))
    assert [first.delay(n) for n in range(1, 6)] == [again.delay(n) for n in range(1, 6)]
    assert [first.delay(n) for n in range(1, 6)] != [other.delay(n) for n in range(1, 6)]


def test_a_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(max_attempts=0)
    with pytest.raises(ValueError):
        Backoff(base_s=-1.0)


async def test_transient_failures_are_retried_until_the_peer_answers(mesh: Mesh) -> None:
    mesh.script.outcomes = [Unavailable("restarting"), Unavailable("restarting")]
    assert await mesh.call(FRONT) == b"ok"
    assert mesh.script.calls == 3
    assert len(mesh.script.waits) == 2


async def test_attempts_are_bounded_and_the_last_error_stands(mesh: Mesh) -> None:
    mesh.script.outcomes = [Unavailable("down")] * 10
    mesh.script.policy = Backoff(base_s=0.001, cap_s=0.01, max_attempts=3)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.call(FRONT)
    # The front reports a dependency that stayed unavailable.
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mesh.script.calls == 3


async def test_what_is_not_retryable_is_raised_at_once(mesh: Mesh) -> None:
    mesh.script.outcomes = [InvalidArgument("no"), None]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.call(FRONT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mesh.script.calls == 1
    assert mesh.script.waits == []


async def test_the_peers_retry_info_is_a_floor_for_the_wait(mesh: Mesh) -> None:
    mesh.script.outcomes = [ResourceExhausted("slow down", retry_after_s=0.2)]
    assert await mesh.call(FRONT) == b"ok"
    assert mesh.script.calls == 2
    # The policy alone would wait at most 0.001 s.
    assert mesh.script.waits and mesh.script.waits[0] >= 0.2


async def test_a_wait_past_the_served_calls_deadline_is_not_started(mesh: Mesh) -> None:
    # The peer asks for 5 s; the caller gave the front 2 s: the front gives up at once with
    # the peer's answer instead of sleeping into DEADLINE_EXCEEDED.
    mesh.script.outcomes = [ResourceExhausted("slow down", retry_after_s=5.0)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.call(FRONT, deadline_s=2.0)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert mesh.script.calls == 1
    assert mesh.script.waits == []


async def test_the_total_time_bounds_the_waits(mesh: Mesh) -> None:
    mesh.script.outcomes = [ResourceExhausted("slow down", retry_after_s=5.0)]
    mesh.script.policy = Backoff(base_s=0.001, cap_s=0.01, total_s=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.call(FRONT)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert mesh.script.calls == 1


def test_the_sync_variant_retries_blocking_calls_alike() -> None:
    failures = [ConnectionError("reset"), ConnectionError("reset")]
    waits: list[float] = []
    hinted: list[BaseException] = []

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    def hint(exc: BaseException) -> float | None:
        hinted.append(exc)
        return 0.01

    policy = Backoff(base_s=0.001, cap_s=0.002, max_attempts=5, rng=random.Random(1))
    assert retry_sync(call, policy, retryable=lambda exc: isinstance(exc, ConnectionError), hint=hint,
                      on_retry=lambda _exc, _attempt, wait: waits.append(wait)) == "done"
    assert waits == [0.01, 0.01] and len(hinted) == 2

    def refused() -> str:
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        retry_sync(refused, policy, retryable=lambda exc: isinstance(exc, ConnectionError))
