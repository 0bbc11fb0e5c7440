"""What the CLI prints for scripts (`--json`) and where its documents say they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copilot.v1 import metering_pb2, retrieval_pb2, tenant_pb2
from copilot_cli import documents
from copilot_cli.jsonout import message_dict


def test_json_output_is_snake_case_with_numbers_as_numbers() -> None:
    usage = metering_pb2.GetUsageResponse(tenant_id="acme", requests=2, total_tokens=30, by_model=[
        metering_pb2.ModelUsage(model="m1", requests=2, input_tokens=20, output_tokens=10, cost_micros=7)])
    out = json.loads(json.dumps(message_dict(usage)))
    assert out["requests"] == 2 and out["total_tokens"] == 30 and out["events"] == 0
    assert out["by_model"] == [{"model": "m1", "requests": 2, "input_tokens": 20, "output_tokens": 10,
                                "cost_micros": 7}]
    search = retrieval_pb2.SearchResponse(hits=[retrieval_pb2.SearchHit(
        document_id="d", chunk_id="d#0", title="T", section="S", text="x", score=1.5, metadata={"k": "v"})])
    hit = message_dict(search)["hits"][0]
    assert (hit["document_id"], hit["score"], hit["metadata"]) == ("d", 1.5, {"k": "v"})
    tenant = message_dict(tenant_pb2.Tenant(tenant_id="acme", config_version=3,
                                            limits=tenant_pb2.TenantLimits(tokens_per_month=10**9)))
    assert tenant["config_version"] == 3 and tenant["limits"]["tokens_per_month"] == 10**9


@pytest.mark.parametrize("layout", ["folder", "relative file", "absolute file"])
def test_a_documents_source_is_never_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      layout: str) -> None:
    folder = tmp_path / "corpus" / "policies"
    folder.mkdir(parents=True)
    (folder / "aml.md").write_text("# AML\n\nKnow your customer.")
    monkeypatch.chdir(tmp_path)
    if layout == "folder":
        given = [folder]
        expected = "policies/aml.md"
    elif layout == "relative file":
        given = [Path("corpus/policies/aml.md")]
        expected = "corpus/policies/aml.md"
    else:
        given = [folder / "aml.md"]
        expected = "aml.md"
    root = given[0] if given[0].is_dir() else None
    [doc] = documents.read(documents.expand(given), root)
    assert doc.source == expected and doc.title == "AML"


def test_access_labels_come_from_front_matter_beir_metadata_and_lists(tmp_path: Path) -> None:
    """A document's readers, as a file or a BEIR corpus gives them (docs/access-control.md)."""
    memo = tmp_path / "memo.md"
    memo.write_text("---\naccess: group:hr, user:alice\ntitle-ignored: x\n---\n# Memo\n\nInvestigation notes.\n")
    public = tmp_path / "public.md"
    public.write_text("# Public\n\nEveryone may read this.\n")
    unclosed = tmp_path / "unclosed.md"
    unclosed.write_text("---\naccess: group:hr\n# Not front matter: never closed\n")
    docs = {d.document_id: d for d in documents.read([memo, public, unclosed], root=tmp_path)}
    docs = {k.removesuffix(".md"): v for k, v in docs.items()}
    assert list(docs["memo"].access) == ["group:hr", "user:alice"]
    # The block is not indexed; the text starts after it.
    assert docs["memo"].text.startswith("# Memo") and "access:" not in docs["memo"].text
    assert list(docs["public"].access) == [] and list(docs["unclosed"].access) == []
    assert "access: group:hr" in docs["unclosed"].text
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(line) for line in (
        {"_id": "a", "title": "A", "text": "Restricted.", "metadata": {"_access": "group:legal", "k": "v"}},
        {"_id": "b", "title": "B", "text": "Listed.", "metadata": {"_access": ["user:bob", " group:hr "]}},
        {"_id": "c", "title": "C", "text": "Open."})) + "\n")
    passages = {p.doc_id: p for p in documents.read_corpus(corpus)}
    assert passages["a"].access == ("group:legal",) and passages["a"].metadata == {"k": "v"}
    assert passages["b"].access == ("user:bob", "group:hr") and passages["c"].access == ()
    assert documents.access_labels("") == [] and documents.access_labels(None) == []
