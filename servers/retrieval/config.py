"""Retrieval-specific knobs, from environment variables like the shared settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from servers.retrieval.engine import DEFAULT_TOP_K


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class RetrievalConfig:
    # Open tenant indexes kept in memory (LRU); idle tenants beyond it are closed.
    max_open_tenants: int = 256
    # SQLite worker threads; sqlite releases the GIL, so this is real parallelism
    # across tenants (one tenant's calls always share one thread).
    workers: int = 2
    default_top_k: int = DEFAULT_TOP_K

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetrievalConfig:
        env = os.environ if environ is None else environ
        return cls(
            max_open_tenants=_int(env, "COPILOT_RETRIEVAL_MAX_OPEN_TENANTS", 256, 1, 100_000),
            workers=_int(env, "COPILOT_RETRIEVAL_WORKERS", min(4, os.cpu_count() or 2), 1, 64),
            default_top_k=_int(env, "COPILOT_RETRIEVAL_DEFAULT_TOP_K", DEFAULT_TOP_K, 1, 100),
        )
