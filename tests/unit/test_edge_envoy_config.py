"""The Envoy config renders for any ports and settings, and Envoy itself accepts it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from servers.common.settings import Settings
from servers.edge import envoy_config


def envoy_binary() -> str | None:
    candidate = Path(sys.executable).with_name("envoy")
    return str(candidate) if candidate.exists() else shutil.which("envoy")


def settings(**overrides: object) -> Settings:
    ports = dict(edge_port=18080, envoy_admin_port=19901, retrieval_port=15051, generation_port=15052,
                 metering_port=15053, edge_services_port=15054)
    return dataclasses.replace(Settings.from_env(), host="127.0.0.1", **{**ports, **overrides})  # type: ignore[arg-type]


def jwks(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "jwks.json"
    if not path.exists():
        # Envoy parses the JWKS at start-up (and in validate mode), so it must be a real one.
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": "test", "alg": "RS256", "use": "sig"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"keys": [jwk]}))
    return path


def test_render_fills_every_placeholder(tmp_path: Path) -> None:
    s = settings(edge_port=28080, envoy_admin_port=29901, retrieval_port=25051, generation_port=25052,
                 metering_port=25053, edge_services_port=25054)
    text = envoy_config.render(s, jwks(tmp_path))
    assert "${" not in text
    for port in (28080, 29901, 25051, 25052, 25053, 25054):
        assert f"port_value: {port}" in text
    assert json.dumps(s.jwt_issuer) in text and json.dumps(s.jwt_audience) in text
    assert json.dumps(str((tmp_path / "keys" / "jwks.json").resolve())) in text
    assert "rate_limited_as_resource_exhausted: true" in text


def test_filter_order_strips_identity_headers_before_anything_reads_them(tmp_path: Path) -> None:
    text = envoy_config.render(settings(), jwks(tmp_path))
    filters = [line.split("name:")[1].strip() for line in text.splitlines()
               if line.strip().startswith("- name: envoy.filters.http.")]
    assert filters == [
        "envoy.filters.http.header_mutation", "envoy.filters.http.cors", "envoy.filters.http.grpc_web",
        "envoy.filters.http.jwt_authn", "envoy.filters.http.ratelimit", "envoy.filters.http.buffer",
        "envoy.filters.http.router",
    ]
    for header in ("x-tenant-id", "x-user-id", "x-roles"):
        assert f"- remove: {header}" in text


def test_failure_mode_follows_the_setting(tmp_path: Path) -> None:
    assert "failure_mode_deny: false" in envoy_config.render(settings(ratelimit_fail_open=True), jwks(tmp_path))
    assert "failure_mode_deny: true" in envoy_config.render(settings(ratelimit_fail_open=False), jwks(tmp_path))


def test_cors_origins_any_in_dev_or_a_given_list(tmp_path: Path) -> None:
    assert '[{"safe_regex": {"regex": ".*"}}]' in envoy_config.render(settings(), jwks(tmp_path))
    text = envoy_config.render(settings(), jwks(tmp_path), allowed_origins=["https://console.example"])
    assert '[{"exact": "https://console.example"}]' in text


def test_write_is_atomic_and_returns_the_path(tmp_path: Path) -> None:
    out = envoy_config.write(settings(), jwks(tmp_path), tmp_path / "run" / "envoy.yaml")
    assert out.read_text() == envoy_config.render(settings(), jwks(tmp_path))
    assert [p.name for p in out.parent.iterdir()] == ["envoy.yaml"]


@pytest.mark.skipif(envoy_binary() is None, reason="envoy is not installed")
@pytest.mark.parametrize("fail_open", [True, False])
async def test_envoy_validates_the_rendered_config(tmp_path: Path, fail_open: bool) -> None:
    out = envoy_config.write(settings(ratelimit_fail_open=fail_open), jwks(tmp_path), tmp_path / "envoy.yaml")
    binary = envoy_binary()
    assert binary is not None
    proc = await asyncio.create_subprocess_exec(
        binary, "--mode", "validate", "-c", str(out), "--disable-hot-restart",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "OK" in text
    # Deprecated fields (e.g. route-level cors) would warn here.
    assert "deprecated" not in text.lower(), text
