"""Server lifecycle: build a grpc.aio server with the common interceptors, health and
reflection; run it until SIGTERM/SIGINT; shut down gracefully (health NOT_SERVING first,
in-flight calls drained within the grace period, then the service's own resources)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from servers.common import logs, metrics, telemetry
from servers.common.bounds import BoundsServerInterceptor
from servers.common.channels import CLIENT_OPTIONS, peer_channel_args, server_options
from servers.common.health import DependencyCheck, Health
from servers.common.interceptors import (
    DecodingServerInterceptor,
    IdentityServerInterceptor,
    RefusalHook,
    identity_client_interceptors,
)
from servers.common.leadership import StandbyGuard
from servers.common.reflection import add_reflection
from servers.common.settings import Settings

log = logging.getLogger("copilot.server")

class HealthProvider(Protocol):
    """What serves grpc.health.v1 for a server: the standard `Health`, or a service's own."""

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


@dataclass
class Service:
    """What one server process hosts."""

    name: str
    port: int
    service_names: list[str]
    register: Callable[[grpc.aio.Server], None]
    dependencies: dict[str, DependencyCheck] = field(default_factory=dict)
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Whether calls to this server need a verified identity (the edge's companion
    # services are called by Envoy itself).
    identity_required: bool = True
    # Serves grpc.health.v1 instead of the standard per-name Health (which reflects
    # `dependencies`); the edge answers for the whole mesh this way.
    health: HealthProvider | None = None
    # Whether incoming calls get server spans. The edge's rate limit check runs once per
    # public request with no trace context from Envoy: its spans would be orphan roots
    # (one per request) and the interceptor costs that hot path about a third of its CPU.
    traced: bool = True
    # Told about every call this server refused (PERMISSION_DENIED / RESOURCE_EXHAUSTED): the audit trail.
    on_refusal: RefusalHook | None = None
    # Returns once this process may serve (it won the election among replicas sharing one state,
    # servers/common/leadership.py). Awaited after the server listens, as a standby (health
    # NOT_SERVING, every other call refused UNAVAILABLE), and before `on_start`. None: serves at once.
    leadership: Callable[[], Awaitable[None]] | None = None


def connect(target: str, options: Sequence[tuple[str, int | str]] = CLIENT_OPTIONS) -> grpc.aio.Channel:
    """A channel to another service that forwards identity, deadline and trace context."""
    interceptors = [*telemetry.client_interceptors(), *identity_client_interceptors()]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def connect_peer(settings: Settings, service: str) -> grpc.aio.Channel:
    """`connect` to every replica of `service`, balanced over those that serve
    (servers/common/channels.py `peer_options`)."""
    return connect(*peer_channel_args(settings, service))


async def serve(service: Service, settings: Settings) -> None:
    guard = StandbyGuard(service.name) if service.leadership is not None else None
    # The guard first: a standby refuses before any other interceptor runs.
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [*([guard] if guard is not None else []),
                                                                *(telemetry.server_interceptors() if service.traced
                                                                  else [])]
    if service.identity_required:
        interceptors.append(IdentityServerInterceptor(access_log=settings.access_log,
                                                      on_refusal=service.on_refusal,
                                                      malformed_log_interval_s=settings.malformed_log_interval_s))
        # Inside the identity interceptor: runs as the caller, refusals become rich statuses.
        interceptors.append(BoundsServerInterceptor(settings.bounds))
    else:
        # Malformed requests are refused (INVALID_ARGUMENT) by the identity interceptor; a
        # server without it still needs that, and only that.
        interceptors.append(DecodingServerInterceptor(settings.malformed_log_interval_s))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings.bounds),
                             maximum_concurrent_rpcs=settings.bounds.max_concurrent_rpcs)
    health: HealthProvider
    standard: Health | None = None
    if service.health is not None:
        if guard is not None:
            raise TypeError(f"{service.name}: a service with leadership uses the standard health")
        health = service.health
    else:
        standard = Health(service.service_names)
        for name, check in service.dependencies.items():
            standard.add_dependency(name, check)
        health = standard
    health.add_to_server(server)
    add_reflection(server, [*service.service_names, "grpc.health.v1.Health"])
    service.register(server)

    address = f"{settings.host}:{service.port}"
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"{service.name}: cannot listen on {address}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if guard is None or standard is None or service.leadership is None:
        for hook in service.on_start:
            await hook()
        await server.start()
    else:
        await standard.not_serving()
        await server.start()
        waiting = time.monotonic()
        if not await _elected(service.leadership, stop):
            log.info("standby: stopping")
            await server.stop(settings.shutdown_grace_s)
            telemetry.shutdown()
            return
        elected = time.monotonic()
        guard.starting()
        try:
            for hook in service.on_start:
                await hook()
        except BaseException:
            await server.stop(0)
            raise
        guard.activate()
        log.info("active: took over", extra={"waited_s": round(elected - waiting, 3),
                                              "open_s": round(time.monotonic() - elected, 3)})
    await health.start()
    metrics.serve(settings.host, settings.metrics_port(service.name), settings.metrics_max_tenants)
    log.info("serving", extra={"address": address, "services": service.service_names})
    await stop.wait()

    log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    await health.shutdown()
    await server.stop(settings.shutdown_grace_s)
    for hook in reversed(service.on_stop):
        try:
            await hook()
        except Exception:
            log.exception("error while stopping")
    telemetry.shutdown()
    log.info("stopped")


async def _elected(leadership: Callable[[], Awaitable[None]], stop: asyncio.Event) -> bool:
    """Waits for the election; False if told to stop first (the election is cancelled)."""
    election = asyncio.ensure_future(leadership())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({election, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if election.done():
        election.result()
        return True
    election.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await election
    return False


def run(name: str, build: Callable[[Settings], Service]) -> None:
    """Entry point of a server process: settings, logs, telemetry, serve until signalled."""
    settings = Settings.from_env()
    logs.configure(name, settings.log_level)
    telemetry.setup(name, settings.otel_endpoint)

    async def main() -> None:
        # Built inside the loop: services open channels and stores bound to it.
        await serve(build(settings), settings)

    asyncio.run(main())
