"""Span-exact citations and the groundedness verdict (docs/groundedness.md).

Three steps after a provider has answered:

1. `segment` cuts the answer into sentences (with their offsets in the answer text) and reads
   which passage numbers each one cites.
2. `cite` turns what the provider quoted into spans of the documents' original text: a quote is
   found in its passage's chunk (verbatim up to whitespace, else by fuzzy matching, with the
   match quality kept; a quote that cannot be found is dropped and counted), then mapped through
   the chunk's `Location` to the original's offsets and characters.
3. `Scorer` judges each sentence against the text it cites: content-word recall, plus the
   entailment checks a lexical score misses (numbers, dates, negation and actors that the cited
   text does not contain). The verdict is per sentence and for the whole answer; what happens to
   unsupported sentences is the tenant's setting (`UnsupportedPolicy`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from servers.common.text import Location
from servers.generation.providers import NOT_FOUND_ANSWER, Passage, Quote, SpanOrigin
from servers.generation.text import sentences, terms

# --- finding a quote in a passage -------------------------------------------------------------

# Below this a "quote" shares too little with the passage to point at anything in it.
MIN_QUOTE_QUALITY = 0.6
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True, slots=True)
class Match:
    """[start, end) in the searched text, and how well it matched (1: verbatim up to
    whitespace)."""

    start: int
    end: int
    quality: float


def find_quote(quote: str, text: str) -> Match | None:
    """Where `quote` is in `text`: verbatim with any whitespace between words (quality 1),
    else the stretch of `text` whose words best align with the quote's (quality: the share of
    words the two have in common, in order); None below MIN_QUOTE_QUALITY."""
    quote = quote.strip().strip("\"'\u201c\u201d\u2018\u2019").strip()
    words = quote.split()
    if not words or not text:
        return None
    exact = re.compile(r"\s+".join(re.escape(w) for w in words)).search(text)
    if exact:
        return Match(exact.start(), exact.end(), 1.0)
    wanted = [m.group(0).casefold() for m in _WORD.finditer(quote)]
    found = list(_WORD.finditer(text))
    have = [m.group(0).casefold() for m in found]
    if not wanted or not have:
        return None
    blocks = [b for b in SequenceMatcher(None, have, wanted, autojunk=False).get_matching_blocks() if b.size]
    if not blocks:
        return None
    # The densest run of aligned blocks: start at each block, extend while the window stays
    # no longer than twice the quote.
    best: tuple[float, int, int] | None = None
    for i, first in enumerate(blocks):
        matched = 0
        for last in blocks[i:]:
            if last.a + last.size - first.a > 2 * len(wanted):
                break
            matched += last.size
            window = last.a + last.size - first.a
            quality = 2 * matched / (len(wanted) + window)
            if best is None or quality > best[0]:
                best = (quality, first.a, last.a + last.size)
    if best is None or best[0] < MIN_QUOTE_QUALITY:
        return None
    quality, a, b = best
    return Match(found[a].start(), found[b - 1].end(), round(quality, 3))


# --- the answer's sentences -------------------------------------------------------------------

CITE = re.compile(r"\[(\d{1,3})\]")
# A sentence ends at . ! ? ; (perhaps closed by a quote or bracket) or at a citation marker,
# before whitespace and something that starts a sentence; and at every line break.
_BREAK = re.compile(r"(?:(?<=[.!?;])|(?<=[.!?;][\"')\u201d])|(?<=\]))[ \t]+(?=[\"'(\u201cA-Z0-9])|\s*\n\s*")


@dataclass(frozen=True, slots=True)
class AnswerSentence:
    start: int
    end: int
    text: str
    # Passage numbers (1-based, as the answer writes them) the sentence cites.
    cites: tuple[int, ...]


def segment(answer: str) -> list[AnswerSentence]:
    """The answer's sentences with their offsets; a piece with no words (a stray citation
    marker) joins the sentence before it."""
    out: list[AnswerSentence] = []
    at = 0
    breaks = [(m.start(), m.end()) for m in _BREAK.finditer(answer)]
    for piece_start, piece_end in [*breaks, (len(answer), len(answer))]:
        raw = answer[at:piece_start]
        lead = len(raw) - len(raw.lstrip())
        start, end = at + lead, at + len(raw.rstrip())
        at = piece_end
        if start >= end:
            continue
        text = answer[start:end]
        cites = tuple(dict.fromkeys(int(n) for n in CITE.findall(text)))
        if out and not _WORD.search(CITE.sub("", text)):
            prev = out[-1]
            out[-1] = AnswerSentence(prev.start, end, answer[prev.start:end], tuple(dict.fromkeys(prev.cites + cites)))
            continue
        out.append(AnswerSentence(start, end, text, cites))
    return out


# --- what the provider quoted -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Span:
    """A range of a document's original text (code points), the citation it belongs to."""

    citation: int
    document_id: str
    chunk_id: str
    # -1 when the passage was indexed before offsets were kept: `text` is then the chunk's.
    start: int
    end: int
    text: str
    quality: float
    origin: SpanOrigin


