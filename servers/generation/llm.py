"""LLM providers: OpenAI (chat completions, any OpenAI-compatible base_url) and Anthropic
(messages API), both streaming, both through their official SDKs.

Retries: the SDKs retry 408/409/429/5xx and connection errors with exponential backoff
and jitter, honouring `retry-after` — before any text exists, which is the only time a
retry is safe. Once text has been streamed to the caller a failure is not retried: the
pipeline ends the answer there (or degrades to the extractive answerer when nothing was
produced yet). Token counts are the provider's own.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from opentelemetry.trace import Status, StatusCode

from servers.common import metrics, telemetry
from servers.common.interceptors import remaining_deadline
from servers.generation.providers import Generation, Passage, Prompt, Quote, SpanOrigin
from servers.generation.text import estimate_tokens, sentences, terms

CITATION_RULES = (
    "The passages below are numbered. Answer only from them and cite every claim with the "
    "passage number in square brackets, like [1] or [2]. If the passages do not answer the "
    "question, say so. After the answer, write a line containing only 'Quotes:' and under it, "
    "one per line, every passage you cited with the exact words of it your claim rests on, "
    "copied verbatim, like: [1] \"the exact words\""
)
# The line that starts the quotes block; nothing from it on is part of the answer's text.
QUOTES_MARKER = "quotes:"
_QUOTES_START = re.compile(r"(?:^|\n)[ \t]*[*_#]*[ \t]*quotes[ \t]*[*_]*:[*_]*[ \t]*(?:\n|$)", re.I)
_QUOTE_LINE = re.compile(r"^\s*(?:[-*]\s*)?\[(\d{1,3})\]\s*[:\-\u2013]?\s*(.+?)\s*$")
DECOMPOSE_INSTRUCTIONS = (
    "Split the user's question into the self-contained sub-questions needed to answer it, at most "
    "four, one per line, without numbering. If it is a single question, return it unchanged."
)
SEARCH_TOOL_NAME = "search_documents"
SEARCH_TOOL_DESCRIPTION = "Search the company's compliance documents; returns numbered passages."
SEARCH_TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "what to search for"}},
    "required": ["query"],
}
_CITE = re.compile(r"\[(\d{1,3})\]")


class ProviderFailure(Exception):
    """A provider call failed after the SDK's own retries; `reason` is safe to report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def kind(self) -> str:
        """A metric label for the failure (one of metrics.PROVIDER_ERROR_REASONS), from the
        SDK error it was raised from."""
        cause = self.__cause__
        status = getattr(cause, "status_code", None)
        if status == 429:
            return "rate_limited"
        if isinstance(status, int):
            return "server_error" if status >= 500 else "rejected"
        if isinstance(cause, openai.APITimeoutError | anthropic.APITimeoutError):
            return "timeout"
        if isinstance(cause, openai.APIConnectionError | anthropic.APIConnectionError):
            return "connection"
        if isinstance(cause, ValueError | KeyError | AttributeError | TypeError | IndexError):
            return "malformed"
        return "other"


@contextmanager
def provider_call(provider: str, call: str, model: str) -> Iterator[None]:
    """Times one provider call into copilot_provider_latency_seconds, counts its failure in
    copilot_provider_errors_total, and gives it a span. The span is not made current: the
    call may be a stream whose consumer resumes it from elsewhere, and nothing under it
    makes spans of its own."""
    span = telemetry.start_span(f"provider.{call}", {"gen_ai.system": provider, "gen_ai.request.model": model or ""})
    started = time.perf_counter()
    try:
        yield
    except ProviderFailure as exc:
        metrics.PROVIDER_ERRORS.labels(provider, exc.kind).inc()
        span.set_status(Status(StatusCode.ERROR, exc.reason))
        span.set_attribute("error.type", exc.kind)
        raise
    finally:
        metrics.PROVIDER_LATENCY.labels(provider, call).observe(time.perf_counter() - started)
        span.end()


@dataclass(frozen=True)
class LLMSettings:
    api_key: str | None
    base_url: str | None
    default_model: str
    timeout_s: float
    max_retries: int

    @property
    def configured(self) -> bool:
        # A local OpenAI-compatible server (vLLM, Ollama, llama.cpp) needs no key.
        return bool(self.api_key or self.base_url)


def render_passages(passages: Sequence[Passage]) -> str:
    blocks = []
    for i, p in enumerate(passages, start=1):
        heading = " — ".join(x for x in (p.title, p.section) if x)
        blocks.append(f"[{i}] {heading}\n{p.text.strip()}")
    return "\n\n".join(blocks)


