"""Span-exact citations and the groundedness verdict: chunk locations, quotes found in passages
(exact, fuzzy, unicode, absent), spans mapped to the original text, the scorer, the LLM quotes
block, and the tenant's policy for unsupported sentences."""

from __future__ import annotations

import pytest

from servers.common.text import Location, TextEdit
from servers.generation.grounding import (
    REFUSAL_ANSWER,
    Scorer,
    UnsupportedPolicy,
    apply_policy,
    find_quote,
    ground,
    segment,
)
from servers.generation.llm import QuotesSplitter
from servers.generation.providers import (
    ExtractiveProvider,
    Generation,
    Passage,
    Prompt,
    Quote,
    SpanOrigin,
)
from servers.retrieval.chunker import ChunkingConfig, chunk_document, location_from_json, location_to_json

ORIGINAL = (
    "# Retention\r\n\r\nFirms must keep   customer records for 7 years after the\r\nrelationship ends. "
    "Records must be stored securely.\r\n\r\n## Breaches\r\n\r\nA breach must be reported to the FSRA within "
    "72 hours. The MLRO decides on escalation.\r\n"
)


def passages(original: str = ORIGINAL, markdown: bool = True) -> list[Passage]:
    """The document as retrieval chunks it, each passage located as retrieval reports it."""
    out = []
    for chunk in chunk_document("pol", original, markdown=markdown):
        loc = chunk.location
        assert loc is not None
        out.append(Passage("pol", chunk.chunk_id, "Policy", chunk.section, chunk.text, 1.0, "pol.md",
                           Location(loc.start, loc.end,
                                          tuple(TextEdit(e.at, e.length, e.original) for e in loc.edits))))
    return out


# --- where chunks lie in the original ---------------------------------------------------------

@pytest.mark.parametrize("original", [
    ORIGINAL,
    "Caf\u00e9 au lait e\u0301te\u0301 \u2014 \u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002 Emoji \U0001f600 ok.\n",
    "Line one\x07 with a bell.\x0cPage two starts here.\u2028And a separator line.",
    "\n\n".join(f"Rule {i}. Paragraph {i} says firms must keep records for {i} years." * 6 for i in range(1, 9)),
])
def test_every_chunk_reproduces_its_stretch_of_the_original(original: str) -> None:
    chunks = chunk_document("d", original, markdown=True, config=ChunkingConfig(max_chars=300, overlap_chars=80))
    assert chunks
    for chunk in chunks:
        loc = chunk.location
        assert loc is not None and 0 <= loc.start <= loc.end <= len(original)
        assert loc.original_text(chunk.text) == original[loc.start:loc.end]
        assert location_from_json(location_to_json(loc)) == loc


def test_a_location_the_store_cannot_read_is_no_location() -> None:
    assert location_from_json(None) is None and location_from_json("") is None
    assert location_from_json("{not json") is None


# --- quotes in passages -----------------------------------------------------------------------

def test_a_verbatim_quote_matches_exactly_whatever_the_whitespace() -> None:
    text = "Firms must keep   customer records\nfor 7 years."
    match = find_quote("customer records for 7 years", text)
    assert match is not None and match.quality == 1.0
    assert text[match.start:match.end] == "customer records\nfor 7 years"


def test_a_reworded_quote_matches_fuzzily_with_its_quality() -> None:
    text = "Firms must keep customer records for 7 years after the relationship ends. Other text follows here."
    match = find_quote("keep the customer records for 7 years after relationship end", text)
    assert match is not None and 0.6 <= match.quality < 1.0
    assert text[match.start:match.end].startswith("keep customer records")


def test_unicode_quotes_match_in_code_points() -> None:
    text = "Pr\u00e9ambule. \u65e5\u672c\u306e\u898f\u5247\u3067\u3059 \U0001f600 and the d\u00e9lai is 30 jours."
    match = find_quote("d\u00e9lai is 30 jours", text)
    assert match is not None and text[match.start:match.end] == "d\u00e9lai is 30 jours"