def span_in(passage_text: str, location: Location | None, match: Match, *, citation: int,
            document_id: str, chunk_id: str, origin: SpanOrigin) -> Span:
    """`match` (offsets in the chunk's text) as a span of the original document."""
    if location is None:
        return Span(citation, document_id, chunk_id, -1, -1, passage_text[match.start:match.end],
                    match.quality, origin)
    start = location.to_original(match.start)
    end = location.to_original(match.end, end=True)
    original = location.original_text(passage_text)
    return Span(citation, document_id, chunk_id, start, end,
                original[start - location.start:end - location.start], match.quality, origin)


def best_sentence(claim: str, passage_text: str) -> Match | None:
    """The passage sentence sharing most content words with `claim` (a span for a citation the
    provider gave no usable quote for)."""
    wanted = set(terms(CITE.sub("", claim)))
    best: tuple[int, str] | None = None
    for candidate in sentences(passage_text) or [passage_text]:
        overlap = len(wanted & set(terms(candidate)))
        if best is None or overlap > best[0]:
            best = (overlap, candidate)
    if best is None:
        return None
    match = find_quote(best[1], passage_text)
    return None if match is None else Match(match.start, match.end, match.quality)


# --- the verdict ---------------------------------------------------------------------------------

class UnsupportedPolicy(enum.StrEnum):
    """What an answer does with a sentence its citations do not support (a tenant setting)."""

    FLAG = "flag"
    REMOVE = "remove"
    REFUSE = "refuse"


REFUSAL_ANSWER = ("I cannot give a sufficiently supported answer to this question from your documents; "
                  "please check the cited sources directly.")

_NUMBER = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)(?:\s*(%|per\s*cent|percent))?", re.I)
_NUMBER_WORDS = {
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "fifteen": "15", "twenty": "20", "thirty": "30",
    "forty": "40", "fifty": "50", "sixty": "60", "ninety": "90", "hundred": "100",
}
_MONTHS = frozenset("january february march april may june july august september october november december".split())
_NEGATIONS = frozenset({"not", "no", "never", "nor", "cannot", "without", "neither", "none"})
# People and bodies a compliance rule puts duties on: a sentence that names one the cited text
# does not ("the Board" where the rule says "the MLRO") is a different claim.
_ACTORS = frozenset(
    """applicant auditor auditors authorised authority bank board borrower broker client clients committee
    company compliance controller custodian customer customers depositor director directors employee employees
    firm firms fsra governor guarantor insurer investor investors issuer lender manager managers member members
    mlro officer officers operator partner partners person persons recipient regulator registrar shareholder
    shareholders sponsor staff supervisor trustee trustees user users""".split()
)


# Words an answer frames its claims with ("According to the policy, ..."): not claims of
# their own, so not looked for in the cited text.
_FRAMING = frozenset(terms("according passage passages policy policies document documents rules rulebook "
                           "says states stated summary short answer provided"))


def _numbers(text: str) -> set[str]:
    found = {m.group(1).replace(",", "") + ("%" if m.group(2) else "") for m in _NUMBER.finditer(text)}
    found |= {_NUMBER_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _NUMBER_WORDS}
    return found


def _words(text: str) -> set[str]:
    return {w.casefold() for w in _WORD.findall(text)}


