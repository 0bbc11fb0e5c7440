"""PDF ingestion in the CLI reader: real PDFs written with pypdf, read back by `documents.read`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from copilot_cli import documents


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def write_pdf(path: Path, pages: list[list[str]], title: str | None = None) -> Path:
    """A PDF whose pages carry these lines as real text (Helvetica), one line per row."""
    writer = PdfWriter()
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    font_ref = writer._add_object(font)
    for lines in pages:
        page = writer.add_blank_page(width=612, height=792)
        ops = ["BT", "/F1 11 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            ops += [f"({_escape(line)}) Tj", "T*"]
        ops.append("ET")
        stream = DecodedStreamObject()
        stream.set_data("\n".join(ops).encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font_ref})})
    if title:
        writer.add_metadata({"/Title": title})
    with path.open("wb") as fh:
        writer.write(fh)
    return path


def test_pdf_pages_become_one_plain_text_document(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "aml-policy.pdf", [
        ["1.1 Customer due diligence", "A firm must verify the identity of each customer."],
        ["1.2 Record keeping", "Records must be kept for at least five years."],
    ], title="AML Policy 2026")
    files = documents.expand([tmp_path])
    assert files == [pdf]
    assert documents.count(files) == 1
    [doc] = list(documents.read(files, root=tmp_path))
    assert doc.document_id == "aml-policy.pdf"
    assert doc.title == "AML Policy 2026"
    assert doc.content_type == "text/plain"
    assert doc.metadata["pages"] == "2"
    assert "verify the identity of each customer" in doc.text
    # The page break is a paragraph break, in page order.
    first, second = doc.text.split("\n\n")
    assert "Customer due diligence" in first and "five years" in second


def test_pdf_without_title_metadata_is_titled_by_its_file_name(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "travel_rule-guide.pdf", [["Transfers above the threshold carry originator data."]])
    [doc] = list(documents.read([pdf]))
    assert doc.title == "travel rule guide"


def test_pdf_without_a_text_layer_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "scan.pdf", [[]])
    with pytest.raises(documents.DocumentError, match="no text layer"):
        list(documents.read([pdf]))


def test_a_broken_pdf_is_refused_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\nthis is not a PDF body at all")
    with pytest.raises(documents.DocumentError, match=r"broken\.pdf: not a readable PDF"):
        list(documents.read([broken]))


def test_an_encrypted_pdf_is_refused(tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=write_pdf(tmp_path / "plain.pdf", [["secret rule"]]))
    writer.encrypt(user_password="pw", owner_password="owner", algorithm="AES-128")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as fh:
        writer.write(fh)
    with pytest.raises(documents.DocumentError, match="encrypted"):
        list(documents.read([locked]))


def test_unsupported_files_name_the_supported_kinds(tmp_path: Path) -> None:
    other = tmp_path / "sheet.xlsx"
    other.write_bytes(b"PK")
    with pytest.raises(documents.DocumentError, match=r"\.pdf"):
        documents.expand([other])
