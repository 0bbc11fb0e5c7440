"""Health is honest: a service reports NOT_SERVING while a hard dependency is down, and
SERVING again once it is back — as seen by a probe through the edge, without a token."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import RunningMesh

pytestmark = pytest.mark.integration

GENERATION = "copilot.v1.GenerationService"


async def _wait_for(stub: health_pb2_grpc.HealthStub, service: str, wanted: int, within_s: float) -> int:
    deadline = time.monotonic() + within_s
    status = -1
    while time.monotonic() < deadline:
        try:
            status = (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status
        except grpc.aio.AioRpcError:
            status = -1
        if status == wanted:
            return status
        await asyncio.sleep(0.2)
    return status


async def test_generation_health_follows_retrieval(mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    assert await _wait_for(stub, GENERATION, health_pb2.HealthCheckResponse.SERVING, 10) == \
        health_pb2.HealthCheckResponse.SERVING
    await asyncio.to_thread(mesh.mesh.kill, "retrieval")
    try:
        down = await _wait_for(stub, GENERATION, health_pb2.HealthCheckResponse.NOT_SERVING, 20)
        assert down == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await asyncio.to_thread(mesh.mesh.respawn, "retrieval", 90.0)
    up = await _wait_for(stub, GENERATION, health_pb2.HealthCheckResponse.SERVING, 30)
    assert up == health_pb2.HealthCheckResponse.SERVING
