"""Rule-based question decomposition and reciprocal rank fusion."""

from __future__ import annotations

from servers.generation.decompose import fuse, split
from servers.generation.providers import Passage


def test_compare_questions_split_into_their_subjects() -> None:
    assert split("Compare the retention of KYC records and the retention of transaction logs") == [
        "the retention of KYC records", "the retention of transaction logs"]


def test_multi_part_questions_split() -> None:
    assert split("Who approves high-risk customers and how often are they reviewed?") == [
        "Who approves high-risk customers", "how often are they reviewed?"]
    assert split("How long do we keep KYC records? Who must approve a high-risk customer?") == [
        "How long do we keep KYC records?", "Who must approve a high-risk customer?"]


def test_simple_questions_stay_whole() -> None:
    assert split("What is the retention period for records and logs?") == [
        "What is the retention period for records and logs?"]


def _p(cid: str) -> Passage:
    return Passage(document_id="d", chunk_id=cid, title="", section="", text=cid, score=1.0, source="")


def test_fusion_keeps_each_sub_questions_best_passage() -> None:
    a = [_p("a1"), _p("shared"), _p("a2"), _p("a3")]
    b = [_p("b1"), _p("shared"), _p("b2")]
    fused = [p.chunk_id for p in fuse([a, b], top_k=3)]
    assert "a1" in fused and "b1" in fused and fused[0] == "shared"
