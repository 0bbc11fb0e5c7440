"""`copilot up` as a user runs it: health says ready only once the demo tenants exist, and
no service outlives it, whether it is stopped during start-up (SIGTERM) or killed (SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot_cli.demo import DEMO_TENANTS
from copilot_cli.supervisor import Mesh, settings_env, settings_on_free_ports
from servers.common.settings import Settings

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def _settings(data_dir: Path) -> Settings:
    return settings_on_free_ports(Settings.from_env(), data_dir)


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings_env(settings), "COPILOT_EDGE": f"{settings.host}:{settings.edge_port}"}


def _up(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    out = (settings.data_dir / "up.out").open("ab")
    return subprocess.Popen([sys.executable, "-m", "copilot_cli.main", "up", *args], env=_env(settings),
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _mesh_processes(data_dir: Path) -> list[int]:
    """Processes started for this data directory (they all carry it in their environment)."""
    marker = f"COPILOT_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _ports(settings: Settings) -> list[int]:
    return [settings.edge_port, settings.envoy_admin_port, settings.retrieval_port, settings.generation_port,
            settings.metering_port, settings.edge_services_port, settings.edge_http_port]


def _assert_nothing_left(settings: Settings, supervisor: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    left = _mesh_processes(settings.data_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _mesh_processes(settings.data_dir)
    assert not [p for p in left if p != supervisor.pid], f"survivors: {left}"
    for port in _ports(settings):
        with socket.socket() as sock:
            # As the next `copilot up` checks them (connections left in TIME_WAIT do not count).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((settings.host, port))  # raises if anything still listens there


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_during_start_up_leaves_no_service_behind(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    up = _up(settings, "--no-demo")
    try:
        # Terminated while the services are starting, before Envoy is up.
        _wait(lambda: len(_mesh_processes(tmp_path)) >= 3 or up.poll() is not None, 60, "services to spawn")
        assert up.poll() is None, (tmp_path / "up.out").read_text()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 128 + signal.SIGTERM, (tmp_path / "up.out").read_text()
        _assert_nothing_left(settings, up)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_ready_only_with_the_demo_tenants_and_nothing_survives_a_killed_supervisor(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    up = _up(settings)
    edge = f"{settings.host}:{settings.edge_port}"
    try:
        with grpc.insecure_channel(edge) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving(name: str) -> bool:
                try:
                    return bool(health.Check(health_pb2.HealthCheckRequest(service=name), timeout=1).status
                                == health_pb2.HealthCheckResponse.SERVING)
                except grpc.RpcError:
                    return False

            def overall_serving() -> bool:
                assert up.poll() is None, (tmp_path / "up.out").read_text()
                return serving("")

            _wait(overall_serving, 300, "the mesh to report ready")
        # The moment health says ready, the demo tenants are there (and a script may go on).
        listed = subprocess.run([sys.executable, "-m", "copilot_cli.main", "tenants", "list"], env=_env(settings),
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[0].split() == ["TENANT", "PLAN", "STATE", "CONFIG", "VERSION"]
        for tenant_id, _, _ in DEMO_TENANTS:
            assert tenant_id in listed.stdout
        status = subprocess.run([sys.executable, "-m", "copilot_cli.main", "status"], env=_env(settings),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr

        up.kill()  # SIGKILL: no handler runs; the children still go
        up.wait(timeout=10)
        _assert_nothing_left(settings, up)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_the_edge_says_not_serving_until_the_mesh_is_marked_ready(tmp_path: Path) -> None:
    """What `copilot up` relies on, without racing it: every service serves, yet the edge's
    overall health stays NOT_SERVING until the supervisor marks the mesh ready."""
    settings = replace(_settings(tmp_path), ready_file=tmp_path / "ready")
    mesh = Mesh(settings)
    mesh.start(timeout_s=120, mark_ready=False)
    try:
        with grpc.insecure_channel(mesh.edge_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(name: str) -> int:
                return int(health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status)

            assert status("copilot.v1.TenantService") == health_pb2.HealthCheckResponse.SERVING
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            mesh.mark_ready()
            _wait(lambda: status("") == health_pb2.HealthCheckResponse.SERVING, 30, "the edge to say ready")
    finally:
        mesh.stop()
