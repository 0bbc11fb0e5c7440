"""compose.yaml cannot run here (no Docker): check its structure, and that the Envoy config it
renders from its environment is one Envoy accepts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from copilot_cli.supervisor import SERVERS

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("metering", "retrieval", "generation", "edge")
INFRA = ("envoy", "redis", "clickhouse", "weaviate", "otel-collector")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _interpolate(value: str, env: dict[str, str]) -> str:
    # ${VAR:-default} and ${VAR}, as compose does.
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def copilot_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    env = compose()["x-copilot-env"]
    return {k: _interpolate(str(v), overrides or {}) for k, v in env.items()}


def test_every_part_of_the_stack_is_there() -> None:
    services = compose()["services"]
    assert set(SERVICES) | set(INFRA) <= set(services)
    assert services["envoy"]["image"].startswith("envoyproxy/envoy:v1.40")


def test_the_four_services_are_one_image_run_as_make_run_runs_them() -> None:
    services = compose()["services"]
    assert set(SERVICES) == set(SERVERS)
    images = {services[name]["image"] for name in SERVICES}
    assert images == {"compliance-copilot:latest"}
    for name in SERVICES:
        service = services[name]
        # The supervisor runs `python -m servers.<name>`; so does compose.
        assert service["command"] == ["python", "-m", f"servers.{name}"], name
        # One network namespace with Envoy: the loopback addresses of `make run`.
        assert service["network_mode"] == "service:envoy"
        assert service["environment"] == services["metering"]["environment"]


def test_health_checks_and_dependency_order() -> None:
    services = compose()["services"]
    for name in (*SERVICES, "envoy", "redis", "clickhouse", "weaviate"):
        assert services[name].get("healthcheck", {}).get("test"), name
    deps = {name: set(s.get("depends_on", {})) for name, s in services.items()}
    # Acyclic, and everything a service depends on exists.
    order: list[str] = []
    pending = dict(deps)
    while pending:
        ready = sorted(n for n, d in pending.items() if d <= set(order))
        assert ready, f"dependency cycle among {sorted(pending)}"
        order.extend(ready)
        for n in ready:
            del pending[n]
    assert order.index("envoy-config") < order.index("envoy") < order.index("metering")
    assert order.index("metering") < order.index("generation") and order.index("retrieval") < order.index("generation")
    gen = services["generation"]["depends_on"]
    assert gen["metering"]["condition"] == gen["retrieval"]["condition"] == "service_healthy"
    assert services["edge"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_only_the_environment_differs_and_never_enables_dev_sign_in() -> None:
    env = copilot_env()
    assert "COPILOT_DEV_TOKENS" not in env
    for service in compose()["services"].values():
        assert "COPILOT_DEV_TOKENS" not in (service.get("environment") or {})
    for key in ("REDIS_URL", "CLICKHOUSE_URL", "WEAVIATE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "COPILOT_JWKS_URL",
                "COPILOT_JWT_ISSUER", "COPILOT_JWT_AUDIENCE"):
        assert key in env
    # Every COPILOT_* variable it sets is one the code reads.
    source = "\n".join(p.read_text() for p in (ROOT / "servers").rglob("*.py"))
    for key in env:
        if key.startswith("COPILOT_"):
            assert f'"{key}"' in source, key
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "web/build.mjs" in dockerfile and "requirements.lock" in dockerfile


def _envoy() -> str | None:
    candidate = Path(sys.executable).with_name("envoy")
    return str(candidate) if candidate.exists() else shutil.which("envoy")


@pytest.mark.skipif(_envoy() is None, reason="envoy is not installed")
@pytest.mark.parametrize("jwks_url", ["", "https://idp.example.com/.well-known/jwks.json"])
def test_the_envoy_config_compose_renders_is_valid(tmp_path: Path, jwks_url: str) -> None:
    env = {**os.environ, **copilot_env({"COPILOT_JWKS_URL": jwks_url}), "COPILOT_DATA_DIR": str(tmp_path / "data")}
    out = tmp_path / "envoy.yaml"
    # The same command as compose's envoy-config service (its --dev-keys makes the dev key pair).
    command = compose()["services"]["envoy-config"]["command"]
    assert command[:3] == ["python", "-m", "servers.edge.envoy_config"]
    subprocess.run([sys.executable, "-m", "servers.edge.envoy_config", str(out), *command[4:]], env=env, cwd=ROOT,
                   check=True, capture_output=True, timeout=60)
    text = out.read_text()
    assert '"0.0.0.0"' in text  # the public listener, reachable from outside the container
    assert (tmp_path / "data" / "keys" / "jwks.json").exists() != bool(jwks_url)
    proc = subprocess.run([_envoy() or "envoy", "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
