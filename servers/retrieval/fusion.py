"""Fusing a lexical and a dense result list into one ranking, and reranking it.

Both methods weigh the two lists by `alpha` (0 = lexical only, 1 = dense only), as
Weaviate's hybrid query does:

* reciprocal-rank fusion: score(d) = (1-alpha)/(k + rank_lex(d)) + alpha/(k + rank_dense(d)),
  ranks from 1, a list that misses d contributing nothing;
* relative-score fusion: each list's scores min-max normalised to [0, 1] (a list whose
  scores are all equal maps them to 1), then (1-alpha)·lex + alpha·dense.

Ties break by the best single-list rank, then by key (the chunk id, or the embedded store's row
id when it fuses rankings), so results are deterministic.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from servers.retrieval.models import Hit

RRF_K = 60


class Fusion(enum.Enum):
    RRF = "rrf"
    RELATIVE_SCORE = "relative_score"


K = TypeVar("K", int, str)


def _normalised(ranked: Sequence[tuple[K, float]]) -> dict[K, float]:
    if not ranked:
        return {}
    scores = [score for _, score in ranked]
    low, high = min(scores), max(scores)
    if high == low:
        return {key: 1.0 for key, _ in ranked}
    return {key: (score - low) / (high - low) for key, score in ranked}


def fuse_ranked(lexical: Sequence[tuple[K, float]], dense: Sequence[tuple[K, float]], *, alpha: float,
                method: Fusion, top_k: int, rrf_k: int = RRF_K) -> list[tuple[K, float]]:
    """The fused (key, score) list, best first, of two (key, score) rankings (best first)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be between 0 and 1")
    best_rank: dict[K, int] = {}
    for ranked in (lexical, dense):
        for rank, (key, _) in enumerate(ranked):
            best_rank[key] = min(rank, best_rank.get(key, rank))
    scores: dict[K, float] = dict.fromkeys(best_rank, 0.0)
    if method is Fusion.RRF:
        for weight, ranked in ((1.0 - alpha, lexical), (alpha, dense)):
            for rank, (key, _) in enumerate(ranked, start=1):
                scores[key] += weight / (rrf_k + rank)
    else:
        for weight, ranked in ((1.0 - alpha, lexical), (alpha, dense)):
            for key, value in _normalised(ranked).items():
                scores[key] += weight * value
    order = sorted(scores, key=lambda key: (-scores[key], best_rank[key], key))
    return [(key, scores[key]) for key in order[:top_k]]


def fuse(lexical: Sequence[Hit], dense: Sequence[Hit], *, alpha: float, method: Fusion,
         top_k: int, rrf_k: int = RRF_K) -> list[Hit]:
    """`fuse_ranked` over hits, keyed by chunk id."""
    by_id: dict[str, Hit] = {}
    for hits in (lexical, dense):
        for hit in hits:
            by_id.setdefault(hit.chunk_id, hit)
    fused = fuse_ranked([(h.chunk_id, h.score) for h in lexical], [(h.chunk_id, h.score) for h in dense],
                        alpha=alpha, method=method, top_k=top_k, rrf_k=rrf_k)
    return [replace(by_id[chunk], score=score) for chunk, score in fused]


class Reranker(Protocol):
    """Reorders (and may cut) the fused candidates for a query."""

    def depth(self, top_k: int, candidates: int) -> int:
        """How many fused candidates it wants for `top_k` results (at most `candidates`)."""

    async def rerank(self, query: str, hits: list[Hit], top_k: int) -> list[Hit]: ...


class NoopReranker:
    """Keeps the fused order. (No PyPI package ships cross-encoder weights to use here.)"""

    def depth(self, top_k: int, candidates: int) -> int:
        # The fused order is final: reading more rows than it returns would be waste.
        return top_k

    async def rerank(self, query: str, hits: list[Hit], top_k: int) -> list[Hit]:
        return hits[:top_k]