def user_message(prompt: Prompt) -> str:
    return f"Passages:\n\n{render_passages(prompt.passages)}\n\nQuestion: {prompt.question}"


def system_message(prompt: Prompt) -> str:
    return f"{prompt.system_prompt.strip()}\n\n{CITATION_RULES}".strip()


def citations_from_text(answer: str, passages: Sequence[Passage]) -> list[Quote]:
    """The passages the answer cites by number (only numbers that were in the prompt, so no
    citation can point outside the retrieved, tenant-scoped passages), each with the passage
    sentence that best matches what the answer said next to it."""
    claims: dict[int, list[str]] = {}
    for sentence in sentences(answer) or [answer]:
        for match in _CITE.finditer(sentence):
            number = int(match.group(1))
            if 1 <= number <= len(passages):
                claims.setdefault(number, []).append(sentence)
    quotes = []
    for number, said in claims.items():
        passage = passages[number - 1]
        wanted = set(terms(" ".join(said)))
        candidates = sentences(passage.text) or [passage.text]
        best = max(candidates, key=lambda s: len(wanted & set(terms(s))))
        quotes.append(Quote(passage=number - 1, text=best, number=number))
    return quotes


class QuotesSplitter:
    """Separates the answer a model streams from the quotes block it ends with: `feed` returns
    what may be shown now (holding back a line that could be the block's start), `finish` the
    rest; `quotes` then holds the parsed block."""

    def __init__(self) -> None:
        self._pending = ""
        self._block: str | None = None
        self._emitted = False

    def feed(self, delta: str) -> str:
        if self._block is not None:
            self._block += delta
            return ""
        self._pending += delta
        found = _QUOTES_START.search(self._pending)
        if found:
            shown, self._block = self._pending[:found.start()], self._pending[found.start():]
            self._pending = ""
            return self._show(shown)
        cut = self._pending.rfind("\n")
        tail = self._pending[cut + 1:] if cut >= 0 else self._pending
        if (cut >= 0 or not self._emitted) and _could_start_quotes(tail):
            # Held from the blank lines before it: they belong to the block if it is one.
            keep = len(self._pending[:max(cut, 0)].rstrip())
            shown, self._pending = self._pending[:keep], self._pending[keep:]
            return self._show(shown)
        shown, self._pending = self._pending, ""
        return self._show(shown)

    def finish(self) -> str:
        shown, self._pending = self._pending, ""
        if self._block is None and _QUOTES_START.search(shown):
            return ""
        return self._show(shown.rstrip() if self._block is not None else shown)

    def _show(self, text: str) -> str:
        if self._block is not None:
            text = text.rstrip()
        self._emitted = self._emitted or bool(text)
        return text

    @property
    def quoted(self) -> bool:
        return self._block is not None

    def quotes(self, passages: Sequence[Passage]) -> list[Quote]:
        """The block's quotes that name a passage of the prompt (number → passage)."""
        out = []
        for line in (self._block or "").splitlines():
            match = _QUOTE_LINE.match(line)
            if match and 1 <= (number := int(match.group(1))) <= len(passages):
                text = match.group(2).strip().strip("\"'\u201c\u201d\u2018\u2019").strip()
                if text:
                    out.append(Quote(passage=number - 1, text=text, number=number))
        return out


def _could_start_quotes(tail: str) -> bool:
    """Whether a line still being streamed may turn out to be the quotes marker."""
    bare = re.sub(r"[\s*_#]", "", tail).lower()
    return bool(tail.strip()) and (QUOTES_MARKER.startswith(bare) or bare.startswith(QUOTES_MARKER))


def finish_quotes(result: Generation, splitter: QuotesSplitter, answer: str, passages: Sequence[Passage]) -> None:
    """The model's own quotes when it gave them, else the passage sentences nearest to what
    cites them."""
    quotes = splitter.quotes(passages)
    if quotes:
        result.quotes, result.quotes_origin = quotes, SpanOrigin.QUOTED
    else:
        result.quotes, result.quotes_origin = citations_from_text(answer, passages), SpanOrigin.INFERRED


def parse_sub_questions(text: str, limit: int = 4) -> list[str]:
    lines = [re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip() for line in text.splitlines()]
    return [line for line in lines if len(line.split()) >= 2][:limit]


def _timeout(settings: LLMSettings) -> float:
    remaining = remaining_deadline()
    return settings.timeout_s if remaining is None else max(0.1, min(settings.timeout_s, remaining))


SearchFn = Callable[[str], Awaitable[list[Passage]]]


