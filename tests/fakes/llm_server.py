"""A local fake of the OpenAI chat completions and Anthropic messages APIs, speaking their
wire formats (JSON and server-sent events), so the real SDKs can be tested over HTTP on
127.0.0.1. Failures are scripted per request: "429" (with retry-after), "500",
"timeout" (answers after the client gave up), "malformed" (a broken SSE chunk first),
"break" (a broken chunk after some text).

The answer is deterministic: the first sentence of passage [1] of the prompt, cited [1], and,
when the system prompt asks for quotes, a quotes block quoting it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeState:
    script: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    chunk_delay_s: float = 0.0
    timeout_sleep_s: float = 3.0
    streams_started: int = 0
    streams_finished: int = 0
    streams_aborted: int = 0
    chunks_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_failure(self) -> str | None:
        with self.lock:
            return self.script.pop(0) if self.script else None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(c.get("text") or c.get("content") or "") for c in content if isinstance(c, dict))
    return ""


def answer_for(prompt: str, system: str = "", script: str | None = None) -> str:
    """Scripted answers besides failures: "unsupported" adds a sentence its citation does not
    carry (a number the passage lacks); "misquote" quotes words that are not in the passage."""
    match = re.search(r"^\[1\][^\n]*\n(.+?)(?:\n\n\[2\]|\n\nQuestion:|$)", prompt, re.S | re.M)
    if not match:
        return "The passages do not answer this question."
    first = re.split(r"(?<=[.!?])\s", " ".join(match.group(1).split()), maxsplit=1)[0]
    answer = f"According to the policy, {first} [1]"
    if script == "unsupported":
        answer += " The deadline for this is 9999 days from the Board's approval [1]."
    if "Quotes:" in system:
        # What a model asked for quotes sends after its answer (the service strips it).
        quote = "zebras orbit quietly around purple lighthouses" if script == "misquote" else first
        answer += f'\n\nQuotes:\n[1] "{quote}"'
    return answer


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p + (" " if i < len(parts) - 1 else "") for i, p in enumerate(parts)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True

    def _send(self, raw: str) -> None:
        self.wfile.write(raw.encode())
        self.wfile.flush()
        with self.state.lock:
            self.state.chunks_sent += 1
        if self.state.chunk_delay_s:
            time.sleep(self.state.chunk_delay_s)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        with self.state.lock:
            self.state.requests.append({"path": self.path, "body": body})
        failure = self.state.next_failure()
        if failure == "429":
            self._json(429, {"error": {"type": "rate_limit_error", "message": "slow down"}},
                       {"retry-after": "0.05", "retry-after-ms": "50", "x-should-retry": "true"})
            return
        if failure == "500":
            self._json(500, {"error": {"type": "server_error", "message": "boom"}})
            return
        if failure == "timeout":
            time.sleep(self.state.timeout_sleep_s)
        openai_api = self.path.endswith("/chat/completions")
        prompt = _text_of(body.get("messages", [{}])[-1].get("content")) if body.get("messages") else ""
        input_tokens = max(1, len(json.dumps(body)) // 4)
        try:
            system = body.get("system") or (body["messages"][0].get("content")
                                            if body["messages"][0].get("role") == "system" else "")
            text = answer_for(prompt, _text_of(system), failure)
            if "sub-questions" in str(system) and not body.get("stream"):
                self._decompose(body, openai_api, prompt, input_tokens)
            elif body.get("tools"):
                self._tool_round(body, openai_api, input_tokens)
            elif openai_api:
                self._openai_stream(body, text, input_tokens, failure)
            else:
                self._anthropic_stream(body, text, input_tokens, failure)
        except (BrokenPipeError, ConnectionResetError):
            with self.state.lock:
                self.state.streams_aborted += 1

    # --- decomposition, non-streaming ----------------------------------------------------

    def _decompose(self, body: dict[str, Any], openai_api: bool, question: str, input_tokens: int) -> None:
        parts = [p.strip(" ?") + "?" for p in re.split(r",?\s+and\s+", question) if p.strip(" ?")]
        text = "\n".join(f"{i}. {p}" for i, p in enumerate(parts, start=1))
        if openai_api:
            self._json(200, {"id": "chatcmpl-split", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": input_tokens, "completion_tokens": 5,
                                       "total_tokens": input_tokens + 5}})
        else:
            self._json(200, {"id": "msg_split", "type": "message", "role": "assistant", "model": body["model"],
                             "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                             "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 5}})

    # --- tool calling (agentic retrieval), non-streaming --------------------------------

    def _tool_round(self, body: dict[str, Any], openai_api: bool, input_tokens: int) -> None:
        messages = body["messages"]
        question = _text_of(messages[1 if messages[0].get("role") == "system" else 0]["content"])
        searched = any(m.get("role") == "tool" for m in messages) if openai_api else any(
            isinstance(m.get("content"), list) and any(c.get("type") == "tool_result" for c in m["content"])
            for m in messages)
        if openai_api:
            message: dict[str, Any] = {"role": "assistant", "content": "I have what I need."}
            if not searched:
                message = {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "search_documents", "arguments": json.dumps({"query": question})}}]}
            choice = {"index": 0, "message": message, "finish_reason": "stop" if searched else "tool_calls"}
            usage = {"prompt_tokens": input_tokens, "completion_tokens": 7, "total_tokens": input_tokens + 7}
            self._json(200, {"id": "chatcmpl-tools", "object": "chat.completion", "created": 0,
                             "model": body["model"], "choices": [choice], "usage": usage})
        else:
            content: list[dict[str, Any]] = [{"type": "text", "text": "I have what I need."}]
            if not searched:
                content = [{"type": "tool_use", "id": "toolu_1", "name": "search_documents",
                            "input": {"query": question}}]
            self._json(200, {"id": "msg_tools", "type": "message", "role": "assistant", "model": body["model"],
                             "content": content, "stop_reason": "end_turn" if searched else "tool_use",
                             "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 7}})

    # --- streaming answers -----------------------------------------------------------------

    def _openai_stream(self, body: dict[str, Any], text: str, input_tokens: int, failure: str | None) -> None:
        self._sse_start()
        with self.state.lock:
            self.state.streams_started += 1
        words = _words(text)
        for i, word in enumerate(words):
            if (failure == "malformed" and i == 0) or (failure == "break" and i == 3):
                self._send("data: {\"id\": \"x\", \"choices\": [{\"delta\": {\"content\": \n\n")
                return
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            self._send(f"data: {json.dumps(chunk)}\n\n")
        done = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                "choices": [], "usage": {"prompt_tokens": input_tokens, "completion_tokens": len(words),
                                         "total_tokens": input_tokens + len(words)}}
        self._send(f"data: {json.dumps(done)}\n\n")
        self._send("data: [DONE]\n\n")
        with self.state.lock:
            self.state.streams_finished += 1

    def _anthropic_stream(self, body: dict[str, Any], text: str, input_tokens: int, failure: str | None) -> None:
        self._sse_start()
        with self.state.lock:
            self.state.streams_started += 1

        def event(name: str, data: dict[str, Any]) -> None:
            self._send(f"event: {name}\ndata: {json.dumps(data)}\n\n")

        event("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": body["model"],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}})
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
        words = _words(text)
        for i, word in enumerate(words):
            if (failure == "malformed" and i == 0) or (failure == "break" and i == 3):
                self._send("event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"delta\": \n\n")
                return
            event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": word}})
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": len(words)}})
        event("message_stop", {"type": "message_stop"})
        with self.state.lock:
            self.state.streams_finished += 1


class FakeLLMServer:
    """Serves both APIs on one loopback port: OpenAI at /v1/chat/completions, Anthropic at
    /v1/messages."""

    def __init__(self) -> None:
        self.state = FakeState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def provider_env(self) -> dict[str, str]:
        """The environment that points both real SDK providers at this fake."""
        return {"OPENAI_BASE_URL": self.openai_base_url, "OPENAI_API_KEY": "test-key", "OPENAI_MODEL": "gpt-test",
                "ANTHROPIC_BASE_URL": self.anthropic_base_url, "ANTHROPIC_API_KEY": "test-key",
                "ANTHROPIC_MODEL": "claude-test"}

    def start(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self.state.lock:
            self.state.script.clear()
            self.state.requests.clear()
            self.state.chunk_delay_s = 0.0
            self.state.streams_started = self.state.streams_finished = self.state.streams_aborted = 0
            self.state.chunks_sent = 0
