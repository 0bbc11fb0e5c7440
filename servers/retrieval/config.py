"""Retrieval-specific knobs, from environment variables like the shared settings."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from servers.retrieval.embedders import EMBEDDERS
from servers.retrieval.engine import DEFAULT_ALPHA, DEFAULT_CANDIDATES, DEFAULT_FUSION, DEFAULT_TOP_K
from servers.retrieval.fusion import Fusion
from servers.retrieval.stores.base import DEFAULT_BM25, Bm25Params


def _float(environ: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


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


STORES = ("embedded", "weaviate")


@dataclass(frozen=True, slots=True)
class RetrievalConfig:
    # Open tenant indexes kept in memory (LRU); idle tenants beyond it are closed.
    max_open_tenants: int = 256
    # SQLite worker threads; sqlite releases the GIL, so this is real parallelism
    # across tenants (one tenant's calls always share one thread).
    workers: int = 2
    default_top_k: int = DEFAULT_TOP_K
    # minilm | openai | hash | none; empty: minilm when installed, else none.
    embedder: str = ""
    embed_batch_size: int = 32
    openai_embedding_model: str = "text-embedding-3-small"
    openai_embedding_dimension: int = 1536
    openai_base_url: str | None = None
    default_alpha: float = DEFAULT_ALPHA
    default_fusion: Fusion = DEFAULT_FUSION
    candidates: int = DEFAULT_CANDIDATES
    # BM25's k1 and b for both stores (store.Bm25Params: Anserini's 0.9 and 0.4).
    bm25_k1: float = DEFAULT_BM25.k1
    bm25_b: float = DEFAULT_BM25.b
    result_cache_entries: int = 4096
    embedding_cache_entries: int = 4096
    # embedded (SQLite files under the data dir) | weaviate (WEAVIATE_URL).
    store: str = "embedded"
    weaviate_url: str | None = None
    weaviate_grpc_port: int = 50051
    weaviate_api_key: str | None = None
    weaviate_timeout_s: float = 10.0
    # Collections `<prefix>Chunk` and `<prefix>Settings`: a new prefix starts a fresh index
    # (e.g. after changing the embedder, whose vectors have another dimension).
    weaviate_collection_prefix: str = "Copilot"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetrievalConfig:
        env = os.environ if environ is None else environ
        return cls(
            max_open_tenants=_int(env, "COPILOT_RETRIEVAL_MAX_OPEN_TENANTS", 256, 1, 100_000),
            workers=_int(env, "COPILOT_RETRIEVAL_WORKERS", min(4, os.cpu_count() or 2), 1, 64),
            default_top_k=_int(env, "COPILOT_RETRIEVAL_DEFAULT_TOP_K", DEFAULT_TOP_K, 1, 100),
            embedder=_choice(env, "COPILOT_EMBEDDER", EMBEDDERS),
            embed_batch_size=_int(env, "COPILOT_EMBED_BATCH_SIZE", 32, 1, 1024),
            openai_embedding_model=env.get("COPILOT_OPENAI_EMBEDDING_MODEL", "").strip() or "text-embedding-3-small",
            openai_embedding_dimension=_int(env, "COPILOT_OPENAI_EMBEDDING_DIMENSION", 1536, 1, 8192),
            openai_base_url=env.get("OPENAI_BASE_URL", "").strip() or None,
            default_alpha=_float(env, "COPILOT_RETRIEVAL_ALPHA", DEFAULT_ALPHA, 0.0, 1.0),
            default_fusion=Fusion(_choice(env, "COPILOT_RETRIEVAL_FUSION", tuple(f.value for f in Fusion))
                                  or DEFAULT_FUSION.value),
            candidates=_int(env, "COPILOT_RETRIEVAL_CANDIDATES", DEFAULT_CANDIDATES, 10, 1000),
            bm25_k1=_float(env, "COPILOT_BM25_K1", DEFAULT_BM25.k1, 0.0, 10.0),
            bm25_b=_float(env, "COPILOT_BM25_B", DEFAULT_BM25.b, 0.0, 1.0),
            result_cache_entries=_int(env, "COPILOT_RETRIEVAL_RESULT_CACHE", 4096, 0, 1_000_000),
            embedding_cache_entries=_int(env, "COPILOT_RETRIEVAL_EMBEDDING_CACHE", 4096, 0, 1_000_000),
            store=_choice(env, "COPILOT_STORE", STORES) or "embedded",
            weaviate_url=env.get("WEAVIATE_URL", "").strip() or None,
            weaviate_grpc_port=_int(env, "WEAVIATE_GRPC_PORT", 50051, 1, 65535),
            weaviate_api_key=env.get("WEAVIATE_API_KEY", "").strip() or None,
            weaviate_timeout_s=_float(env, "COPILOT_WEAVIATE_TIMEOUT_S", 10.0, 0.1, 300.0),
            weaviate_collection_prefix=env.get("COPILOT_WEAVIATE_COLLECTION_PREFIX", "").strip() or "Copilot",
        )

    @property
    def bm25(self) -> Bm25Params:
        return Bm25Params(k1=self.bm25_k1, b=self.bm25_b)

    def __post_init__(self) -> None:
        if self.store == "weaviate" and not self.weaviate_url:
            raise ValueError("COPILOT_STORE=weaviate needs WEAVIATE_URL (e.g. http://weaviate:8080)")
        if not re.fullmatch(r"[A-Z][A-Za-z0-9]{0,40}", self.weaviate_collection_prefix):
            raise ValueError("COPILOT_WEAVIATE_COLLECTION_PREFIX must be a capitalised alphanumeric name,"
                             f" got {self.weaviate_collection_prefix!r}")


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = environ.get(name, "").strip().lower()
    if raw and raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw
