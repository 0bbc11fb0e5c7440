"""grpc.health.v1 per service name, reflecting the service's dependencies.

Each server registers its public service names; the overall status ("") and each name
are SERVING only while every hard dependency check passes. Checks run in the background
on an interval, never on the probe's path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("copilot.health")

DependencyCheck = Callable[[], Awaitable[bool]]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self, service_names: Iterable[str], interval_s: float = 2.0) -> None:
        self.servicer = health_aio.HealthServicer()
        self._names = ["", *service_names]
        self._checks: dict[str, DependencyCheck] = {}
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self._failing: set[str] = set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def add_dependency(self, name: str, check: DependencyCheck) -> None:
        self._checks[name] = check

    async def not_serving(self) -> None:
        """Every name NOT_SERVING until `start` (grpc_health answers SERVING for "" by default):
        a replica that listens before it may serve (a standby)."""
        await self._set(NOT_SERVING)

    async def start(self) -> None:
        await self._evaluate()
        self._task = asyncio.create_task(self._loop(), name="health-checks")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._evaluate()

    async def _evaluate(self) -> None:
        failing: set[str] = set()
        for name, check in self._checks.items():
            try:
                ok = await asyncio.wait_for(check(), timeout=max(self._interval, 1.0))
            except Exception:
                ok = False
            if not ok:
                failing.add(name)
        if failing != self._failing:
            log.warning("dependencies changed", extra={"failing": sorted(failing)})
        self._failing = failing
        await self._set(NOT_SERVING if failing else SERVING)

    async def _set(self, status: int) -> None:
        for name in self._names:
            await self.servicer.set(name, status)

    @property
    def failing(self) -> frozenset[str]:
        return frozenset(self._failing)

    async def shutdown(self) -> None:
        if self._task:
            self._task.cancel()
        # Probes see NOT_SERVING while in-flight calls drain.
        await self.servicer.enter_graceful_shutdown()
