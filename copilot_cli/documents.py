"""Reading documents for ingestion: text/markdown files and BEIR corpus.jsonl."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from copilot.v1 import retrieval_pb2

RESERVED_METADATA = frozenset({"source", "document_id"})
TEXT_SUFFIXES = {".txt": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown"}


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
                raise DocumentError(f"{path}: unsupported file type (use .txt, .md or a BEIR corpus.jsonl)")
            files.append(path)
        else:
            raise DocumentError(f"{path}: no such file or folder")
    return files


def _supported(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES or path.name.endswith(".jsonl")


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
        else:
            yield _text_file(path, root)


def _text_file(path: Path, root: Path | None) -> retrieval_pb2.Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{path}: not UTF-8 text ({exc.reason})") from None
    title = path.stem.replace("-", " ").replace("_", " ")
    for line in text.splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
            break
    base = root or path.parent
    try:
        doc_id = str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        doc_id = path.name
    return retrieval_pb2.Document(document_id=doc_id, title=title, text=text, source=str(path),
                                  content_type=TEXT_SUFFIXES.get(path.suffix.lower(), "text/plain"))


def _beir(path: Path) -> Iterator[retrieval_pb2.Document]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc_id = str(row["_id"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DocumentError(f"{path}:{number}: not a BEIR corpus line ({exc})") from None
            metadata = row.get("metadata") or {}
            yield retrieval_pb2.Document(
                document_id=doc_id, title=str(row.get("title") or ""), text=str(row.get("text") or ""),
                source=f"{path.name}#{doc_id}",
                # `source` and `document_id` are reserved filter names of the document itself.
                metadata={str(k): str(v) for k, v in metadata.items()
                          if isinstance(v, str | int | float) and k not in RESERVED_METADATA},
            )
