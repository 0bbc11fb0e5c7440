"""The edge companion's small HTTP side, behind Envoy like everything else:

- `GET /` and `GET /assets/*`: the browser console (web/, bundled into web/dist by setup);
- `GET /favicon.ico`: a small icon, so browsers do not log a failed request;
- `GET /.well-known/jwks.json`: the dev issuer's JWKS, which Envoy's jwt_authn fetches and
  refreshes (so rotating the dev key needs no restart). Read from the file again whenever it
  changes. In production Envoy fetches the identity provider's JWKS (`COPILOT_JWKS_URL`);
- `GET /dev/tenants` and `POST /dev/token`: dev only (`COPILOT_DEV_TOKENS=1`, which `copilot up`
  sets and no production config does): the console's "pick a demo tenant" sign-in.

A few routes of static files and JSON do not justify a web framework: this is asyncio
streams with just enough HTTP/1.1 (keep-alive, Content-Length bodies) for Envoy's upstream
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from servers.common import identity
from servers.common.issuer import JWKS_FILE, DevIssuer

log = logging.getLogger("copilot.edge.http")

WEB_DIR = Path(__file__).resolve().parents[2] / "web" / "dist"
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 16 * 1024
IDLE_TIMEOUT_S = 60.0
# Roles the dev endpoint hands out; operator tokens come from the CLI (`copilot token`).
DEV_ROLES = frozenset({identity.MEMBER, identity.ADMIN})
DEV_TOKEN_MAX_TTL_S = 8 * 3600
# Browsers ask for /favicon.ico on every page; without one the browser console logs an
# error (it used to answer 401). A tiny SVG (every current browser takes SVG here) kept in
# code, so it is there even before the console is built.
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
           b'<rect width="32" height="32" rx="6" fill="#1f4e79"/>'
           b'<path d="M9 17l5 5 9-11" fill="none" stroke="#fff" stroke-width="3.5" '
           b'stroke-linecap="round" stroke-linejoin="round"/></svg>')
_ASSET_RE = re.compile(r"^/assets/[A-Za-z0-9_.-]+$")
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, value: object) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json",
                    (("cache-control", "no-store"),))


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


@dataclass
class _CachedFile:
    path: Path
    mtime_ns: int = -1
    data: bytes | None = None

    def read(self) -> bytes | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        if stat.st_mtime_ns != self.mtime_ns or self.data is None:
            try:
                self.data = self.path.read_bytes()
            except OSError:
                return None
            self.mtime_ns = stat.st_mtime_ns
        return self.data


@dataclass
class EdgeHttp:
    keys_dir: Path
    jwt_issuer: str
    jwt_audience: str
    dev_tokens: bool
    web_dir: Path = WEB_DIR
    # The tenants the dev sign-in offers: (tenant id, display name) of active tenants.
    tenants: Callable[[], list[tuple[str, str]]] = list
    _jwks: _CachedFile = field(init=False)
    _files: dict[str, _CachedFile] = field(default_factory=dict, init=False)
    _issuer: DevIssuer | None = field(default=None, init=False)
    _server: asyncio.Server | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._jwks = _CachedFile(self.keys_dir / JWKS_FILE)

    # -- routes

    def handle(self, method: str, path: str, body: bytes) -> Response:
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/.well-known/jwks.json":
            if method != "GET":
                return _error(405, "use GET")
            data = self._jwks.read()
            if data is None:
                return _error(404, "no dev JWKS here (production uses the identity provider's)")
            return Response(200, data, "application/json", (("cache-control", "max-age=5"),))
        if path.startswith("/dev/"):
            return self._dev(method, path, body)
        if method != "GET":
            return _error(405, "use GET")
        if path == "/favicon.ico":
            return Response(200, FAVICON, "image/svg+xml", (("cache-control", "max-age=86400"),
                                                             ("x-content-type-options", "nosniff")))
        if path in ("/", "/index.html"):
            return self._file("index.html", "no-cache")
        if _ASSET_RE.match(path):
            return self._file(path.removeprefix("/"), "no-cache")
        return _error(404, f"no such page: {path}")

    def _file(self, name: str, cache: str) -> Response:
        cached = self._files.get(name)
        if cached is None:
            cached = self._files[name] = _CachedFile(self.web_dir / name)
        data = cached.read()
        if data is None:
            if name == "index.html":
                return Response(503, b"the browser console is not built: run `make setup` (npm run build)\n")
            return _error(404, f"no such file: /{name}")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type in ("application/javascript", "text/javascript"):
            content_type += "; charset=utf-8"
        return Response(200, data, content_type, (("cache-control", cache),
                                                  ("x-content-type-options", "nosniff")))

    def _dev(self, method: str, path: str, body: bytes) -> Response:
        if not self.dev_tokens:
            return _error(404, "dev sign-in is off (COPILOT_DEV_TOKENS)")
        if path == "/dev/tenants" and method == "GET":
            return _json(200, {"tenants": [{"tenant_id": t, "display_name": n} for t, n in self.tenants()]})
        if path == "/dev/token" and method == "POST":
            return self._mint(body)
        return _error(404, f"no such dev endpoint: {method} {path}")

    def _mint(self, body: bytes) -> Response:
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(request, dict):
            return _error(400, "the body must be a JSON object")
        tenant = request.get("tenant_id")
        if not isinstance(tenant, str) or not identity.TENANT_ID_RE.match(tenant) \
                or tenant == identity.PLATFORM_TENANT:
            return _error(400, "tenant_id must be a customer tenant id")
        roles = request.get("roles", [identity.MEMBER])
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
            return _error(400, "roles must be a non-empty list")
        if not set(roles) <= DEV_ROLES:
            return _error(403, f"the dev sign-in only grants {', '.join(sorted(DEV_ROLES))}")
        user = request.get("user", "dev-user")
        if not isinstance(user, str) or not 0 < len(user) <= 64:
            return _error(400, "user must be 1..64 characters")
        ttl = request.get("ttl_s", 3600)
        if not isinstance(ttl, int) or not 1 <= ttl <= DEV_TOKEN_MAX_TTL_S:
            return _error(400, f"ttl_s must be 1..{DEV_TOKEN_MAX_TTL_S}")
        issuer = self._dev_issuer()
        if issuer is None:
            return _error(503, "no dev signing key (start the mesh with `copilot up`)")
        token = issuer.mint(tenant, user, roles, ttl_s=ttl)
        return _json(200, {"token": token, "tenant_id": tenant, "roles": sorted(set(roles)), "expires_in": ttl})

    def _dev_issuer(self) -> DevIssuer | None:
        if self._issuer is None:
            try:
                self._issuer = DevIssuer.load_or_create(self.keys_dir, self.jwt_issuer, self.jwt_audience,
                                                        create=False, write_jwks=False)
            except (FileNotFoundError, ValueError):
                return None
        return self._issuer

    # -- HTTP/1.1

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEADER_BYTES)
        log.info("edge http listening", extra={"address": f"{host}:{port}", "dev_tokens": self.dev_tokens})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    return
                method, path, version = parts
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0) if headers.get(
                    "content-length", "0").isdigit() else -1
                keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                if length < 0 or length > MAX_BODY_BYTES or "transfer-encoding" in headers:
                    response, keep_alive = _error(413, "body too large or chunked"), False
                else:
                    body = await reader.readexactly(length) if length else b""
                    try:
                        response = self.handle(method, path, body)
                    except Exception:
                        log.exception("edge http handler failed")
                        response = _error(500, "internal error")
                self._write(writer, response, head_only=method == "HEAD", keep_alive=keep_alive)
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool, keep_alive: bool) -> None:
        head = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}",
                f"content-type: {response.content_type}", f"content-length: {len(response.body)}",
                f"connection: {'keep-alive' if keep_alive else 'close'}",
                *(f"{k}: {v}" for k, v in response.headers)]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else response.body))
