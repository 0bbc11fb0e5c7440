"""One typed settings model per process, parsed once from the environment.

Every knob a deployment changes is an environment variable, so `make run` and the
production-like stack differ only in their environment. Each knob is declared once, as a
field of a frozen dataclass made with `setting(...)`: its variable, default, bounds or
choices and one line saying what it is for. `parse(Section)` is the one parser (and this
module the only reader of the environment): it converts by the field's type, checks bounds
and choices, and reports every bad variable at once by name. Sections: `Settings` (shared by
every process: addresses, identity, telemetry, metering's stores), and one per service that
has knobs of its own (`servers/retrieval/config.py`, `servers/generation/config.py`,
`copilot_cli/config.py`). `to_env` is the inverse, so a supervisor hands its children the very
settings it holds; docs/configuration.md is generated from the declarations
(`python -m scripts.config_docs`).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")

_META = "copilot_setting"
_SECTION = "copilot_section"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """One or more environment variables hold values the process cannot run with; the
    message names each variable, what it must be and what it was."""


@dataclass(frozen=True, slots=True)
class Spec:
    """What the parser and the docs know of one setting."""

    env: str
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    # Shown as "(unset)" / "(set)" in docs and never echoed in an error.
    secret: bool = False
    # The default as the docs show it, where the code computes it (e.g. from the CPU count).
    shown_default: str | None = None


def setting(default: Any = dataclasses.MISSING, *, env: str, doc: str, low: float | None = None,
            high: float | None = None, choices: tuple[str, ...] = (), secret: bool = False,
            default_factory: Callable[[], Any] | None = None, shown_default: str | None = None) -> Any:
    """A field of a settings section, read from `env`."""
    spec = Spec(env=env, doc=doc, low=low, high=high, choices=choices, secret=secret, shown_default=shown_default)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={_META: spec})
    return field(default=default, metadata={_META: spec})


def section(cls: type[Any]) -> Any:
    """A field holding a nested section (its own settings, parsed from the same environment)."""
    return field(default_factory=cls, metadata={_SECTION: True})


def is_section(f: dataclasses.Field[Any]) -> bool:
    return bool(f.metadata.get(_SECTION))


def spec_of(f: dataclasses.Field[Any]) -> Spec | None:
    spec = f.metadata.get(_META)
    return spec if isinstance(spec, Spec) else None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _describe(tp: Any, spec: Spec) -> str:
    base, _ = _optional(tp)
    if spec.choices:
        return "one of " + ", ".join(spec.choices)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in base)
    words = {bool: "a boolean (1/0, true/false, yes/no, on/off)", int: "an integer", float: "a number",
             str: "a string", Path: "a path"}
    what = words.get(base, getattr(base, "__name__", str(base)))
    if spec.low is not None and spec.high is not None:
        what += f" from {_num(spec.low)} to {_num(spec.high)}"
    elif spec.low is not None:
        what += f" of at least {_num(spec.low)}"
    elif spec.high is not None:
        what += f" of at most {_num(spec.high)}"
    return what


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _convert(raw: str, tp: Any, spec: Spec) -> Any:
    base, _ = _optional(tp)
    text = raw.strip()
    if base is bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError
    if base is int:
        return int(text)
    if base is float:
        return float(text)
    if base is Path:
        return Path(text).expanduser()
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return base(text.lower())
    if spec.choices:
        return text.lower()
    return text


def _check(value: Any, tp: Any, spec: Spec) -> bool:
    if value is None:
        return _optional(tp)[1]
    if spec.choices and value not in spec.choices:
        return False
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        if value != value:  # NaN
            return False
        if spec.low is not None and value < spec.low:
            return False
        if spec.high is not None and value > spec.high:
            return False
    return True


def _shown(value: Any, spec: Spec) -> str:
    if spec.secret:
        return "(set)" if value else "(unset)"
    return repr(value.value if isinstance(value, enum.Enum) else str(value) if isinstance(value, Path) else value)


def validate(section: Any) -> None:
    """Checks every setting of a section instance (bounds, choices, None where allowed);
    raises SettingsError naming each bad variable. Runs on construction, so a value set
    through `dataclasses.replace` is held to the same rules as one read from the environment."""
    hints = _hints(type(section))
    problems = []
    for f in dataclasses.fields(section):
        spec = spec_of(f)
        if spec is None:
            continue
        value = getattr(section, f.name)
        if not _check(value, hints[f.name], spec):
            problems.append(f"{spec.env} must be {_describe(hints[f.name], spec)}, got {_shown(value, spec)}")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

S = TypeVar("S", bound="DataclassInstance")


def parse(cls: type[S], environ: Mapping[str, str] | None = None, **fixed: Any) -> S:
    """The section `cls` from the environment (default: this process's). An unset or empty
    variable takes the default; every bad one is reported at once. `fixed` sets fields the
    caller already knows (not read from the environment)."""
    env = os.environ if environ is None else environ
    hints = _hints(cls)
    values: dict[str, Any] = dict(fixed)
    problems: list[str] = []
    for f in dataclasses.fields(cls):
        if is_section(f) and f.name not in fixed:
            try:
                values[f.name] = parse(hints[f.name], env)
            except SettingsError as exc:
                problems.extend(line.strip() for line in str(exc).splitlines()[1:])
            continue
        spec = spec_of(f)
        if spec is None or f.name in fixed:
            continue
        raw = env.get(spec.env, "")
        if not raw.strip():
            continue
        try:
            value = _convert(raw, hints[f.name], spec)
        except ValueError:
            value = dataclasses.MISSING
        if value is dataclasses.MISSING or not _check(value, hints[f.name], spec):
            got = "(hidden)" if spec.secret else repr(raw)
            problems.append(f"{spec.env} must be {_describe(hints[f.name], spec)}, got {got}")
            continue
        values[f.name] = value
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    return cls(**values)


def to_env(section: Any) -> dict[str, str]:
    """The environment variables that give a child process the settings of `section`
    (those at their default included, so the child does not depend on its own defaults)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(section):
        if is_section(f):
            out.update(to_env(getattr(section, f.name)))
            continue
        spec = spec_of(f)
        if spec is None:
            continue
        value = getattr(section, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            out[spec.env] = "1" if value else "0"
        elif isinstance(value, enum.Enum):
            out[spec.env] = str(value.value)
        else:
            out[spec.env] = str(value)
    return out


def user_cache_dir() -> Path:
    """The user's cache directory (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache").expanduser()


def library_defaults(**values: str) -> None:
    """Environment variables that third-party libraries read themselves (e.g. Hugging Face's
    offline switches), set unless the user set them: the one place this process writes them."""
    for name, value in values.items():
        os.environ.setdefault(name, value)


def environment(*layers: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with `layers` on top, later ones winning: what a child
    process starts with."""
    merged = dict(os.environ)
    for layer in layers:
        merged.update(layer)
    return merged


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the configuration table."""

    env: str
    default: str
    what: str
    doc: str


def rows(cls: type) -> Iterator[Row]:
    """The configuration table's lines for a section class, in declaration order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        if spec is None:
            continue
        if spec.shown_default is not None:
            default = spec.shown_default
        elif f.default is not dataclasses.MISSING:
            default = "(unset)" if f.default is None else _plain(f.default)
        else:
            default = "(computed)"
        yield Row(env=spec.env, default=default, what=_describe(hints[f.name], spec), doc=spec.doc)


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


DEFAULT_PORTS = {
    "edge": 8080,  # Envoy's public listener
    "envoy_admin": 9901,
    "retrieval": 50051,
    "generation": 50052,
    "metering": 50053,
    "edge_services": 50054,  # rate limit service, aggregated health and reflection
    "edge_http": 50055,
}

METRICS_OFFSETS = {"retrieval": 1, "generation": 2, "metering": 3, "edge": 4}

# Processes that run as COPILOT_REPLICAS replicas (docs/scale-out.md says how each one's state
# is shared or owned), and the ports they listen on: replica i listens on the port of replica 0
# + i * COPILOT_REPLICA_PORT_STRIDE (its metrics port too).
REPLICATED_SERVICES = ("retrieval", "generation", "metering", "edge")
REPLICATED_PORTS = frozenset({"retrieval", "generation", "metering", "edge_services", "edge_http"})
# Services whose replicas share one data directory: retrieval's tenant files (every replica
# reads and writes them, coherently) and metering's stores (used by the one active replica;
# the others stand by for its lock). The others' replicas each keep their own.
SHARED_DATA_SERVICES = frozenset({"retrieval", "metering"})

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Bounds:
    """What one client may cost the mesh: message sizes, open streams, idle and overall
    durations. Each is enforced by the services (servers/common/bounds.py) and, where Envoy
    can, by the edge too (servers/edge/envoy_config.py); docs/bounds.md lists them all with
    the error a client sees."""

    # Refusing more keeps the hot path's decoding and embedding bounded.
    query_request_bytes: int = setting(64 * KIB, env="COPILOT_MAX_QUERY_REQUEST_BYTES", low=1,
                                       doc="Largest Answer, StreamAnswer or Search request: a question or a "
                                           "search is a sentence or a page of filters.")
    ingest_request_bytes: int = setting(16 * MIB, env="COPILOT_MAX_INGEST_REQUEST_BYTES", low=1,
                                        doc="Largest IngestDocuments batch (and the services' usage and audit "
                                            "batches): a sizeable document set in one call, far below a "
                                            "process's memory.")
    ingest_stream_message_bytes: int = setting(4 * MIB, env="COPILOT_MAX_INGEST_STREAM_MESSAGE_BYTES", low=1,
                                               doc="Largest message on StreamIngestDocuments: streaming is for "
                                                   "large corpora in small steps.")
    default_request_bytes: int = setting(1 * MIB, env="COPILOT_MAX_REQUEST_BYTES", low=1,
                                         doc="Largest request of every other RPC (tenant admin, usage, audit).")
    streams_per_tenant: int = setting(32, env="COPILOT_MAX_STREAMS_PER_TENANT", low=1,
                                      doc="Open streams one tenant may hold on one server process (answers, "
                                          "uploads, exports, watches).")
    streams_per_server: int = setting(512, env="COPILOT_MAX_STREAMS_PER_SERVER", low=1,
                                      doc="Open streams on one server process, all tenants together.")
    max_concurrent_rpcs: int = setting(2048, env="COPILOT_MAX_CONCURRENT_RPCS", low=1,
                                       doc="RPCs one server process runs at once; beyond it gRPC refuses at once "
                                           "(RESOURCE_EXHAUSTED) rather than queueing without bound.")
    ingest_idle_s: float = setting(30.0, env="COPILOT_INGEST_IDLE_S", low=0.001,
                                   doc="An upload that sends nothing for this long is ended (DEADLINE_EXCEEDED).")
    stream_send_timeout_s: float = setting(30.0, env="COPILOT_STREAM_SEND_TIMEOUT_S", low=0.001,
                                           doc="A server stream whose client takes no message for this long is "
                                               "flagged as a slow consumer.")
    max_call_s: float = setting(120.0, env="COPILOT_MAX_CALL_S", low=0.001,
                                doc="Deadline of a unary call that came without one.")
    max_stream_s: float = setting(3600.0, env="COPILOT_MAX_STREAM_S", low=0.001,
                                  doc="Deadline of a stream that came without one (watches reconnect after it).")
    edge_stream_idle_s: float = setting(300.0, env="COPILOT_EDGE_STREAM_IDLE_S", low=0.001,
                                        doc="Envoy resets a stream with no bytes either way for this long.")
    edge_streams_per_connection: int = setting(256, env="COPILOT_EDGE_STREAMS_PER_CONNECTION", low=1,
                                               doc="Streams one client connection may open at once at the edge.")
    edge_max_request_headers_kb: int = setting(32, env="COPILOT_EDGE_MAX_REQUEST_HEADERS_KB", low=1, high=8192,
                                               doc="Request headers of one call at the edge (a JWT is ~1 KiB; an "
                                                   "oversized garbage token still gets a clean UNAUTHENTICATED).")
    edge_stream_window_bytes: int = setting(1 * MIB, env="COPILOT_EDGE_STREAM_WINDOW_BYTES", low=65535,
                                            doc="Envoy's HTTP/2 flow-control window per stream towards clients.")
    edge_upstream_requests: int = setting(2048, env="COPILOT_EDGE_UPSTREAM_REQUESTS", low=1,
                                          doc="Requests in flight to one upstream cluster (circuit breaker); "
                                              "beyond it Envoy answers UNAVAILABLE at once.")
    edge_max_heap_bytes: int = setting(1024 * MIB, env="COPILOT_EDGE_MAX_HEAP_BYTES", low=16 * MIB,
                                       doc="Envoy's heap: above 90 % it resets the streams holding the most "
                                           "buffered memory, above 95 % it refuses new requests.")

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Bounds:
        return parse(cls, environ)

    def env(self) -> dict[str, str]:
        """The environment that gives a child process these bounds."""
        return to_env(self)


# Bounds field -> its environment variable (named in the errors clients see).
BOUNDS_ENV = {f.name: spec.env for f in dataclasses.fields(Bounds) if (spec := spec_of(f)) is not None}


@dataclass(frozen=True)
class Settings:
    """What every process of the mesh shares: where things are, who signs tokens, where
    telemetry goes, and the stores metering writes."""

    data_dir: Path = setting(Path(".copilot"), env="COPILOT_DATA_DIR",
                             doc="Directory that holds all state of the embedded default (one folder per service).")
    host: str = setting("127.0.0.1", env="COPILOT_HOST", doc="Address the services listen on and call each other at.")
    edge_port: int = setting(DEFAULT_PORTS["edge"], env="COPILOT_EDGE_PORT", doc="Envoy's public listener.",
                             low=0, high=65535)
    envoy_admin_port: int = setting(DEFAULT_PORTS["envoy_admin"], env="COPILOT_ENVOY_ADMIN_PORT",
                                    doc="Envoy's admin interface (loopback only).", low=0, high=65535)
    retrieval_port: int = setting(DEFAULT_PORTS["retrieval"], env="COPILOT_RETRIEVAL_PORT",
                                  doc="Retrieval service.", low=0, high=65535)
    generation_port: int = setting(DEFAULT_PORTS["generation"], env="COPILOT_GENERATION_PORT",
                                   doc="Generation service.", low=0, high=65535)
    metering_port: int = setting(DEFAULT_PORTS["metering"], env="COPILOT_METERING_PORT",
                                 doc="Metering service (usage, tenants, audit).", low=0, high=65535)
    edge_services_port: int = setting(DEFAULT_PORTS["edge_services"], env="COPILOT_EDGE_SERVICES_PORT",
                                      doc="Edge companion: rate limit service, aggregated health and reflection.",
                                      low=0, high=65535)
    edge_http_port: int = setting(DEFAULT_PORTS["edge_http"], env="COPILOT_EDGE_HTTP_PORT",
                                  doc="Edge companion's HTTP side: the browser console, the dev JWKS and dev tokens.",
                                  low=0, high=65535)
    metrics_port_base: int = setting(9100, env="COPILOT_METRICS_PORT_BASE",
                                     doc="/metrics of the retrieval, generation, metering and edge processes are on "
                                         "this port + 1, 2, 3, 4; 0 turns them off.", low=0, high=65535)
    # Scale-out (docs/scale-out.md): every service runs as N processes, balanced by Envoy.
    replicas: int = setting(1, env="COPILOT_REPLICAS", low=1, high=32,
                            doc="Processes each of retrieval, generation, metering and the edge companion run "
                                "as (Envoy balances over them; one metering is active, the others stand by); "
                                "more than 1 needs REDIS_URL, which `copilot up` provides itself from a local "
                                "redis-server when unset.")
    replica: int = setting(0, env="COPILOT_REPLICA", low=0, high=31,
                           doc="This process's replica index (0 .. COPILOT_REPLICAS-1), set by the supervisor "
                               "for each replica: its ports and its data sub-directory follow from it.")
    # Wide enough that the default service ports (50051-50055, 9101-9104) of replica i never meet
    # another replica's; tests pick a narrow one over a block of free ports.
    replica_port_stride: int = setting(100, env="COPILOT_REPLICA_PORT_STRIDE", low=1, high=10_000,
                                       doc="Replica i of a replicated service listens on replica 0's ports "
                                           "(gRPC, HTTP, metrics) + i times this.")
    # A standby metering replica takes over this long at most after the active one dies (plus
    # the time to open its stores); each poll is one non-blocking flock, so polling often is cheap.
    leadership_poll_s: float = setting(0.2, env="COPILOT_LEADERSHIP_POLL_S", low=0.01, high=60,
                                       doc="How often a standby metering replica tries the leadership lock "
                                           "(`<data>/metering/active.lock`) held by the active one.")
    metrics_max_tenants: int = setting(50, env="COPILOT_METRICS_MAX_TENANTS", low=0, high=100_000,
                                       doc="Tenants with their own series in per-tenant metrics; the rest are "
                                           "folded into tenant=\"_other\" (bounds the series count).")
    jwt_issuer: str = setting("https://copilot.dev.local", env="COPILOT_JWT_ISSUER",
                              doc="The `iss` every token must carry.")
    jwt_audience: str = setting("compliance-copilot", env="COPILOT_JWT_AUDIENCE",
                                doc="The `aud` every token must carry.")
    # Identity providers name the group claim differently (Azure AD `groups`, Keycloak
    # `groups`, Okta often a custom name): the edge reads this one into x-groups.
    groups_claim: str = setting("groups", env="COPILOT_GROUPS_CLAIM",
                                doc="The verified token's claim listing the caller's groups, which decide "
                                    "which access-labelled documents it may read (docs/access-control.md).")
    jwks_url: str | None = setting(None, env="COPILOT_JWKS_URL",
                                   doc="A production identity provider's JWKS; unset: the edge serves the dev "
                                       "issuer's keys.")
    dev_tokens: bool = setting(False, env="COPILOT_DEV_TOKENS",
                               doc="Serve the dev-only token endpoint (POST /dev/token); never in production.")
    edge_bind: str | None = setting(None, env="COPILOT_EDGE_BIND",
                                    doc="Envoy's public listener address; unset: COPILOT_HOST (a container sets "
                                        "0.0.0.0).")
    redis_url: str | None = setting(None, env="REDIS_URL",
                                    doc="Redis for the edge's per-tenant rate limits, shared by every edge, and for "
                                        "metering's usage log and quota reservations, shared by every metering "
                                        "replica; unset: in-process counters, a local log and ledger.")
    ratelimit_fail_open: bool = setting(True, env="COPILOT_RATELIMIT_FAIL_OPEN",
                                        doc="Admit requests when the rate limit backend (Redis) is down (0: refuse "
                                            "them).")
    otel_endpoint: str | None = setting(None, env="OTEL_EXPORTER_OTLP_ENDPOINT",
                                        doc="OTLP/gRPC collector for traces (Envoy's and the services'); unset: no "
                                            "tracing.")
    log_level: str = setting("info", env="COPILOT_LOG_LEVEL", choices=LOG_LEVELS, doc="Log level of the services.")
    access_log: bool = setting(True, env="COPILOT_ACCESS_LOG",
                               doc="One JSON line per call (trace id, tenant, RPC, status, latency).")
    shutdown_grace_s: float = setting(5.0, env="COPILOT_SHUTDOWN_GRACE_S", low=0, high=600,
                                      doc="On SIGTERM, seconds in-flight calls get to finish.")
    tenant_cache_ttl_s: float = setting(5.0, env="COPILOT_TENANT_CACHE_TTL_S", low=0, high=3600,
                                        doc="How long a tenant's config stays valid in a service's cache when the "
                                            "push from metering is down.")
    clickhouse_url: str | None = setting(None, env="CLICKHOUSE_URL",
                                         doc="A ClickHouse server for usage and the audit trail; unset: in-process "
                                             "chDB under the data directory.")
    usage_backend: str = setting("clickhouse", env="COPILOT_USAGE_BACKEND", choices=("clickhouse", "sqlite"),
                                 doc="Where usage is kept: ClickHouse (server or chDB) or the walking skeleton's "
                                     "SQLite store.")
    usage_flush_interval_s: float = setting(0.2, env="COPILOT_USAGE_FLUSH_INTERVAL_S", low=0.001, high=60,
                                            doc="How often the durable usage log is flushed into ClickHouse.")
    # A holder that died (crashed generation replica, lost connection) must not keep a tenant's
    # budget for long, yet the hold must outlive the slowest answer (a long LLM stream).
    quota_reservation_ttl_s: float = setting(120.0, env="COPILOT_QUOTA_RESERVATION_TTL_S", low=1, high=3600,
                                             doc="How long a ReserveQuota hold lives unless settled or released "
                                                 "(when the request names no ttl).")
    quota_reservation_max_ttl_s: float = setting(900.0, env="COPILOT_QUOTA_RESERVATION_MAX_TTL_S", low=1,
                                                 high=86400,
                                                 doc="Cap on the ttl a ReserveQuota request may ask for, so no "
                                                     "caller can pin a tenant's budget for long.")
    price_table: str | None = setting(None, env="COPILOT_PRICE_TABLE",
                                      doc="JSON price table for usage cost; unset: servers/metering/usage/prices.json.")
    usage_on_delete: str = setting("anonymise", env="COPILOT_USAGE_ON_DELETE", choices=("anonymise", "keep", "erase"),
                                   doc="Deleting a tenant rewrites its usage rows to an anonymous id, keeps them, or "
                                       "erases them.")
    stripe_api_key: str | None = setting(None, env="STRIPE_API_KEY", secret=True,
                                         doc="Stripe metered billing (Billing Meter Events); unset: billing is off.")
    stripe_api_base: str | None = setting(None, env="STRIPE_API_BASE",
                                          doc="Stripe's API base URL (tests point it at a local fake).")
    audit_enabled: bool = setting(True, env="COPILOT_AUDIT",
                                  doc="Record questions, document changes and refusals in the audit trail (0 only "
                                      "for the benchmark's comparison).")
    audit_on_tenant_delete: str = setting("keep", env="COPILOT_AUDIT_ON_TENANT_DELETE", choices=("keep", "erase"),
                                          doc="Deleting a tenant keeps its audit trail or erases it.")

    # Sizes, streams and durations one client may use (docs/bounds.md).
    bounds: Bounds = section(Bounds)
    # Garbage in a loop must not flood the logs: every malformed request is refused and
    # counted, but logged at most this often per tenant.
    malformed_log_interval_s: float = setting(10.0, env="COPILOT_MALFORMED_LOG_INTERVAL_S", low=0, high=86_400,
                                              doc="Seconds between WARNING lines about malformed requests, per "
                                                  "tenant (each one is still refused and counted).")
    # `copilot up` writes it once the demo tenants are provisioned, so scripts that wait for
    # health do not start before them.
    ready_file: Path | None = setting(None, env="COPILOT_READY_FILE",
                                      doc="Set by `copilot up`: the edge's overall health is NOT_SERVING until this "
                                          "file exists; unset (production): no such gate.")

    def __post_init__(self) -> None:
        validate(self)
        problems = []
        if self.replica >= self.replicas:
            problems.append(f"COPILOT_REPLICA must be below COPILOT_REPLICAS ({self.replicas}), got {self.replica}")
        top = max(self.generation_port, self.edge_services_port, self.edge_http_port,
                  self.metrics_port_base + max(METRICS_OFFSETS.values()) if self.metrics_port_base else 0)
        if top + (self.replicas - 1) * self.replica_port_stride > 65535:
            problems.append(f"COPILOT_REPLICAS={self.replicas} with COPILOT_REPLICA_PORT_STRIDE="
                            f"{self.replica_port_stride} puts the last replica's ports above 65535")
        if problems:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        settings = parse(cls, environ)
        # Relative to where the process starts, once: children get the absolute path.
        return dataclasses.replace(settings, data_dir=settings.data_dir.resolve())

    def _replica_offset(self, replica: int | None) -> int:
        return (self.replica if replica is None else replica) * self.replica_port_stride

    def port(self, service: str, replica: int | None = None) -> int:
        """The port `service` listens on: of replica `replica` (default: this process's) for a
        replicated one."""
        port = {
            "retrieval": self.retrieval_port,
            "generation": self.generation_port,
            "metering": self.metering_port,
            "edge_services": self.edge_services_port,
            "edge_http": self.edge_http_port,
        }[service]
        return port + self._replica_offset(replica) if service in REPLICATED_PORTS else port

    def address(self, service: str, replica: int | None = None) -> str:
        return f"{self.host}:{self.port(service, replica)}"

    def addresses(self, service: str) -> list[str]:
        """Every replica's address of `service` (one for a service that is not replicated)."""
        count = self.replicas if service in REPLICATED_PORTS else 1
        return [self.address(service, i) for i in range(count)]

    def metrics_port(self, service: str, replica: int | None = None) -> int:
        if not self.metrics_port_base:
            return 0
        port = self.metrics_port_base + METRICS_OFFSETS[service]
        return port + self._replica_offset(replica) if service in REPLICATED_SERVICES else port

    def service_dir(self, service: str) -> Path:
        """Where `service` keeps its local state (created): shared by the replicas of a
        SHARED_DATA_SERVICES service, else this replica's own (`replica_dir`)."""
        path = self.data_dir / service if service in SHARED_DATA_SERVICES else self.replica_dir(service)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def replica_dir(self, service: str, replica: int | None = None) -> Path:
        """The directory only replica `replica` (default: this process) of `service` uses (its
        outboxes; not created here): `<service>-<i>` for i > 0, while replica 0 keeps the single
        process's `<service>`, so its outboxes survive a change of COPILOT_REPLICAS."""
        index = self.replica if replica is None else replica
        return self.data_dir / (f"{service}-{index}" if index else service)
