"""Following `TenantService.WatchTenants`: the one follower of the tenant stream.

Every connection of the watch opens with a snapshot (every tenant, in pages, the last one
marked `snapshot_done`) and then pushes each change as it happens. The follower keeps the
stream open as a platform service account, reconnecting with backoff (servers/common/retry)
when metering restarts or the stream falls behind, and tells its user:

* each message (`on_message(change, snapshot)`): `snapshot` is the set of tenant ids the
  connection's snapshot has sent so far while the snapshot is arriving (the message's own
  included), None for a change pushed after it;
* the snapshot's end (`on_snapshot()`, which may reconcile and says whether the user is now
  current: the follower is `live` from then on);
* a connection's end (`on_down()`), before the wait to reconnect.

The messages are handed over as the contract's `WatchTenantsResponse`: each user converts
them to its own domain (generation: configs; the edge: request limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from copilot.v1 import tenant_pb2, tenant_pb2_grpc
from servers.common import identity
from servers.common.retry import Backoff

log = logging.getLogger("copilot.tenant_watch")

# Opens one connection of the watch.
WatchStream = Callable[[], AsyncIterator[tenant_pb2.WatchTenantsResponse]]
OnMessage = Callable[[tenant_pb2.WatchTenantsResponse, "set[str] | None"], Awaitable[None] | None]
OnSnapshot = Callable[[], Awaitable[bool] | bool]
OnDown = Callable[[], None]


def watch_as(stub: tenant_pb2_grpc.TenantServiceAsyncStub, service: str) -> WatchStream:
    """Connections of the watch made as `service`'s platform service account."""

    async def stream() -> AsyncIterator[tenant_pb2.WatchTenantsResponse]:
        with identity.acting_as(identity.service_account(service)):
            async for message in stub.WatchTenants(tenant_pb2.WatchTenantsRequest()):
                yield message

    return stream


async def _maybe_await(result: Awaitable[object] | object) -> object:
    return await result if inspect.isawaitable(result) else result


@dataclass(eq=False)
class TenantFollower:
    """Follows the watch in the background from `start` until `stop`."""

    stream: WatchStream
    on_message: OnMessage
    reconnect: Backoff
    on_snapshot: OnSnapshot | None = None
    on_down: OnDown | None = None
    name: str = "tenant-watch"
    # True from the end of a connection's snapshot (accepted by `on_snapshot`) until it breaks.
    live: bool = field(default=False, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.live = False

    async def _connection(self) -> None:
        """One connection, until it ends or fails."""
        snapshot: set[str] | None = set()
        async for change in self.stream():
            if snapshot is not None:
                snapshot.update(t.tenant_id for t in change.tenants)
            await _maybe_await(self.on_message(change, snapshot))
            if snapshot is not None and change.snapshot_done:
                snapshot = None
                current = True if self.on_snapshot is None else await _maybe_await(self.on_snapshot())
                self.live = bool(current)

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                await self._connection()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # metering restarting, or the watch fell behind
                log.info("tenant watch interrupted; reconnecting",
                         extra={"watch": self.name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            finally:
                # A connection that got through its snapshot was a good one: the next
                # reconnect starts from the shortest wait again.
                failures = 0 if self.live else failures
                if self.on_down is not None:
                    self.on_down()
                self.live = False
            failures += 1
            await asyncio.sleep(self.reconnect.delay(failures))