@dataclass(frozen=True, slots=True)
class Verdict:
    supported: bool
    # 0..1: how strongly the cited text supports the sentence.
    support: float
    issues: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scorer:
    """Content-word recall of the sentence in its cited text, lowered by every fact the cited
    text does not contain. Thresholds tuned on a split of the ObliQA set (`copilot
    eval-answers`), reported on the other (docs/groundedness.md)."""

    # A sentence is supported from this support up. Both values are what `copilot eval-answers`
    # chose on its tuning half (docs/groundedness.md has the figures on the other half).
    threshold: float = 0.9
    # What each missing fact (number, date, negation, actor) takes off the recall.
    fact_penalty: float = 0.2

    def judge(self, sentence: str, cited: Sequence[str]) -> Verdict:
        claim = CITE.sub("", sentence)
        claim_terms = set(terms(claim)) - _FRAMING
        if not claim_terms:
            return Verdict(True, 1.0)
        if not cited:
            return Verdict(False, 0.0, ("cites nothing",))
        source = " ".join(cited)
        source_terms = set(terms(source))
        recall = len(claim_terms & source_terms) / len(claim_terms)
        issues: list[str] = []
        source_numbers = _numbers(source)
        for number in sorted(_numbers(claim) - source_numbers):
            issues.append(f"{number} is not in the cited text")
        claim_words, source_words = _words(claim), _words(source)
        for month in sorted((claim_words & _MONTHS) - source_words):
            issues.append(f"{month} is not in the cited text")
        if (claim_words & _NEGATIONS) and not (source_words & _NEGATIONS):
            issues.append("negated, the cited text is not")
        elif (source_words & _NEGATIONS) and not (claim_words & _NEGATIONS) and recall < 1.0:
            # A rule's "not" dropped from a paraphrase turns it around.
            issues.append("the cited text is negated, the sentence is not")
        claim_actors, source_actors = _stems(claim_words & _ACTORS), _stems(source_words & _ACTORS)
        for actor in sorted(claim_actors - source_actors):
            issues.append(f"{actor} is not in the cited text")
        support = max(0.0, recall - self.fact_penalty * len(issues))
        if support < self.threshold and not issues:
            issues.append(f"only {recall:.0%} of its content words are in the cited text")
        return Verdict(support >= self.threshold, round(support, 3), tuple(issues))


def _stems(words: set[str]) -> set[str]:
    return {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words}


DEFAULT_SCORER = Scorer()


# --- the whole answer ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SentenceVerdict:
    # Offsets in the answer as delivered; a removed sentence has start == end.
    start: int
    end: int
    citations: tuple[int, ...]
    # Indexes into Grounding.spans.
    spans: tuple[int, ...]
    verdict: Verdict
    removed: bool = False


@dataclass
class Grounding:
    spans: list[Span] = field(default_factory=list)
    sentences: list[SentenceVerdict] = field(default_factory=list)
    score: float = 1.0
    unsupported: int = 0
    policy: UnsupportedPolicy = UnsupportedPolicy.FLAG
    refused: bool = False
    unmatched_quotes: int = 0


def answer_score(verdicts: Sequence[tuple[int, Verdict]]) -> float:
    """The sentences' support weighted by their length (characters)."""
    total = sum(length for length, _ in verdicts)
    if not total:
        return 1.0
    return round(sum(length * v.support for length, v in verdicts) / total, 3)


def apply_policy(answer: str, grounding: Grounding, policy: UnsupportedPolicy) -> str:
    """The answer text to deliver under `policy`; `grounding`'s offsets follow it."""
    grounding.policy = policy
    if not grounding.unsupported or policy is UnsupportedPolicy.FLAG:
        return answer
    if policy is UnsupportedPolicy.REFUSE:
        grounding.refused = True
        grounding.sentences = [SentenceVerdict(0, 0, s.citations, s.spans, s.verdict, removed=True)
                               for s in grounding.sentences]
        return REFUSAL_ANSWER
    kept: list[str] = []
    length = 0
    moved: list[SentenceVerdict] = []
    for s in grounding.sentences:
        if not s.verdict.supported:
            moved.append(SentenceVerdict(length, length, s.citations, s.spans, s.verdict, removed=True))
            continue
        if kept:
            kept.append(" ")
            length += 1
        text = answer[s.start:s.end]
        moved.append(SentenceVerdict(length, length + len(text), s.citations, s.spans, s.verdict))
        kept.append(text)
        length += len(text)
    grounding.sentences = moved
    if not kept:
        grounding.refused = True
        return REFUSAL_ANSWER
    return "".join(kept)



