"""Channels between services over every replica of a peer (servers/common/channels.py): calls
go only to replicas whose health says SERVING (a metering standby gets none), move to another
replica when one stops, and, to metering, wait within their deadline for a standby to take over."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.common.channels import CLIENT_OPTIONS, peer_channel_args, peer_options, peer_target
from servers.common.settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
METERING = "copilot.v1.MeteringService"


class Replica:
    """A grpc.aio server with health only; each answers Check("whoami-<n>") SERVING, so a
    call tells which replica took it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.server = grpc.aio.server()
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def start(self, status: int) -> None:
        await self.health.set(METERING, status)
        await self.health.set(f"whoami-{self.index}", SERVING)
        await self.server.start()


async def _who(stub: health_pb2_grpc.HealthStub, replicas: list[Replica], deadline_s: float = 2.0) -> int:
    """Which replica answers: only the one that took a call knows its own whoami name."""
    found = []
    for replica in replicas:
        try:
            await stub.Check(health_pb2.HealthCheckRequest(service=f"whoami-{replica.index}"), timeout=deadline_s)
            found.append(replica.index)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
    assert len(found) == 1, found
    return found[0]


def test_targets_name_every_replica() -> None:
    assert peer_target(["127.0.0.1:1"]) == "127.0.0.1:1"
    assert peer_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert peer_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="COPILOT_HOST"):
        peer_target(["metering:1", "metering:2"])


def test_a_single_process_is_called_as_before(tmp_path: Path) -> None:
    settings = dataclasses.replace(Settings.from_env(), host="127.0.0.1", data_dir=tmp_path, replicas=1)
    assert peer_channel_args(settings, "metering") == (settings.address("metering"), CLIENT_OPTIONS)


def test_replicas_are_called_over_every_address(tmp_path: Path) -> None:
    settings = dataclasses.replace(Settings.from_env(), host="127.0.0.1", data_dir=tmp_path, replicas=2,
                                   metering_port=40000, replica_port_stride=10)
    target, options = peer_channel_args(settings, "metering")
    assert target == "ipv4:127.0.0.1:40000,127.0.0.1:40010"
    assert options == peer_options("metering")


async def test_calls_go_to_serving_replicas_only_and_wait_for_a_takeover() -> None:
    first = Replica(0)
    second = Replica(1)
    await first.start(SERVING)
    await second.start(NOT_SERVING)
    target = peer_target([f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"])
    async with grpc.aio.insecure_channel(target, options=peer_options("metering")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # The standby (NOT_SERVING) takes no call.
        assert {await _who(stub, [first, second]) for _ in range(10)} == {0}
        # The active dies; the standby takes over a moment later: a call made in between
        # waits for it (within its deadline) instead of failing.
        await first.server.stop(None)

        async def take_over() -> None:
            await asyncio.sleep(0.5)
            await second.health.set(METERING, SERVING)

        takeover = asyncio.create_task(take_over())
        started = time.monotonic()
        assert await _who(stub, [first, second], deadline_s=5.0) == 1
        await takeover
        assert time.monotonic() - started < 5.0
    await second.server.stop(None)
