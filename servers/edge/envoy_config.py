"""Renders Envoy's config from envoy/envoy.yaml.tmpl and the process settings.

The template keeps the config readable as Envoy YAML; only ports, addresses, JWT
parameters and a few policy knobs are filled in here, so `make run`, the tests (on free
ports) and a production deployment all run the same config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from string import Template

from servers.common.lifecycle import MAX_MESSAGE_BYTES
from servers.common.settings import Settings

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml.tmpl"

# gRPC frames a message with 5 bytes, so a body this size still carries the largest
# message the services accept.
MAX_REQUEST_BYTES = MAX_MESSAGE_BYTES + 5

# The rate limit check is on every request's path: when it is slow, the failure mode
# (fail open/closed) decides rather than the client waiting.
RATELIMIT_TIMEOUT_S = 0.2

HEALTH_INTERVAL_S = 2


def _yaml_str(value: str) -> str:
    # JSON strings are valid YAML scalars and escape anything a value could contain.
    return json.dumps(value)


def _origins(allowed_origins: Sequence[str] | None) -> str:
    if not allowed_origins:
        # Dev: any origin. Tokens travel in the Authorization header (no cookies), so an
        # open origin policy grants a page nothing its user's token does not.
        return json.dumps([{"safe_regex": {"regex": ".*"}}])
    return json.dumps([{"exact": origin} for origin in allowed_origins])


def render(settings: Settings, jwks_path: Path, *, allowed_origins: Sequence[str] | None = None,
           template_path: Path = TEMPLATE_PATH) -> str:
    """Envoy's YAML config for `settings`, verifying tokens against the JWKS file at `jwks_path`."""
    values = {
        "HOST": _yaml_str(settings.host),
        "EDGE_PORT": settings.edge_port,
        "ADMIN_PORT": settings.envoy_admin_port,
        "RETRIEVAL_PORT": settings.retrieval_port,
        "GENERATION_PORT": settings.generation_port,
        "METERING_PORT": settings.metering_port,
        "EDGE_SERVICES_PORT": settings.edge_services_port,
        "JWT_ISSUER": _yaml_str(settings.jwt_issuer),
        "JWT_AUDIENCE": _yaml_str(settings.jwt_audience),
        "JWKS_PATH": _yaml_str(str(jwks_path.resolve())),
        "FAILURE_MODE_DENY": "false" if settings.ratelimit_fail_open else "true",
        "RATELIMIT_TIMEOUT": f"{RATELIMIT_TIMEOUT_S}s",
        "HEALTH_INTERVAL": f"{HEALTH_INTERVAL_S}s",
        "MAX_REQUEST_BYTES": MAX_REQUEST_BYTES,
        "CORS_ORIGINS": _origins(allowed_origins),
    }
    return Template(template_path.read_text()).substitute(values)


def write(settings: Settings, jwks_path: Path, out_path: Path, *,
          allowed_origins: Sequence[str] | None = None) -> Path:
    """Renders the config to `out_path` (atomically, so Envoy never reads half a file)."""
    text = render(settings, jwks_path, allowed_origins=allowed_origins)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(out_path)
    return out_path
