"""Chunker: structure, size limits, overlap, noise and unicode edge cases."""

from __future__ import annotations

import itertools
import unicodedata

import pytest

from servers.common.text import normalise
from servers.retrieval.chunker import (
    ChunkingConfig,
    chunk_document,
    chunk_id,
    section_below_title,
    sentences,
)

SMALL = ChunkingConfig(max_chars=300, overlap_chars=80)


def texts(chunks: list) -> list[str]:
    return [c.text for c in chunks]


def sections(chunks: list) -> list[str]:
    return [c.section for c in chunks]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n", "\x00\x01", "---\n***\n___", "| --- | --- |"])
def test_empty_and_noise_yield_no_chunks(text: str) -> None:
    assert chunk_document("d", text) == []
    assert chunk_document("d", text, markdown=True) == []


def test_heading_only_documents_are_not_indexed() -> None:
    assert chunk_document("d", "# Policy\n\n## Scope\n\n### Details\n", markdown=True) == []
    assert chunk_document("d", "Article 5 Reporting\n\nRule 3.1\n") == []
    # A passage that is a heading on its own (as corpora exported passage by passage have).
    assert chunk_document("d", "INTRODUCTION") == []
    assert chunk_document("d", "Limitation on use of assets in Long Term Insurance Fund\n") == []


def test_short_statements_are_kept() -> None:
    assert texts(chunk_document("d", "Staff must report breaches")) == ["Staff must report breaches"]
    assert texts(chunk_document("d", "Records are kept for six years.")) == ["Records are kept for six years."]
    # Under a heading, even a bare short line is body text.
    only = chunk_document("d", "# Holidays\n\nOffice closed Friday", markdown=True)
    assert texts(only) == ["Office closed Friday"] and sections(only) == ["Holidays"]


def test_plain_paragraphs_without_headings_form_one_section() -> None:
    text = "First paragraph about data retention.\n\nSecond paragraph about deletion requests."
    chunks = chunk_document("doc", text)
    assert len(chunks) == 1
    assert chunks[0].section == ""
    assert chunks[0].text == text


def test_markdown_heading_paths_and_empty_sections_dropped() -> None:
    doc = """# AML Policy

Intro text for the policy.

## 1. Scope

This policy applies to all staff.

## 2. Reporting

### 2.1 Suspicious activity

Staff must report suspicious activity to the MLRO within 24 hours.

### 2.2 Nothing here

## 3. Records ##

Records are kept for five years.
"""
    chunks = chunk_document("aml", doc, markdown=True)
    assert sections(chunks) == [
        "AML Policy",
        "AML Policy > 1. Scope",
        "AML Policy > 2. Reporting > 2.1 Suspicious activity",
        "AML Policy > 3. Records",
    ]
    assert chunks[2].text == "Staff must report suspicious activity to the MLRO within 24 hours."
    assert all("#" not in c.text for c in chunks)


def test_setext_headings_and_code_fences() -> None:
    doc = """Policy
======

Body one.

Scope
-----

```python
# not a heading
x = 1

y = 2
```
"""
    chunks = chunk_document("d", doc, markdown=True)
    assert sections(chunks) == ["Policy", "Policy > Scope"]
    assert "# not a heading" in chunks[1].text and "y = 2" in chunks[1].text


def test_numbered_rules_build_a_hierarchy() -> None:
    doc = """Chapter 2 Conduct

Article 5 - Reporting

1. A firm must report every breach to the Regulator without delay.
2. A firm must keep a record of each report.

Rule 3.1 A firm must appoint a compliance officer. The officer reports to the board.
Rule 3.2 A firm must not tip off a customer.

1.2 Definitions

1.2.1 In these rules, a Relevant Person means any firm.

§ 7 Penalties

Fines apply.
"""
    chunks = chunk_document("rules", doc)
    assert sections(chunks) == [
        "Chapter 2 Conduct > Article 5 - Reporting > 1.",
        "Chapter 2 Conduct > Article 5 - Reporting > 2.",
        "Chapter 2 Conduct > Article 5 - Reporting > Rule 3.1",
        "Chapter 2 Conduct > Article 5 - Reporting > Rule 3.2",
        "Chapter 2 Conduct > Article 5 - Reporting > 1.2 Definitions > 1.2.1",
        "Chapter 2 Conduct > § 7 Penalties",
    ]
    # A rule's own line is its text; a title-like line is only a heading.
    assert chunks[2].text.startswith("Rule 3.1 A firm must appoint")
    assert "Definitions" not in chunks[4].text


