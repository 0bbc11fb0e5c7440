"""The one place gRPC channel and server options are set (message sizes, keepalive, pings).

Every grpc.aio server of the mesh is built with `server_options(bounds)` (`SERVER_OPTIONS`
with the largest message its bounds accept; servers/common/lifecycle), and every channel, a
service's to its peers, the CLI's to the edge, a benchmark's, with `CLIENT_OPTIONS`.

Pings: Envoy keeps its upstream connections alive with an HTTP/2 PING every 30 s
(`connection_keepalive` of each cluster in envoy/envoy.yaml.tmpl), and our own channels
ping every 30 s as well (`grpc.keepalive_time_ms`). A gRPC server by default accepts a ping
that comes with no data at most every 5 minutes, and only while a call is open; after two
such "bad" pings it closes the connection (GOAWAY "too_many_pings"), so a quiet
WatchTenants stream, or a call waiting on a slow peer, died with UNAVAILABLE. Servers
therefore accept a ping without data every `MIN_PING_INTERVAL_MS` (well below the 30 s
senders use, jitter included) and on a connection with no call open.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

from servers.common.settings import Bounds, Settings

# Large enough for batched ingest; Envoy enforces the public limit in front.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# How often a peer pings a connection to find a dead one (and what Envoy's clusters use).
KEEPALIVE_MS = 30_000
# The shortest interval between pings without data a server accepts: a third of the senders'.
MIN_PING_INTERVAL_MS = 10_000

_MESSAGE_SIZES: Sequence[tuple[str, int | str]] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

CLIENT_OPTIONS: Sequence[tuple[str, int | str]] = (
    *_MESSAGE_SIZES,
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.enable_retries", 1),
    # A restarted peer is found again within seconds (the default backoff grows to 120 s).
    ("grpc.max_reconnect_backoff_ms", 5_000),
)

SERVER_OPTIONS: Sequence[tuple[str, int | str]] = (
    *_MESSAGE_SIZES,
    # The server pings its clients too, so a vanished peer's calls end within a minute.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    # Envoy's and our channels' keepalive pings are welcome, also on a quiet stream... (gRPC
    # core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; its key has no "recv": an
    # unknown key would be ignored without a word, as "min_recv_ping_interval..." is).
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    # ... and on a connection with no call open (Envoy pings its pooled connections).
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC sets SO_REUSEPORT by default: a second process on a taken port (a replica given the
    # wrong port, a stale server) would bind beside the first and silently take half its calls.
    ("grpc.so_reuseport", 0),
)


def server_options(bounds: Bounds) -> list[tuple[str, int | str]]:
    """`SERVER_OPTIONS` for a server under `bounds`: gRPC itself refuses (RESOURCE_EXHAUSTED,
    before decoding) a message over the largest per-RPC limit; the bounds interceptor
    (servers/common/bounds.py) then applies each RPC's own."""
    largest = max(bounds.query_request_bytes, bounds.ingest_request_bytes, bounds.ingest_stream_message_bytes,
                  bounds.default_request_bytes)
    return [(key, largest if key == "grpc.max_receive_message_length" else value) for key, value in SERVER_OPTIONS]


# What a channel to a peer service asks each replica's grpc.health.v1 about (client-side health
# checks): a metering standby, a replica shutting down or one whose store is down answers
# NOT_SERVING and gets no calls.
PEER_HEALTH_NAMES = {
    "retrieval": "copilot.v1.RetrievalService",
    "generation": "copilot.v1.GenerationService",
    "metering": "copilot.v1.MeteringService",
}

# Every call between services is safe to repeat (searches and reads; writes keyed by the
# caller: usage and audit events by id, reservations by key, provisioning by tenant), so a call
# that met a dying replica or a standby goes to another one. Five attempts over about 1.5 s of
# back-off bridge a metering takeover (the standby's lock poll plus opening its stores).
PEER_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def peer_target(addresses: Sequence[str]) -> str:
    """A gRPC target naming every replica (`ipv4:a:p,b:q`): the channel balances over them.
    One address stays a plain target (it may be a DNS name, as under compose)."""
    if len(addresses) == 1:
        return addresses[0]
    hosts = {address.rpartition(":")[0].strip("[]") for address in addresses}
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(f"replicas need an IP address for COPILOT_HOST, got {sorted(hosts)}") from None
    scheme = "ipv4" if versions == {4} else "ipv6"
    return f"{scheme}:" + ",".join(addresses)


# Services with a moment when no replica serves by design: while a metering standby takes over
# (docs/scale-out.md), a call waits, within its deadline, for the new active instead of failing
# at once. Every replica of the others serves, so a call to them fails fast when none does.
WAIT_FOR_READY = frozenset({"metering"})


def peer_options(service: str) -> list[tuple[str, int | str]]:
    """`CLIENT_OPTIONS` plus the service config of a channel to `service`'s replicas: round
    robin over those whose health says SERVING, and the retry policy above."""
    method: dict[str, object] = {"name": [{}], "retryPolicy": PEER_RETRY_POLICY}
    if service in WAIT_FOR_READY:
        method["waitForReady"] = True
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": PEER_HEALTH_NAMES[service]},
        "methodConfig": [method],
    }
    return [*CLIENT_OPTIONS, ("grpc.service_config", json.dumps(config))]


def peer_channel_args(settings: Settings, service: str) -> tuple[str, Sequence[tuple[str, int | str]]]:
    """(target, options) of a channel from one service to every replica of `service`. A single
    process is called as it always was: whatever its health says (it is the only one; its
    calls answer for themselves), failing fast when it is down."""
    addresses = settings.addresses(service)
    if len(addresses) == 1:
        return addresses[0], CLIENT_OPTIONS
    return peer_target(addresses), peer_options(service)