def test_a_quote_not_in_the_source_is_not_found() -> None:
    assert find_quote("zebras orbit quietly around purple lighthouses", ORIGINAL) is None
    assert find_quote("", ORIGINAL) is None


# --- spans of the original ---------------------------------------------------------------------

async def extractive_answer(question: str, ps: list[Passage]) -> tuple[str, Generation]:
    result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=True)
    prompt = Prompt(system_prompt="", question=question, passages=ps, max_tokens=200, temperature=0.0)
    text = "".join([d async for d in ExtractiveProvider().stream(prompt, result)])
    return text, result


async def test_extractive_spans_are_the_originals_characters() -> None:
    ps = passages()
    answer, result = await extractive_answer("How long are customer records kept, when is a breach reported?", ps)
    citations, grounding = ground(answer, result.quotes, ps, origin=result.quotes_origin)
    assert citations and grounding.spans and grounding.unsupported == 0 and grounding.score == 1.0
    for span in grounding.spans:
        assert span.origin is SpanOrigin.EXTRACTED and span.quality == 1.0
        assert ORIGINAL[span.start:span.end] == span.text
    # CRLF inside the quoted sentence: the span is the original's, not the chunk's.
    assert any("\r\n" in s.text for s in grounding.spans)
    for sentence in grounding.sentences:
        assert sentence.citations and sentence.spans and sentence.verdict.supported
        cited = {grounding.spans[k].citation for k in sentence.spans}
        assert cited == set(sentence.citations)
    assert {c.index for c in citations} == {s.citation for s in grounding.spans}


def test_model_quotes_become_spans_and_a_misquote_is_dropped() -> None:
    ps = passages()
    answer = "Breaches go to the FSRA within 72 hours [2]. Records are kept for 7 years [1]."
    quotes = [Quote(passage=1, text="reported to the FSRA within 72 hours", number=2),
              Quote(passage=0, text="zebras orbit quietly around purple lighthouses", number=1)]
    citations, grounding = ground(answer, quotes, ps, origin=SpanOrigin.QUOTED)
    assert grounding.unmatched_quotes == 1
    quoted = [s for s in grounding.spans if s.origin is SpanOrigin.QUOTED]
    assert [ORIGINAL[s.start:s.end] for s in quoted] == ["reported to the FSRA within 72 hours"]
    # The misquoted citation still points at the passage sentence nearest to its claim.
    inferred = [s for s in grounding.spans if s.origin is SpanOrigin.INFERRED]
    assert len(inferred) == 1 and "7 years" in inferred[0].text
    assert ORIGINAL[inferred[0].start:inferred[0].end] == inferred[0].text
    assert [c.index for c in citations] == [1, 2]


def test_passages_indexed_before_offsets_still_cite_without_offsets() -> None:
    p = Passage("old", "old#0", "Old", "", "Records are kept for 7 years.", 1.0, "old.md")
    _, grounding = ground("Records are kept for 7 years [1].", [Quote(0, "Records are kept for 7 years.", 1)], [p],
                          origin=SpanOrigin.QUOTED)
    assert [(s.start, s.end, s.text) for s in grounding.spans] == [(-1, -1, "Records are kept for 7 years.")]


def test_sentences_keep_their_offsets_and_citations() -> None:
    answer = "Records are kept for 7 years. [1] Breaches go to the FSRA [2] [3].\nThe MLRO decides [2]."
    parts = segment(answer)
    assert [answer[s.start:s.end] for s in parts] == [
        "Records are kept for 7 years. [1]", "Breaches go to the FSRA [2] [3].", "The MLRO decides [2]."]
    assert [s.cites for s in parts] == [(1,), (2, 3), (2,)]


# --- the scorer ---------------------------------------------------------------------------------

SOURCE = "A breach must be reported to the FSRA within 72 hours. The MLRO decides on escalation."


