"""Answer providers behind one interface. The embedded default is extractive: no model,
deterministic, every sentence it outputs is quoted from a retrieved passage and cited."""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from servers.common.text import Location
from servers.generation.text import estimate_tokens, sentences, terms

# Passages recur across answers (a tenant's popular sections): their sentences and terms are
# computed once. Keyed by the text alone, so it holds nothing a tenant did not supply for it.
PASSAGE_CACHE = 4096


@lru_cache(maxsize=PASSAGE_CACHE)
def passage_sentences(text: str) -> tuple[tuple[str, frozenset[str], int], ...]:
    """The passage's sentences that have content words: (sentence, its terms, term count)."""
    out = []
    for sentence in sentences(text):
        words = terms(sentence)
        if words:
            out.append((sentence, frozenset(words), len(words)))
    return tuple(out)


@dataclass(frozen=True)
class Passage:
    document_id: str
    chunk_id: str
    title: str
    section: str
    text: str
    score: float
    source: str
    # Where the chunk lies in the document's original text; None when retrieval indexed it
    # before offsets were kept.
    location: Location | None = None
    # The document's access labels (docs/access-control.md); empty: the whole tenant.
    access: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prompt:
    system_prompt: str
    question: str
    passages: Sequence[Passage]
    max_tokens: int
    temperature: float
    # The tenant's model; empty for the provider's default.
    model: str = ""


@dataclass(frozen=True)
class Quote:
    """What the answer used of passage `passage` (0-based in the prompt); the answer's
    citation numbers follow the order of `Generation.quotes`."""

    passage: int
    text: str
    # The number the answer text uses for it; None: numbered in order of `Generation.quotes`.
    number: int | None = None


class SpanOrigin(enum.StrEnum):
    """How a provider's quotes were obtained."""

    # The answer's sentences are the passages' own (extractive): exact by construction.
    EXTRACTED = "extracted"
    # The model quoted them (found in the passage by matching, see grounding.find_quote).
    QUOTED = "quoted"
    # The model gave no quotes: the passage sentence closest to what cites it.
    INFERRED = "inferred"


@dataclass
class Generation:
    """What a provider reports once its stream ends."""

    quotes: list[Quote]
    input_tokens: int
    output_tokens: int
    estimated: bool
    quotes_origin: SpanOrigin = SpanOrigin.EXTRACTED


class Provider(Protocol):
    name: str
    model: str

    def stream(self, prompt: Prompt, result: Generation) -> AsyncIterator[str]:
        """Yields answer text; fills `result` as it goes (usage, what was cited)."""
        ...


NOT_FOUND_ANSWER = "I could not find an answer to this question in your documents."


class ExtractiveProvider:
    """Selects the passage sentences that best match the question and cites them."""

    name = "extractive"

    def __init__(self, model: str = "extractive-v1", max_sentences: int = 4) -> None:
        self.model = model
        self._max_sentences = max_sentences

    def select(self, prompt: Prompt) -> list[Quote]:
        query = set(terms(prompt.question))
        if not query:
            return []
        candidates: list[tuple[int, int, str, frozenset[str], int]] = []
        for p_index, passage in enumerate(prompt.passages):
            for s_index, (sentence, words, count) in enumerate(passage_sentences(passage.text)):
                candidates.append((p_index, s_index, sentence, words, count))
        if not candidates:
            return []
        # idf over candidate sentences: rare question words decide, common ones barely count.
        df: Counter[str] = Counter()
        for *_, words, _count in candidates:
            df.update(words & query)
        n = len(candidates)
        scored = []
        for p_index, s_index, sentence, words, count in candidates:
            matched = words & query
            if not matched:
                continue
            weight = sum(math.log(1 + n / df[w]) for w in matched)
            coverage = len(matched) / len(query)
            # Higher-ranked passages win ties; very long sentences are slightly penalised.
            score = weight * (0.5 + coverage) / (1 + 0.1 * p_index) / (1 + count / 80)
            scored.append((score, p_index, s_index, sentence))
        if not scored:
            return []
        scored.sort(key=lambda item: (-item[0], item[1], item[2]))
        best = scored[0][0]
        chosen = [s for s in scored[: self._max_sentences] if s[0] >= best * 0.35]
        # Reading order: by passage rank, then position in the passage.
        chosen.sort(key=lambda item: (item[1], item[2]))
        return [Quote(passage=p, text=text) for _, p, _, text in chosen]

    async def stream(self, prompt: Prompt, result: Generation) -> AsyncIterator[str]:
        quotes = self.select(prompt)
        result.quotes = []
        result.estimated = True
        result.input_tokens = estimate_tokens(prompt.system_prompt) + estimate_tokens(prompt.question) + sum(
            estimate_tokens(p.text) for p in prompt.passages
        )
        if not quotes:
            result.output_tokens = estimate_tokens(NOT_FOUND_ANSWER)
            yield NOT_FOUND_ANSWER
            return
        # One citation per passage, numbered in order of first use; every sentence is a quote
        # of its own (its span is exactly that sentence of the passage).
        numbers: dict[int, int] = {}
        for i, quote in enumerate(quotes):
            number = numbers.setdefault(quote.passage, len(numbers) + 1)
            piece = f"{'' if i == 0 else ' '}{quote.text} [{number}]"
            result.output_tokens += estimate_tokens(piece)
            result.quotes.append(Quote(passage=quote.passage, text=quote.text, number=number))
            yield piece
