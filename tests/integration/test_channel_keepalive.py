"""A quiet stream survives the keepalive pings Envoy sends its upstreams (servers/common/channels).

Envoy pings every upstream connection every 30 s; a gRPC server built with the default
options takes a ping without data more often than every 5 minutes as abuse and, after a few,
closes the connection ("Too many pings"): a quiet WatchTenants stream, or a call waiting on a
slow peer, ended in UNAVAILABLE. Here a client pings as Envoy does, only three times as often
(every 10.2 s, just above the servers' accepted minimum) so the test takes a minute, not
three: a server with `SERVER_OPTIONS` keeps the stream; one with the defaults, the control,
drops it. No mesh: two loopback grpc.aio servers. Slow (about a minute, idle), hence here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest

from servers.common.channels import MIN_PING_INTERVAL_MS, SERVER_OPTIONS

pytestmark = pytest.mark.integration

PING_MS = MIN_PING_INTERVAL_MS + 200
# The defaults' abuse policy closes the connection at the fifth ping without data.
QUIET_S = 5.5 * PING_MS / 1000
PINGING_LIKE_ENVOY = (
    ("grpc.keepalive_time_ms", PING_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Envoy does not stop pinging a connection that carries no data; a gRPC client would.
    ("grpc.http2.max_pings_without_data", 0),
)


async def quiet_stream(options: Sequence[tuple[str, int | str]], release: asyncio.Event) -> bytes | grpc.StatusCode:
    """What a client pinging like Envoy reads from a stream that stays quiet until `release`."""

    async def quiet(_request: bytes, _context: grpc.aio.ServicerContext) -> object:
        await release.wait()
        yield b"still here"

    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Keepalive", {"Quiet": grpc.unary_stream_rpc_method_handler(quiet)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=PINGING_LIKE_ENVOY)
    try:
        async for message in channel.unary_stream("/test.Keepalive/Quiet", None, None)(b"", timeout=QUIET_S + 30):
            return bytes(message)
        return b""
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close(None)
        await server.stop(None)


async def test_a_quiet_stream_outlives_keepalive_pings() -> None:
    release = asyncio.Event()

    async def after_the_pings() -> None:
        await asyncio.sleep(QUIET_S)
        release.set()

    ours, defaults, _ = await asyncio.gather(quiet_stream(SERVER_OPTIONS, release), quiet_stream((), release),
                                             after_the_pings())
    assert ours == b"still here"
    # The control: without the ping policy the same stream is cut.
    assert defaults == grpc.StatusCode.UNAVAILABLE
