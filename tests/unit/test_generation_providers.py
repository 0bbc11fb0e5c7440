"""The real OpenAI and Anthropic SDKs against the local fake of their APIs: streaming,
provider token counts, citations, and each scripted failure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from servers.generation.llm import (
    AnthropicProvider,
    LLMSettings,
    OpenAIProvider,
    ProviderFailure,
    citations_from_text,
)
from servers.generation.providers import Generation, Passage, Prompt
from tests.fakes.llm_server import FakeLLMServer

PASSAGES = [
    Passage("kyc", "kyc#1", "KYC policy", "2. Screening",
            "Existing customers are rescreened daily. Matches go to the Head of Financial Crime.", 1.0, "kyc.md"),
    Passage("kyc", "kyc#2", "KYC policy", "3. Records", "KYC records are kept for five years.", 0.5, "kyc.md"),
]
PROMPT = Prompt(system_prompt="Be precise.", question="How often are customers rescreened?",
                passages=PASSAGES, max_tokens=200, temperature=0.0)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLMServer]:
    server = FakeLLMServer().start()
    yield server
    server.stop()


def _provider(kind: str, fake: FakeLLMServer) -> OpenAIProvider | AnthropicProvider:
    if kind == "openai":
        return OpenAIProvider(LLMSettings("k", fake.openai_base_url, "gpt-test", 0.5, 2))
    return AnthropicProvider(LLMSettings("k", fake.anthropic_base_url, "claude-test", 0.5, 2))


async def _run(provider: OpenAIProvider | AnthropicProvider) -> tuple[str, Generation]:
    result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=True)
    text = "".join([d async for d in provider.stream(PROMPT, result)])
    return text, result


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_streams_with_provider_counts_and_citations(fake: FakeLLMServer, kind: str) -> None:
    fake.reset()
    provider = _provider(kind, fake)
    text, result = await _run(provider)
    await provider.close()
    assert text.endswith("[1]") and "rescreened daily" in text
    # The model's quotes block is counted (it was generated) but not shown.
    assert "Quotes:" not in text
    sent = text + '\n\nQuotes:\n[1] "Existing customers are rescreened daily."'
    assert result.estimated is False and result.output_tokens == len(sent.split(" "))
    assert [(q.passage, q.number) for q in result.quotes] == [(0, 1)]
    assert result.quotes[0].text == "Existing customers are rescreened daily."
    assert fake.state.streams_finished == 1


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_429_and_500_are_retried_before_any_text(fake: FakeLLMServer, kind: str) -> None:
    fake.reset()
    fake.state.script[:] = ["429", "500"]
    provider = _provider(kind, fake)
    text, _ = await _run(provider)
    await provider.close()
    assert "[1]" in text and len(fake.state.requests) == 3


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(("script", "reason"), [
    (["500"] * 3, "HTTP 500"), (["timeout"] * 3, "timed out"), (["malformed"], "malformed"),
])
async def test_failures_after_retries_are_provider_failures(fake: FakeLLMServer, kind: str, script: list[str],
                                                            reason: str) -> None:
    fake.reset()
    fake.state.script[:] = script
    fake.state.timeout_sleep_s = 1.0
    provider = _provider(kind, fake)
    with pytest.raises(ProviderFailure) as info:
        await _run(provider)
    await provider.close()
    assert reason in info.value.reason


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_stream_broken_midway_keeps_what_was_said(fake: FakeLLMServer, kind: str) -> None:
    fake.reset()
    fake.state.script[:] = ["break"]
    provider = _provider(kind, fake)
    result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=True)
    said: list[str] = []
    with pytest.raises(ProviderFailure):
        async for delta in provider.stream(PROMPT, result):
            said.append(delta)
    await provider.close()
    assert said and result.output_tokens >= 1 and len(fake.state.requests) == 1  # never retried


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_tool_calling_loop(fake: FakeLLMServer, kind: str) -> None:
    fake.reset()
    provider = _provider(kind, fake)
    searched: list[str] = []

    async def search(query: str) -> list[Passage]:
        searched.append(query)
        return PASSAGES

    result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=False)
    queries = await provider.gather(PROMPT, search, max_steps=3, result=result)
    await provider.close()
    assert queries == searched == [PROMPT.question]
    assert result.input_tokens > 0 and result.output_tokens == 14  # two rounds of 7


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_llm_decomposition(fake: FakeLLMServer, kind: str) -> None:
    fake.reset()
    provider = _provider(kind, fake)
    result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=False)
    prompt = Prompt(system_prompt="", question="How long are KYC records kept and who approves exceptions?",
                    passages=[], max_tokens=100, temperature=0.0)
    subs = await provider.decompose(prompt, result)
    await provider.close()
    assert subs == ["How long are KYC records kept?", "who approves exceptions?"]
    assert result.output_tokens == 5


def test_citations_only_point_at_passages_in_the_prompt() -> None:
    answer = "Customers are rescreened daily [1]. Records are kept five years [2]. Also see [7] and [0]."
    quotes = citations_from_text(answer, PASSAGES)
    assert [(q.passage, q.number) for q in quotes] == [(0, 1), (1, 2)]
    assert quotes[1].text == "KYC records are kept for five years."
