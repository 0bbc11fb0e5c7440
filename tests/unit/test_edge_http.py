"""The edge companion's HTTP side: console files, dev JWKS (re-read when it changes), and the
dev-only sign-in, which is off unless COPILOT_DEV_TOKENS is set."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jwt
import pytest

from copilot.v1 import tenant_pb2
from servers.common.issuer import JWKS_FILE, DevIssuer
from servers.edge.config import DELETED, SUSPENDED, TenantLimits
from servers.edge.http import EdgeHttp

ISSUER, AUDIENCE = "https://issuer.test", "copilot-test"


def make(tmp_path: Path, dev: bool = True) -> tuple[EdgeHttp, DevIssuer]:
    issuer = DevIssuer.load_or_create(tmp_path / "keys", ISSUER, AUDIENCE)
    web = tmp_path / "web"
    (web / "assets").mkdir(parents=True, exist_ok=True)
    (web / "index.html").write_text("<!doctype html><title>console</title>")
    (web / "assets" / "app.js").write_text("console.log(1)")
    http = EdgeHttp(keys_dir=tmp_path / "keys", jwt_issuer=ISSUER, jwt_audience=AUDIENCE, dev_tokens=dev,
                    web_dir=web, tenants=lambda: [("acme", "Acme")])
    return http, issuer


def test_serves_the_console_and_nothing_outside_it(tmp_path: Path) -> None:
    http, _ = make(tmp_path)
    index = http.handle("GET", "/", b"")
    assert index.status == 200 and index.content_type.startswith("text/html") and b"console" in index.body
    js = http.handle("GET", "/assets/app.js?v=1", b"")
    assert js.status == 200 and "javascript" in js.content_type
    for path in ("/assets/../keys/dev-signing-key.pem", "/assets/%2e%2e/x", "/keys/jwks.json", "/etc/passwd"):
        assert http.handle("GET", path, b"").status == 404, path
    assert http.handle("POST", "/", b"").status == 405


def test_the_favicon_is_served_so_browsers_log_no_error(tmp_path: Path) -> None:
    http, _ = make(tmp_path)
    icon = http.handle("GET", "/favicon.ico", b"")
    assert icon.status == 200 and icon.content_type == "image/svg+xml" and icon.body.startswith(b"<svg")
    assert ("cache-control", "max-age=86400") in icon.headers


def test_jwks_is_served_and_reread_after_rotation(tmp_path: Path) -> None:
    http, issuer = make(tmp_path)
    first = json.loads(http.handle("GET", "/.well-known/jwks.json", b"").body)
    assert [k["kid"] for k in first["keys"]] == [issuer.kid]
    rotated = DevIssuer.rotate(tmp_path / "keys", ISSUER, AUDIENCE)
    second = json.loads(http.handle("GET", "/.well-known/jwks.json", b"").body)
    # The new key, and the previous one until the tokens it signed have expired.
    assert [k["kid"] for k in second["keys"]] == [rotated.kid, issuer.kid]
    assert all("d" not in k for k in second["keys"])  # public halves only


def test_dev_sign_in_is_off_unless_enabled(tmp_path: Path) -> None:
    http, _ = make(tmp_path, dev=False)
    assert http.handle("GET", "/dev/tenants", b"").status == 404
    assert http.handle("POST", "/dev/token", b'{"tenant_id": "acme"}').status == 404


def test_dev_token_is_a_real_token_with_bounded_roles(tmp_path: Path) -> None:
    http, issuer = make(tmp_path)
    assert json.loads(http.handle("GET", "/dev/tenants", b"").body) == {
        "tenants": [{"tenant_id": "acme", "display_name": "Acme"}]}
    body = json.dumps({"tenant_id": "acme", "roles": ["member", "admin"]}).encode()
    response = http.handle("POST", "/dev/token", body)
    assert response.status == 200
    token = json.loads(response.body)["token"]
    key = jwt.PyJWKSet.from_dict(issuer.jwks()).keys[0].key
    claims = jwt.decode(token, key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["tenant_id"] == "acme" and claims["roles"] == ["admin", "member"]
    bad = {
        b'{"tenant_id": "acme", "roles": ["operator"]}': 403,
        b'{"tenant_id": "platform"}': 400,
        b'{"tenant_id": "Not A Tenant"}': 400,
        b'{"tenant_id": "acme", "ttl_s": 999999}': 400,
        b'{"tenant_id": "acme", "roles": []}': 400,
        b"not json": 400,
        b"[]": 400,
    }
    for body, status in bad.items():
        assert http.handle("POST", "/dev/token", body).status == status, body


async def test_http_server_speaks_http11_with_keep_alive(tmp_path: Path) -> None:
    http, _ = make(tmp_path)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await http.start("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # two requests on one connection
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(3) == b"ok\n"
        writer.write(b"POST /dev/token HTTP/1.1\r\ncontent-length: 999999\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413")
        writer.close()
    finally:
        await http.stop()


async def test_tenant_table_marks_suspended_and_deleted_tenants() -> None:
    listed = [tenant_pb2.Tenant(tenant_id="acme", state=tenant_pb2.TENANT_STATE_ACTIVE),
              tenant_pb2.Tenant(tenant_id="frozen", state=tenant_pb2.TENANT_STATE_SUSPENDED),
              tenant_pb2.Tenant(tenant_id="gone", state=tenant_pb2.TENANT_STATE_ACTIVE)]

    async def source() -> list[tenant_pb2.Tenant]:
        return list(listed)

    limits = TenantLimits(source, 60)
    assert await limits.refresh()
    assert limits.refused == {"frozen": SUSPENDED}
    assert [t for t, _ in limits.active_tenants()] == ["acme", "gone"]
    del listed[2]
    listed.append(tenant_pb2.Tenant(tenant_id="newcomer"))
    assert await limits.refresh()
    assert limits.refused == {"frozen": SUSPENDED, "gone": DELETED}
    # Still deleted on the next load; back when re-created.
    assert await limits.refresh()
    assert limits.refused["gone"] == DELETED
    listed.append(tenant_pb2.Tenant(tenant_id="gone"))
    assert await limits.refresh()
    assert "gone" not in limits.refused


@pytest.mark.parametrize("why", [SUSPENDED, DELETED])
def test_refusal_response_carries_permission_denied_details(why: str) -> None:
    import base64

    from google.rpc import code_pb2, error_details_pb2, status_pb2

    from servers.edge.service import DENIED_HEADER, OVER_LIMIT, denied_response

    response = denied_response("acme", why, 1, 0)
    assert response.overall_code == OVER_LIMIT
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert headers[DENIED_HEADER] == why
    status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    assert status.code == code_pb2.PERMISSION_DENIED and status.message == f"tenant acme is {why}"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == f"TENANT_{why.upper()}"


def test_jwks_file_name_is_what_envoy_fetches() -> None:
    assert JWKS_FILE == "jwks.json"
