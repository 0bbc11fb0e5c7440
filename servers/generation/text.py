"""Text helpers shared by the answer pipeline: terms, sentences and token estimates."""

from __future__ import annotations

import re

_WORD = re.compile(r"[\w][\w'-]*", re.UNICODE)
# Sentence ends: ., !, ? or ; followed by space and an upper-case letter, digit or bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[\"'(\[A-Z0-9])")

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself
    just me more most my no nor not now of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this
    those through to too under until up very was we were what when where which while who whom
    why will with would you your yours must may shall""".split()
)


def terms(text: str) -> list[str]:
    """Lower-cased content words with a light suffix strip, so 'reports' meets 'reporting'."""
    return [_stem(w) for w in (m.group(0).lower() for m in _WORD.finditer(text)) if w not in STOP_WORDS]


def _stem(word: str) -> str:
    for suffix in ("ations", "ation", "ings", "ing", "ies", "es", "ed", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def sentences(text: str) -> list[str]:
    parts: list[str] = []
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)]|\(?[a-z]\)))", text):
        block = " ".join(block.split())
        if block:
            parts.extend(s.strip() for s in _SENTENCE_END.split(block) if s.strip())
    return parts


def estimate_tokens(text: str) -> int:
    """About 4 characters per token for English, the usual rule of thumb; used only where a
    provider reports no counts (the usage record says it is an estimate)."""
    return 0 if not text else max(1, round(len(text) / 4))
