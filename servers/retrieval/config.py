"""The retrieval service's section of the settings model (servers/common/settings.py)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from servers.common.settings import parse, setting, validate
from servers.retrieval.embedders import EMBEDDERS
from servers.retrieval.engine import DEFAULT_ALPHA, DEFAULT_CANDIDATES, DEFAULT_FUSION, DEFAULT_TOP_K
from servers.retrieval.fusion import Fusion
from servers.retrieval.stores.base import DEFAULT_BM25, Bm25Params

STORES = ("embedded", "weaviate")


@dataclass(frozen=True, slots=True)
class RetrievalConfig:
    """The retrieval service's own settings (its section of the settings model)."""

    max_open_tenants: int = setting(256, env="COPILOT_RETRIEVAL_MAX_OPEN_TENANTS", low=1, high=100_000,
                                    doc="Open tenant indexes kept in memory (LRU); idle tenants beyond it are closed.")
    # sqlite releases the GIL, so threads are real parallelism across tenants (one tenant's
    # calls always share one thread).
    workers: int = setting(env="COPILOT_RETRIEVAL_WORKERS", low=1, high=64,
                           default_factory=lambda: min(4, os.cpu_count() or 2), shown_default="min(4, CPUs)",
                           doc="SQLite worker threads.")
    default_top_k: int = setting(DEFAULT_TOP_K, env="COPILOT_RETRIEVAL_DEFAULT_TOP_K", low=1, high=100,
                                 doc="Results of a search that asks for none.")
    embedder: str = setting("", env="COPILOT_EMBEDDER", choices=("", *EMBEDDERS), shown_default="minilm if installed",
                            doc="Text-to-vector model: minilm, minilm-int8, openai, hash or none; unset: "
                                "minilm when installed, else none.")
    embed_batch_size: int = setting(32, env="COPILOT_EMBED_BATCH_SIZE", low=1, high=1024,
                                    doc="Passages embedded per model call at ingest.")
    model_cache: Path | None = setting(None, env="COPILOT_MODEL_CACHE", shown_default="~/.cache/copilot/models",
                                       doc="Where the exported ONNX model files are kept.")
    openai_embedding_model: str = setting("text-embedding-3-small", env="COPILOT_OPENAI_EMBEDDING_MODEL",
                                          doc="OpenAI embedding model (COPILOT_EMBEDDER=openai).")
    openai_embedding_dimension: int = setting(1536, env="COPILOT_OPENAI_EMBEDDING_DIMENSION", low=1, high=8192,
                                              doc="Dimension of the OpenAI embedding model's vectors.")
    openai_api_key: str | None = setting(None, env="OPENAI_API_KEY", secret=True,
                                         doc="Key for OpenAI (embeddings here; generation reads the same variable).")
    openai_base_url: str | None = setting(None, env="OPENAI_BASE_URL",
                                          doc="An OpenAI-compatible server (vLLM, Ollama, llama.cpp) instead of "
                                              "OpenAI's.")
    default_alpha: float = setting(DEFAULT_ALPHA, env="COPILOT_RETRIEVAL_ALPHA", low=0.0, high=1.0,
                                   doc="Hybrid search's weight of dense against lexical (0: BM25 only, 1: dense "
                                       "only).")
    default_fusion: Fusion = setting(DEFAULT_FUSION, env="COPILOT_RETRIEVAL_FUSION",
                                     doc="How hybrid search fuses the lexical and dense lists.")
    candidates: int = setting(DEFAULT_CANDIDATES, env="COPILOT_RETRIEVAL_CANDIDATES", low=10, high=1000,
                              doc="Candidates each of BM25 and dense search contribute before fusion.")
    bm25_k1: float = setting(DEFAULT_BM25.k1, env="COPILOT_BM25_K1", low=0.0, high=10.0,
                             doc="BM25's term-frequency saturation, for both stores (Anserini's default).")
    bm25_b: float = setting(DEFAULT_BM25.b, env="COPILOT_BM25_B", low=0.0, high=1.0,
                            doc="BM25's length normalisation, for both stores (Anserini's default).")
    result_cache_entries: int = setting(4096, env="COPILOT_RETRIEVAL_RESULT_CACHE", low=0, high=1_000_000,
                                        doc="Search results cached per process (dropped on any change to the "
                                            "tenant's documents).")
    embedding_cache_entries: int = setting(4096, env="COPILOT_RETRIEVAL_EMBEDDING_CACHE", low=0, high=1_000_000,
                                           doc="Query embeddings cached per process.")
    store: str = setting("embedded", env="COPILOT_STORE", choices=STORES,
                         doc="embedded (SQLite files under the data directory) or weaviate (WEAVIATE_URL).")
    weaviate_url: str | None = setting(None, env="WEAVIATE_URL", doc="The Weaviate server (COPILOT_STORE=weaviate).")
    weaviate_grpc_port: int = setting(50051, env="WEAVIATE_GRPC_PORT", low=1, high=65535,
                                      doc="Weaviate's gRPC port.")
    weaviate_api_key: str | None = setting(None, env="WEAVIATE_API_KEY", secret=True, doc="Weaviate's API key.")
    weaviate_timeout_s: float = setting(10.0, env="COPILOT_WEAVIATE_TIMEOUT_S", low=0.1, high=300.0,
                                        doc="Timeout of one Weaviate call.")
    # A new prefix starts a fresh index (e.g. after changing the embedder, whose vectors
    # have another dimension).
    weaviate_collection_prefix: str = setting("Copilot", env="COPILOT_WEAVIATE_COLLECTION_PREFIX",
                                              doc="Weaviate collections are <prefix>Chunk and <prefix>Settings.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetrievalConfig:
        return parse(cls, environ)

    @property
    def bm25(self) -> Bm25Params:
        return Bm25Params(k1=self.bm25_k1, b=self.bm25_b)

    def __post_init__(self) -> None:
        validate(self)
        if self.store == "weaviate" and not self.weaviate_url:
            raise ValueError("COPILOT_STORE=weaviate needs WEAVIATE_URL (e.g. http://weaviate:8080)")
        if not re.fullmatch(r"[A-Z][A-Za-z0-9]{0,40}", self.weaviate_collection_prefix):
            raise ValueError("COPILOT_WEAVIATE_COLLECTION_PREFIX must be a capitalised alphanumeric name,"
                             f" got {self.weaviate_collection_prefix!r}")
