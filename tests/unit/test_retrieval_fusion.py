"""Fusion maths: reciprocal-rank and relative-score fusion, alpha, ties."""

from __future__ import annotations

from typing import Any

import pytest

from servers.retrieval.fusion import RRF_K, Fusion, NoopReranker, fuse, fuse_ranked
from servers.retrieval.models import Hit


def hit(chunk: str, score: float) -> Hit:
    return Hit(document_id=chunk.split("#")[0], chunk_id=chunk, title="", section="", text=chunk, score=score,
               source="", metadata={})


LEX = [hit("a#0", 12.0), hit("b#0", 9.0), hit("c#0", 3.0)]
DENSE = [hit("c#0", 0.9), hit("d#0", 0.8), hit("a#0", 0.5)]


def scores(hits: list[Hit]) -> dict[str, float]:
    return {h.chunk_id: h.score for h in hits}


def test_rrf_is_the_weighted_sum_of_reciprocal_ranks() -> None:
    fused = fuse(LEX, DENSE, alpha=0.5, method=Fusion.RRF, top_k=10)
    expected = {
        "a#0": 0.5 / (RRF_K + 1) + 0.5 / (RRF_K + 3),
        "b#0": 0.5 / (RRF_K + 2),
        "c#0": 0.5 / (RRF_K + 3) + 0.5 / (RRF_K + 1),
        "d#0": 0.5 / (RRF_K + 2),
    }
    assert scores(fused) == pytest.approx(expected)
    # a and c tie exactly; b and d tie: the better single-list rank, then the id, decides.
    assert [h.chunk_id for h in fused] == ["a#0", "c#0", "b#0", "d#0"]


def test_relative_score_fusion_normalises_each_list() -> None:
    fused = fuse(LEX, DENSE, alpha=0.3, method=Fusion.RELATIVE_SCORE, top_k=10)
    lex_norm = {"a#0": 1.0, "b#0": (9 - 3) / 9, "c#0": 0.0}
    dense_norm = {"c#0": 1.0, "d#0": (0.8 - 0.5) / 0.4, "a#0": 0.0}
    expected = {c: 0.7 * lex_norm.get(c, 0.0) + 0.3 * dense_norm.get(c, 0.0) for c in ["a#0", "b#0", "c#0", "d#0"]}
    assert scores(fused) == pytest.approx(expected)
    assert [h.chunk_id for h in fused] == sorted(expected, key=lambda c: -expected[c])


@pytest.mark.parametrize("method", list(Fusion))
def test_alpha_extremes_follow_one_list(method: Fusion) -> None:
    lexical_only = fuse(LEX, DENSE, alpha=0.0, method=method, top_k=3)
    assert [h.chunk_id for h in lexical_only] == ["a#0", "b#0", "c#0"]
    dense_only = fuse(LEX, DENSE, alpha=1.0, method=method, top_k=3)
    assert [h.chunk_id for h in dense_only] == ["c#0", "d#0", "a#0"]


def test_equal_scores_and_empty_lists() -> None:
    flat = [hit("x#0", 2.0), hit("y#0", 2.0)]
    fused = fuse(flat, [], alpha=0.5, method=Fusion.RELATIVE_SCORE, top_k=5)
    assert scores(fused) == {"x#0": 0.5, "y#0": 0.5}
    assert [h.chunk_id for h in fused] == ["x#0", "y#0"]
    assert fuse([], [], alpha=0.5, method=Fusion.RRF, top_k=5) == []


def test_top_k_cuts_and_hits_keep_their_fields() -> None:
    fused = fuse(LEX, DENSE, alpha=0.5, method=Fusion.RRF, top_k=2)
    assert len(fused) == 2
    assert fused[0].text == fused[0].chunk_id and fused[0].document_id == fused[0].chunk_id[0]


def test_alpha_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        fuse(LEX, DENSE, alpha=1.5, method=Fusion.RRF, top_k=2)


async def test_noop_reranker_keeps_order() -> None:
    assert await NoopReranker().rerank("q", list(LEX), 2) == LEX[:2]


def test_fuse_ranked_is_fuse_over_any_row_key() -> None:
    for method, alpha in ((Fusion.RRF, 0.3), (Fusion.RELATIVE_SCORE, 0.4), (Fusion.RELATIVE_SCORE, 1.0)):
        by_hits = fuse(LEX, DENSE, alpha=alpha, method=method, top_k=3)
        keys = {"a#0": 10, "b#0": 20, "c#0": 30, "d#0": 40}
        by_keys = fuse_ranked([(keys[h.chunk_id], h.score) for h in LEX], [(keys[h.chunk_id], h.score) for h in DENSE],
                              alpha=alpha, method=method, top_k=3)
        expected: list[Any] = [(keys[h.chunk_id], pytest.approx(h.score)) for h in by_hits]
        assert by_keys == expected


def test_the_noop_reranker_wants_only_the_results() -> None:
    assert NoopReranker().depth(10, 100) == 10
