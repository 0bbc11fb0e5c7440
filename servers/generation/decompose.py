"""Splitting a compound question into sub-questions (rule-based), and fusing the passages
retrieved for each (reciprocal rank fusion)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from servers.generation.providers import Passage

MAX_SUB_QUESTIONS = 4
_COMPARE = re.compile(
    r"^\s*(?:compare|contrast|what(?:'s| is| are) the differences? between|how do(?:es)?)\s+(?P<a>.+?)"
    r"\s+(?:and|with|versus|vs\.?|to)\s+(?P<b>.+?)(?:\s+(?:differ|compare))?\s*[?.]?\s*$",
    re.IGNORECASE,
)
_PARTS = re.compile(r"(?<=[?;])\s+|\s+(?:and also|and then|as well as|additionally),?\s+", re.IGNORECASE)
_AND_WH = re.compile(r",?\s+and\s+(?=(?:what|who|when|where|which|how|why|is|are|do|does|can|must)\b)",
                     re.IGNORECASE)


def split(question: str) -> list[str]:
    """Sub-questions of `question`; just `[question]` when it is not compound."""
    text = question.strip()
    compare = _COMPARE.match(text)
    if compare and text.lower().startswith(("compare", "contrast", "what")):
        a, b = compare.group("a").strip(" ,"), compare.group("b").strip(" ,?.")
        parts = [a, b]
    else:
        parts = [p for chunk in _PARTS.split(text) for p in _AND_WH.split(chunk)]
    cleaned: list[str] = []
    for part in parts:
        part = part.strip(" ,;")
        if len(part.split()) >= 2 and part.lower() not in (c.lower() for c in cleaned):
            cleaned.append(part)
    return cleaned[:MAX_SUB_QUESTIONS] if len(cleaned) > 1 else [text]


def fuse(results: Sequence[Sequence[Passage]], top_k: int, k: int = 60) -> list[Passage]:
    """Reciprocal rank fusion; each sub-question keeps at least its best passage."""
    scores: dict[str, float] = {}
    by_id: dict[str, Passage] = {}
    for hits in results:
        for rank, passage in enumerate(hits):
            by_id.setdefault(passage.chunk_id, passage)
            scores[passage.chunk_id] = scores.get(passage.chunk_id, 0.0) + 1.0 / (k + rank + 1)
    ordered = sorted(scores, key=lambda cid: -scores[cid])
    chosen = [hits[0].chunk_id for hits in results if hits]
    for cid in ordered:
        if cid not in chosen:
            chosen.append(cid)
    chosen = list(dict.fromkeys(chosen))[:max(top_k, len([h for h in results if h]))]
    return [by_id[cid] for cid in sorted(chosen, key=lambda cid: -scores[cid])]
