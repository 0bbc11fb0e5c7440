"""grpc.health.v1 for the whole mesh, answered at the edge.

Envoy routes /grpc.health.v1.Health/ here, so a client (or a load balancer in front of
Envoy) can probe every public service through the one public port. A public service's
name is answered by asking the service that owns it (its own Health, which reflects its
dependencies), cached briefly so a burst of probes costs one call; a service that does
not answer is NOT_SERVING. "" and the edge's own names are answered here; under `copilot up`
"" is NOT_SERVING until the mesh has finished starting (its demo tenants provisioned).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence

import grpc
from grpc.aio import ServicerContext
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.common.settings import Settings
from servers.common.singleflight import SingleFlight

log = logging.getLogger("copilot.edge.health")

# grpc.health.v1 ServingStatus values.
Status = int
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

# Public service name -> the server (settings.address key) that hosts it.
OWNERS: Mapping[str, str] = {
    "copilot.v1.RetrievalService": "retrieval",
    "copilot.v1.GenerationService": "generation",
    "copilot.v1.MeteringService": "metering",
    "copilot.v1.TenantService": "metering",
    "copilot.v1.AuditService": "metering",
}

CACHE_TTL_S = 1.0
PROBE_TIMEOUT_S = 0.5


class HealthProxy(health_pb2_grpc.HealthServicer):
    def __init__(self, addresses: Mapping[str, str | Sequence[str]], local_names: Iterable[str], *,
                 cache_ttl_s: float = CACHE_TTL_S, probe_timeout_s: float = PROBE_TIMEOUT_S,
                 ready: Callable[[], bool] | None = None) -> None:
        """`addresses`: public service name -> address(es) of the server that owns it (every
        replica: the name is SERVING while any of them serves); `ready`: whether the mesh has
        finished starting (the overall status "" is NOT_SERVING until)."""
        self._ready = ready
        self._addresses = {name: (where,) if isinstance(where, str) else tuple(where)
                           for name, where in addresses.items()}
        self._local = frozenset(("", *local_names))
        self._ttl = cache_ttl_s
        self._timeout = probe_timeout_s
        self._serving = False
        self._stopped = asyncio.Event()
        self._cache: dict[str, tuple[Status, float]] = {}
        self._inflight: SingleFlight[str, Status] = SingleFlight()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, health_pb2_grpc.HealthStub] = {}

    @classmethod
    def from_settings(cls, settings: Settings, local_names: Iterable[str]) -> HealthProxy:
        ready_file = settings.ready_file
        return cls({name: settings.addresses(owner) for name, owner in OWNERS.items()}, local_names,
                   ready=ready_file.exists if ready_file is not None else None)

    # -- lifecycle (the health provider protocol servers/common/lifecycle.py expects)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self, server)

    async def start(self) -> None:
        self._serving = True

    async def shutdown(self) -> None:
        # Probes see NOT_SERVING while in-flight calls drain; watchers get told and end.
        self._serving = False
        self._stopped.set()
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        self._stubs.clear()

    # -- status

    def _stub(self, address: str) -> health_pb2_grpc.HealthStub:
        stub = self._stubs.get(address)
        if stub is None:
            # A plain channel: health probes carry no identity and need none.
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
            stub = self._stubs[address] = health_pb2_grpc.HealthStub(channel)
        return stub

    async def _probe(self, name: str) -> Status:
        statuses = await asyncio.gather(*(self._probe_one(address, name) for address in self._addresses[name]))
        return SERVING if SERVING in statuses else NOT_SERVING

    async def _probe_one(self, address: str, name: str) -> Status:
        try:
            response = await self._stub(address).Check(health_pb2.HealthCheckRequest(service=name),
                                                       timeout=self._timeout)
            return Status(response.status)
        except (grpc.RpcError, OSError, TimeoutError):
            return NOT_SERVING

    async def status(self, name: str) -> Status | None:
        """The status of `name`, or None when no service has that name."""
        if name == "" and self._ready is not None and not self._ready():
            return NOT_SERVING
        if name in self._local:
            return SERVING if self._serving else NOT_SERVING
        if name not in self._addresses:
            return None
        if not self._serving:
            return NOT_SERVING
        cached = self._cache.get(name)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        # Concurrent probes for the same name share one call to its owner, which outlives
        # any one caller giving up on it.
        return await self._inflight.run(name, lambda: self._probe_and_cache(name))

    async def _probe_and_cache(self, name: str) -> Status:
        result = await self._probe(name)
        self._cache[name] = (result, time.monotonic() + self._ttl)
        return result

    # -- grpc.health.v1.Health

    async def Check(
        self, request: health_pb2.HealthCheckRequest,
        context: ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> health_pb2.HealthCheckResponse:
        status = await self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest,
        context: ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            # Read before the status, so the last status sent is the one after shutdown.
            stopping = self._stopped.is_set()
            status = await self.status(request.service)
            current = SERVICE_UNKNOWN if status is None else status
            if current != last:
                yield health_pb2.HealthCheckResponse(status=current)
                last = current
            if stopping:
                return
            # Polled at the cache's pace: a change shows within about one TTL.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=self._ttl)
