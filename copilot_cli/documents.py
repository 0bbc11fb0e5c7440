"""Reading documents for ingestion: text/markdown files, PDFs and BEIR corpus.jsonl.

One BEIR reader serves `copilot ingest` and `copilot eval` / the retrieval bench, so what
is evaluated is exactly what a user's ingest would index.

BEIR corpora split rulebooks into passages and carry headings as passages of their own
("1.2" "Application", then "1.2.1.(1)" "Subject to (2), ..."). When a corpus has no titles
and its passage ids give a hierarchy (metadata `PassageID`, per `DocumentID`), every
passage is titled with the path of headings above it, as a document ingested whole would
have: that context is what many questions name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from copilot.v1 import retrieval_pb2
from servers.common.text import SECTION_SEPARATOR, is_bare_heading, normalise

RESERVED_METADATA = frozenset({"source", "document_id"})
# A BEIR line's metadata key holding its access labels ("group:hr,user:alice" or a list).
ACCESS_METADATA = "_access"
# A markdown or text file may open with a front-matter block (between `---` lines) whose
# `access:` line gives the file's access labels; the block is not indexed.
_FRONT_MATTER = "---"


def front_matter(text: str) -> tuple[dict[str, str], str]:
    """The `key: value` lines of a leading `---` block, and the text after it."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != _FRONT_MATTER:
        return {}, text
    for end in range(1, len(lines)):
        if lines[end].strip() == _FRONT_MATTER:
            fields: dict[str, str] = {}
            for line in lines[1:end]:
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip().lower()] = value.strip()
            return fields, "".join(lines[end + 1:])
    return {}, text


def access_labels(value: object) -> list[str]:
    """Labels from a string ("group:hr, user:alice") or a list of them."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list):
        return [str(part).strip() for part in value if str(part).strip()]
    return []
TEXT_SUFFIXES = {".txt": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown"}
PDF_SUFFIX = ".pdf"
SUPPORTED = ".txt, .md, .pdf or a BEIR corpus.jsonl"


class DocumentError(ValueError):
    pass


def expand(paths: list[Path]) -> list[Path]:
    """Files to ingest: the given files, and supported files found under given folders."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and _supported(p)))
        elif path.is_file():
            if not _supported(path):
                raise DocumentError(f"{path}: unsupported file type (use {SUPPORTED})")
            files.append(path)
        else:
            raise DocumentError(f"{path}: no such file or folder")
    return files


def _supported(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in TEXT_SUFFIXES or suffix == PDF_SUFFIX or path.name.endswith(".jsonl")


def count(files: list[Path]) -> int:
    total = 0
    for path in files:
        if path.name.endswith(".jsonl"):
            with path.open("rb") as fh:
                total += sum(1 for line in fh if line.strip())
        else:
            total += 1
    return total


def read(files: list[Path], root: Path | None = None) -> Iterator[retrieval_pb2.Document]:
    for path in files:
        if path.name.endswith(".jsonl"):
            yield from _beir(path)
        elif path.suffix.lower() == PDF_SUFFIX:
            yield _pdf_file(path, root)
        else:
            yield _text_file(path, root)


def _document_id(path: Path, root: Path | None) -> str:
    """The path below the ingested folder (stable across machines), else the file name."""
    base = root or path.parent
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name


def _source(path: Path, root: Path | None) -> str:
    """Where a document came from, as the user named it, never as an absolute path of
    this machine (citations show it to every reader of the tenant): a file of an ingested
    folder as `folder/sub/file.md`, a file given by a relative path as given, else its name."""
    if root is not None:
        try:
            return str(Path(root.resolve().name) / path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    if not path.is_absolute() and ".." not in path.parts:
        return str(path)
    return path.name


def _title_from_name(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ")


def _text_file(path: Path, root: Path | None) -> retrieval_pb2.Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{path}: not UTF-8 text ({exc.reason})") from None
    fields, text = front_matter(text)
    title = _title_from_name(path)
    for line in text.splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
            break
    return retrieval_pb2.Document(document_id=_document_id(path, root), title=title, text=text,
                                  source=_source(path, root), access=access_labels(fields.get("access", "")),
                                  content_type=TEXT_SUFFIXES.get(path.suffix.lower(), "text/plain"))


def _pdf_file(path: Path, root: Path | None) -> retrieval_pb2.Document:
    """A PDF's text layer, page by page (pypdf), as plain text.

    Pages are separated by a blank line, so the chunker's paragraph and numbered-rule
    detection sees a page break as a paragraph break; the page count is kept in the
    document's metadata (`pages`). A PDF without a text layer (a scan) is refused
    with an error that says so, rather than indexed as an empty document.
    """
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{path}: the PDF is encrypted; decrypt it first")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        info = reader.metadata
        title = str(info.title).strip() if info is not None and info.title else ""
    except DocumentError:
        raise
    except (PyPdfError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DocumentError(f"{path}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    text = "\n\n".join(page for page in pages if page)
    if not text:
        raise DocumentError(f"{path}: the PDF has no text layer (a scanned PDF needs OCR before ingestion)")
    return retrieval_pb2.Document(document_id=_document_id(path, root), title=title or _title_from_name(path),
                                  text=text, source=_source(path, root), content_type="text/plain",
                                  metadata={"pages": str(len(pages))})


@dataclass(frozen=True, slots=True)
class Passage:
    """One BEIR corpus line, as ingested."""

    doc_id: str
    title: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    access: tuple[str, ...] = ()

    def to_document(self, source: str) -> retrieval_pb2.Document:
        return retrieval_pb2.Document(document_id=self.doc_id, title=self.title, text=self.text,
                                      source=f"{source}#{self.doc_id}", metadata=self.metadata,
                                      access=list(self.access))


def _pid_parts(passage_id: str) -> tuple[str, ...]:
    return tuple(part for part in passage_id.split(".") if part)


def _is_prefix(parent: tuple[str, ...], child: tuple[str, ...]) -> bool:
    return len(parent) < len(child) and child[:len(parent)] == parent


def iter_corpus(path: Path, headings: bool = True) -> Iterator[Passage]:
    """The corpus's passages in file order; with `headings`, a passage without a title of
    its own is titled by its heading path (when passage ids give a hierarchy)."""
    # Per source document: the open headings, as (passage id parts, heading text).
    stacks: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc_id = str(row["_id"])
                raw_meta = dict(row.get("metadata") or {})
                access = tuple(access_labels(raw_meta.pop(ACCESS_METADATA, None)))
                # `source` and `document_id` are reserved filter names of the document itself.
                metadata = {str(k): str(v) for k, v in raw_meta.items()
                            if isinstance(v, str | int | float) and k not in RESERVED_METADATA}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise DocumentError(f"{path}:{number}: not a BEIR corpus line ({exc})") from None
            title = str(row.get("title") or "")
            text = str(row.get("text") or "")
            passage_id = metadata.get("PassageID")
            if headings and not title and passage_id:
                parts = _pid_parts(passage_id)
                stack = stacks.setdefault(metadata.get("DocumentID", ""), [])
                while stack and not _is_prefix(stack[-1][0], parts):
                    stack.pop()
                body = normalise(text).strip()
                if body and is_bare_heading([body]):
                    stack.append((parts, " ".join(body.split())))
                title = SECTION_SEPARATOR.join(heading for _, heading in stack)
            yield Passage(doc_id, title, text, metadata, access)


def read_corpus(path: Path, headings: bool = True) -> list[Passage]:
    return list(iter_corpus(path, headings))


def _beir(path: Path) -> Iterator[retrieval_pb2.Document]:
    for passage in iter_corpus(path):
        yield passage.to_document(path.name)