@dataclass(frozen=True, slots=True)
class CitedPassage:
    """One citation: the number the answer uses for it, the passage, what was quoted of it."""

    index: int
    passage: Passage
    quote: str


def ground(answer: str, quotes: Sequence[Quote], passages: Sequence[Passage], *, origin: SpanOrigin,
           scorer: Scorer = DEFAULT_SCORER) -> tuple[list[CitedPassage], Grounding]:
    """The answer's citations, their spans and every sentence's verdict. `quotes` are what the
    provider reported (numbered as the answer cites them, or in order); `origin` says how they
    were obtained (extracted sentences, or the model's quotes)."""
    numbered: dict[int, int] = {}
    quoted: dict[int, list[str]] = {}
    for i, quote in enumerate(quotes, start=1):
        if not 0 <= quote.passage < len(passages):
            continue
        number = quote.number or i
        if numbered.setdefault(number, quote.passage) != quote.passage:
            continue
        quoted.setdefault(number, []).append(quote.text)
    grounding = Grounding()
    spans: dict[tuple[int, int, int, str], int] = {}

    def add(span: Span) -> int:
        key = (span.citation, span.start, span.end, span.text)
        if key not in spans:
            spans[key] = len(grounding.spans)
            grounding.spans.append(span)
        return spans[key]

    found: dict[int, list[int]] = {}
    for number, texts in quoted.items():
        passage = passages[numbered[number]]
        for text in texts:
            match = find_quote(text, passage.text)
            if match is None:
                grounding.unmatched_quotes += 1
                continue
            found.setdefault(number, []).append(add(span_in(
                passage.text, passage.location, match, citation=number, document_id=passage.document_id,
                chunk_id=passage.chunk_id, origin=origin)))
    if answer.strip() == NOT_FOUND_ANSWER:
        return [], grounding
    verdicts: list[tuple[int, Verdict]] = []
    for sentence in segment(answer):
        cites = tuple(n for n in sentence.cites if n in numbered or 1 <= n <= len(passages))
        chosen: list[int] = []
        cited_texts: list[str] = []
        for number in cites:
            if number not in numbered:
                # Cited by number but not quoted: a passage of the prompt all the same.
                numbered[number] = number - 1
                quoted[number] = []
            passage = passages[numbered[number]]
            cited_texts.append(passage.text)
            candidates = found.get(number, [])
            if candidates:
                wanted = set(terms(CITE.sub("", sentence.text)))
                chosen.append(max(candidates, key=lambda k: len(wanted & set(terms(grounding.spans[k].text)))))
                continue
            match = best_sentence(sentence.text, passage.text)
            if match is not None:
                span = span_in(passage.text, passage.location, match, citation=number,
                               document_id=passage.document_id, chunk_id=passage.chunk_id,
                               origin=SpanOrigin.INFERRED)
                found[number] = [add(span)]
                chosen.append(found[number][0])
        if cites:
            verdict = scorer.judge(sentence.text, cited_texts)
        else:
            # Cites nothing: held against every passage, and flagged when they do not carry it.
            verdict = scorer.judge(sentence.text, [p.text for p in passages])
            if not verdict.supported:
                verdict = Verdict(False, verdict.support, ("cites nothing", *verdict.issues))
        verdicts.append((sentence.end - sentence.start, verdict))
        grounding.sentences.append(SentenceVerdict(sentence.start, sentence.end, cites, tuple(chosen), verdict))
    grounding.score = answer_score(verdicts)
    grounding.unsupported = sum(1 for _, v in verdicts if not v.supported)
    citations = [CitedPassage(index=number, passage=passages[numbered[number]], quote=" ".join(quoted[number]))
                 for number in sorted(numbered)]
    return citations, grounding