def test_a_supported_sentence_is_supported() -> None:
    verdict = Scorer().judge("According to the policy, a breach must be reported to the FSRA within 72 hours [1].",
                             [SOURCE])
    assert verdict.supported and verdict.support == 1.0 and not verdict.issues


def test_a_changed_number_is_unsupported_and_says_why() -> None:
    verdict = Scorer().judge("A breach must be reported to the FSRA within 48 hours [1].", [SOURCE])
    assert not verdict.supported and "48 is not in the cited text" in verdict.issues


def test_a_changed_actor_and_a_negation_are_unsupported() -> None:
    assert not Scorer().judge("The Board decides on escalation [1].", [SOURCE]).supported
    assert not Scorer().judge("A breach need not be reported to the FSRA within 72 hours [1].", [SOURCE]).supported


def test_an_unrelated_sentence_is_unsupported() -> None:
    verdict = Scorer().judge("Client money must be segregated in a designated trust account [1].", [SOURCE])
    assert not verdict.supported and verdict.support < 0.5


def test_a_sentence_citing_nothing_is_held_against_every_passage() -> None:
    ps = passages()
    _, grounding = ground("Unicorns approve every breach report.", [], ps, origin=SpanOrigin.INFERRED)
    assert grounding.unsupported == 1 and "cites nothing" in grounding.sentences[0].verdict.issues


# --- the tenant's policy ---------------------------------------------------------------------------

def grounded_with_one_unsupported() -> tuple[str, object]:
    ps = passages()
    answer = "A breach must be reported to the FSRA within 72 hours [2]. Records are kept for 99 years [1]."
    return answer, ground(answer, [], ps, origin=SpanOrigin.INFERRED)[1]


def test_flag_keeps_the_answer() -> None:
    answer, grounding = grounded_with_one_unsupported()
    assert apply_policy(answer, grounding, UnsupportedPolicy.FLAG) == answer  # type: ignore[arg-type]
    assert grounding.unsupported == 1 and not grounding.refused  # type: ignore[attr-defined]


def test_remove_drops_the_unsupported_sentence_and_offsets_follow() -> None:
    answer, grounding = grounded_with_one_unsupported()
    kept = apply_policy(answer, grounding, UnsupportedPolicy.REMOVE)  # type: ignore[arg-type]
    assert kept == "A breach must be reported to the FSRA within 72 hours [2]."
    first, second = grounding.sentences  # type: ignore[attr-defined]
    assert kept[first.start:first.end] == kept and not first.removed
    assert second.removed and second.start == second.end


def test_refuse_refuses_the_answer() -> None:
    answer, grounding = grounded_with_one_unsupported()
    assert apply_policy(answer, grounding, UnsupportedPolicy.REFUSE) == REFUSAL_ANSWER  # type: ignore[arg-type]
    assert grounding.refused  # type: ignore[attr-defined]


# --- the LLM quotes block ------------------------------------------------------------------------

def test_the_quotes_block_is_held_back_even_split_across_deltas() -> None:
    ps = passages()
    streamed = 'Breaches go to the FSRA [2].\n\nQuo', 'tes:\n[2] "reported to the FSRA within 72 hours"\n', '[9] "x"'
    splitter = QuotesSplitter()
    shown = "".join(splitter.feed(d) for d in streamed) + splitter.finish()
    assert shown == "Breaches go to the FSRA [2]."
    assert [(q.passage, q.number, q.text) for q in splitter.quotes(ps)] == [
        (1, 2, "reported to the FSRA within 72 hours")]


def test_an_answer_without_a_quotes_block_streams_whole() -> None:
    splitter = QuotesSplitter()
    streamed = ("Quick answer: ", "records are kept\n", "Questions remain [1].")
    shown = "".join(splitter.feed(d) for d in streamed) + splitter.finish()
    assert shown == "".join(streamed) and not splitter.quoted