class OpenAIProvider:
    name = "openai"

    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self.model = settings.default_model
        self._client = openai.AsyncOpenAI(api_key=settings.api_key or "unused", base_url=settings.base_url,
                                          max_retries=settings.max_retries, timeout=settings.timeout_s)

    async def stream(self, prompt: Prompt, result: Generation) -> AsyncIterator[str]:
        model = prompt.model or self.model
        # `raw` is what the model sent, `text` what was shown of it (the quotes block held back).
        text: list[str] = []
        raw: list[str] = []
        splitter = QuotesSplitter()
        try:
            stream = await self._client.chat.completions.create(
                model=model, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "system", "content": system_message(prompt)},
                          {"role": "user", "content": user_message(prompt)}],
                max_tokens=prompt.max_tokens, temperature=prompt.temperature, timeout=_timeout(self.settings))
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        result.input_tokens = chunk.usage.prompt_tokens
                        result.output_tokens = chunk.usage.completion_tokens
                        result.estimated = False
                    for choice in chunk.choices:
                        delta = choice.delta.content if choice.delta else None
                        if delta:
                            raw.append(delta)
                            if result.estimated:
                                result.output_tokens = estimate_tokens("".join(raw))
                            if shown := splitter.feed(delta):
                                text.append(shown)
                                yield shown
                if shown := splitter.finish():
                    text.append(shown)
                    yield shown
            finally:
                await stream.close()  # on cancellation too: the provider stops generating
        except openai.APIError as exc:
            raise ProviderFailure(_describe(self.name, exc)) from exc
        except (ValueError, KeyError) as exc:  # malformed stream data
            raise ProviderFailure(f"{self.name}: malformed stream ({type(exc).__name__})") from exc
        finally:
            if result.estimated:
                result.input_tokens = estimate_tokens(system_message(prompt) + user_message(prompt))
            finish_quotes(result, splitter, "".join(text), prompt.passages)

    async def decompose(self, prompt: Prompt, result: Generation) -> list[str]:
        """The model's sub-questions for `prompt.question` (decomposed retrieval)."""
        try:
            response = await self._client.chat.completions.create(
                model=prompt.model or self.model, max_tokens=200, temperature=0, timeout=_timeout(self.settings),
                messages=[{"role": "system", "content": DECOMPOSE_INSTRUCTIONS},
                          {"role": "user", "content": prompt.question}])
        except openai.APIError as exc:
            raise ProviderFailure(_describe(self.name, exc)) from exc
        try:
            if response.usage is not None:
                result.input_tokens += response.usage.prompt_tokens
                result.output_tokens += response.usage.completion_tokens
            return parse_sub_questions(response.choices[0].message.content or "")
        except (AttributeError, TypeError, IndexError) as exc:
            raise ProviderFailure(f"{self.name}: malformed response ({type(exc).__name__})") from exc

    async def gather(self, prompt: Prompt, search: SearchFn, max_steps: int, result: Generation) -> list[str]:
        """Agentic retrieval: lets the model call `search_documents` up to `max_steps` times;
        returns the queries it made (`search` collects the passages)."""
        messages: list[Any] = [
            {"role": "system", "content": f"{prompt.system_prompt}\nUse the {SEARCH_TOOL_NAME} tool to find "
                                          "the passages needed to answer; stop searching when you have them."},
            {"role": "user", "content": prompt.question},
        ]
        tools: list[Any] = [{"type": "function", "function": {
            "name": SEARCH_TOOL_NAME, "description": SEARCH_TOOL_DESCRIPTION, "parameters": SEARCH_TOOL_SCHEMA}}]
        queries: list[str] = []
        try:
            for _ in range(max_steps):
                response = await self._client.chat.completions.create(
                    model=prompt.model or self.model, messages=messages, tools=tools, max_tokens=256,
                    temperature=0, timeout=_timeout(self.settings))
                if response.usage is not None:
                    result.input_tokens += response.usage.prompt_tokens
                    result.output_tokens += response.usage.completion_tokens
                message = response.choices[0].message
                calls = [c for c in (message.tool_calls or []) if isinstance(c, ChatCompletionMessageFunctionToolCall)]
                if not calls:
                    break
                messages.append(message.model_dump(exclude_none=True))
                for call in calls:
                    query = str(json.loads(call.function.arguments or "{}").get("query", "")).strip()
                    found = await search(query) if query else []
                    if query:
                        queries.append(query)
                    messages.append({"role": "tool", "tool_call_id": call.id,
                                     "content": render_passages(found) or "no passages found"})
        except openai.APIError as exc:
            raise ProviderFailure(_describe(self.name, exc)) from exc
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise ProviderFailure(f"{self.name}: malformed response ({type(exc).__name__})") from exc
        return queries

    async def close(self) -> None:
        await self._client.close()


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self.model = settings.default_model
        self._client = anthropic.AsyncAnthropic(api_key=settings.api_key or "unused", base_url=settings.base_url,
                                                max_retries=settings.max_retries, timeout=settings.timeout_s)

    async def stream(self, prompt: Prompt, result: Generation) -> AsyncIterator[str]:
        text: list[str] = []
        raw: list[str] = []
        splitter = QuotesSplitter()
        try:
            stream = await self._client.messages.create(
                model=prompt.model or self.model, stream=True, system=system_message(prompt),
                messages=[{"role": "user", "content": user_message(prompt)}],
                # This SDK's messages API takes no temperature (current models fix it).
                max_tokens=prompt.max_tokens, timeout=_timeout(self.settings))
            try:
                async for event in stream:
                    if event.type == "message_start":
                        result.input_tokens = event.message.usage.input_tokens
                        result.output_tokens = event.message.usage.output_tokens
                        result.estimated = False
                    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                        # Until message_delta gives the final count, at least what was streamed.
                        raw.append(event.delta.text)
                        result.output_tokens = max(result.output_tokens, estimate_tokens("".join(raw)))
                        if shown := splitter.feed(event.delta.text):
                            text.append(shown)
                            yield shown
                    elif event.type == "message_delta" and event.usage is not None:
                        result.output_tokens = event.usage.output_tokens
                if shown := splitter.finish():
                    text.append(shown)
                    yield shown
            finally:
                await stream.close()
        except anthropic.APIError as exc:
            raise ProviderFailure(_describe(self.name, exc)) from exc
        except (ValueError, KeyError) as exc:
            raise ProviderFailure(f"{self.name}: malformed stream ({type(exc).__name__})") from exc
        finally:
            if result.estimated:
                result.input_tokens = estimate_tokens(system_message(prompt) + user_message(prompt))
            finish_quotes(result, splitter, "".join(text), prompt.passages)

    async def decompose(self, prompt: Prompt, result: Generation) -> list[str]:
        try:
            response = await self._client.messages.create(
                model=prompt.model or self.model, max_tokens=200, system=DECOMPOSE_INSTRUCTIONS,
                messages=[{"role": "user", "content": prompt.question}], timeout=_timeout(self.settings))
        except anthropic.APIError as exc:
            raise ProviderFailure(_describe(self.name, exc)) from exc
        try:
            result.input_tokens += response.usage.input_tokens
            result.output_tokens += response.usage.output_tokens
            return parse_sub_questions("".join(b.text for b in response.content if b.type == "text"))
        except (AttributeError, TypeError) as exc:
            raise ProviderFailure(f"{self.name}: malformed response ({type(exc).__name__})") from exc

    async def gather(self, prompt: Prompt, search: SearchFn, max_steps: int, result: Generation) -> list[str]:
        messages: list[Any] = [{"role": "user", "content": prompt.question}]
        tools: list[Any] = [{"name": SEARCH_TOOL_NAME, "description": SEARCH_TOOL_DESCRIPTION,
                             "input_schema": SEARCH_TOOL_SCHEMA}]
        queries: list[str] = []
        try:
            for _ in range(max_steps):
                response = await self._client.messages.create(
                    model=prompt.model or self.model, max_tokens=256, messages=messages, tools=tools,
                    system=f"{prompt.system_prompt}\nUse the {SEARCH_TOOL_NAME} tool to find the passages "
                           "needed to answer; stop searching when you have them.",
                    timeout=_timeout(self.settings))
                result.input_tokens += response.usage.input_tokens
                result.output_tokens += response.usage.output_tokens
                calls = [b for b in response.content if b.type == "tool_use"]
                if not calls:
                    break
                messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                                  for b in response.content]})
                results: list[Any] = []
                for call in calls:
                    query = str(dict(call.input).get("query", "")).strip()
                    found = await search(query) if query else []
                    if query:
                        queries.append(query)
                    results.append({"type": "tool_result", "tool_use_id": call.id,
                                    "content": render_passages(found) or "no passages found"})
                messages.append({"role": "user", "content": results})
        except anthropic.APIError as exc:
            raise ProviderFailure(_describe(self.name, exc)) from exc
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise ProviderFailure(f"{self.name}: malformed response ({type(exc).__name__})") from exc
        return queries

    async def close(self) -> None:
        await self._client.close()


def _describe(name: str, exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"{name}: HTTP {status} after retries"
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return f"{name}: timed out"
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        return f"{name}: connection failed"
    return f"{name}: {type(exc).__name__}"
