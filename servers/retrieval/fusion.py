"""Fusing a lexical and a dense result list into one ranking, and reranking it.

Both methods weigh the two lists by `alpha` (0 = lexical only, 1 = dense only), as
Weaviate's hybrid query does:

* reciprocal-rank fusion: score(d) = (1-alpha)/(k + rank_lex(d)) + alpha/(k + rank_dense(d)),
  ranks from 1, a list that misses d contributing nothing;
* relative-score fusion: each list's scores min-max normalised to [0, 1] (a list whose
  scores are all equal maps them to 1), then (1-alpha)·lex + alpha·dense.

Ties break by the best single-list rank, then by chunk id, so results are deterministic.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from servers.retrieval.models import Hit

RRF_K = 60


class Fusion(enum.Enum):
    RRF = "rrf"
    RELATIVE_SCORE = "relative_score"


def _normalised(hits: Sequence[Hit]) -> dict[str, float]:
    if not hits:
        return {}
    scores = [hit.score for hit in hits]
    low, high = min(scores), max(scores)
    if high == low:
        return {hit.chunk_id: 1.0 for hit in hits}
    return {hit.chunk_id: (hit.score - low) / (high - low) for hit in hits}


def fuse(lexical: Sequence[Hit], dense: Sequence[Hit], *, alpha: float, method: Fusion,
         top_k: int, rrf_k: int = RRF_K) -> list[Hit]:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be between 0 and 1")
    by_id: dict[str, Hit] = {}
    best_rank: dict[str, int] = {}
    for hits in (lexical, dense):
        for rank, hit in enumerate(hits):
            by_id.setdefault(hit.chunk_id, hit)
            best_rank[hit.chunk_id] = min(rank, best_rank.get(hit.chunk_id, rank))
    scores: dict[str, float] = dict.fromkeys(by_id, 0.0)
    if method is Fusion.RRF:
        for weight, hits in ((1.0 - alpha, lexical), (alpha, dense)):
            for rank, hit in enumerate(hits, start=1):
                scores[hit.chunk_id] += weight / (rrf_k + rank)
    else:
        for weight, hits in ((1.0 - alpha, lexical), (alpha, dense)):
            for chunk, value in _normalised(hits).items():
                scores[chunk] += weight * value
    order = sorted(scores, key=lambda chunk: (-scores[chunk], best_rank[chunk], chunk))
    return [replace(by_id[chunk], score=scores[chunk]) for chunk in order[:top_k]]


class Reranker(Protocol):
    """Reorders (and may cut) the fused candidates for a query."""

    async def rerank(self, query: str, hits: list[Hit], top_k: int) -> list[Hit]: ...


class NoopReranker:
    """Keeps the fused order. (No PyPI package ships cross-encoder weights to use here.)"""

    async def rerank(self, query: str, hits: list[Hit], top_k: int) -> list[Hit]:
        return hits[:top_k]