def test_lists_and_wrapped_numbers_are_not_structure() -> None:
    plain = "Required documents\n\n1. Passport\n2. Utility bill\n3. Bank statement\n"
    chunks = chunk_document("d", plain)
    assert len(chunks) == 1 and "1. Passport\n2. Utility bill" in chunks[0].text
    markdown = "# Checklist\n\n1. Passport\n\n2. Utility bill\n"
    assert texts(chunk_document("d", markdown, markdown=True)) == ["1. Passport\n\n2. Utility bill"]
    wrapped = "The exemption in section\n5.1 of the Act applies to small firms.\nArticle 5 of the Act does too."
    chunks = chunk_document("d", wrapped)
    assert len(chunks) == 1 and chunks[0].section == ""


def test_huge_single_paragraph_is_split_with_overlap() -> None:
    sentences_in = [f"Sentence {i} explains obligation number {i} in detail." for i in range(400)]
    text = " ".join(sentences_in)
    config = ChunkingConfig()
    chunks = chunk_document("big", text, config=config)
    assert len(chunks) > 10
    assert all(len(c.text) <= config.max_chars for c in chunks)
    for previous, current in itertools.pairwise(chunks):
        # Each chunk opens with the previous chunk's last whole sentence(s).
        last = sentences(previous.text)[-1]
        assert current.text.startswith(sentences(current.text)[0])
        assert last in current.text[: config.overlap_chars + 1]
    covered = " ".join(c.text for c in chunks)
    assert all(s in covered for s in sentences_in)


def test_huge_text_without_spaces_is_cut_safely() -> None:
    # No whitespace and a combining mark with no precomposed form after every letter.
    text = "q\u0307" * 3000
    chunks = chunk_document("nospace", text, config=SMALL)
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(chunk.text) <= SMALL.max_chars
        assert not unicodedata.combining(chunk.text[0])
        assert not unicodedata.combining(chunk.text[-1]) or chunk.text[-2] == "q"


def test_long_lines_split_at_sentences_keep_every_word() -> None:
    words = [f"w{i}" for i in range(3000)]
    text = " ".join(words)  # one 'sentence' far over the limit: cut at whitespace
    chunks = chunk_document("words", text, config=SMALL)
    assert all(len(c.text) <= SMALL.max_chars for c in chunks)
    seen = {w for c in chunks for w in c.text.split()}
    assert seen == set(words)


def test_unicode_is_preserved_and_normalised() -> None:
    doc = "# Règles générales 📜\n\nLe client doit e\u0301tre informé. Ελληνικά κείμενα. 中文规则。第二条规则。"
    chunks = chunk_document("u", doc, markdown=False)
    assert chunks
    assert chunks[0].section == "Règles générales 📜"
    assert "Ελληνικά" in chunks[0].text and "中文规则。" in chunks[0].text
    assert "doit \u00e9tre" in chunks[0].text
    assert normalise("e\u0301") == "\u00e9"
    assert sentences("中文规则。第二条规则。") == ["中文规则。", "第二条规则。"]
    # Lone surrogates (possible from Python callers, never from protobuf) are replaced.
    assert "\ud800" not in normalise("bad \ud800 char")


def test_ids_are_deterministic_and_ordinal_based() -> None:
    doc = "# A\n\n" + "Text. " * 500 + "\n\n# B\n\nMore text."
    first = chunk_document("doc#1", doc, markdown=True, config=SMALL)
    second = chunk_document("doc#1", doc, markdown=True, config=SMALL)
    assert first == second
    assert [c.ordinal for c in first] == list(range(len(first)))
    assert first[0].chunk_id == "doc#1#0" == chunk_id("doc#1", 0)
    assert len({c.chunk_id for c in first}) == len(first)


def test_config_validation_and_signature() -> None:
    with pytest.raises(ValueError):
        ChunkingConfig(max_chars=50)
    with pytest.raises(ValueError):
        ChunkingConfig(max_chars=300, overlap_chars=200)
    assert ChunkingConfig().signature != SMALL.signature


def test_the_section_shown_beside_a_title_does_not_repeat_it() -> None:
    chunks = chunk_document("p", "# Policy\n\n## 6. Approvals\n\nTwo signatures.", markdown=True)
    assert chunks[0].section == "Policy > 6. Approvals"  # indexed with the title: it ranks
    assert section_below_title("Policy", chunks[0].section) == "6. Approvals"
    assert section_below_title(" policy ", "Policy") == ""
    assert section_below_title("Policy manual", "Policy > 6. Approvals") == "Policy > 6. Approvals"
    assert section_below_title("", "Policy > 6. Approvals") == "Policy > 6. Approvals"
