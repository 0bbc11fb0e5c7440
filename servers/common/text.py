"""Text conventions shared by retrieval's chunker and the CLI's document readers: how text is
normalised before it is cut, what a bare heading is, and how a heading path is written. One
definition, so a document read by the CLI is titled exactly as retrieval would section it."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

SECTION_SEPARATOR = " > "
SENTENCE_END = (".", ";", ":", ",", "?", "!", "\u3002")

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_LINE_BREAKS = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n\n", "\u2028": "\n",
                              "\u2029": "\n\n", "\x85": "\n"})


def normalise(text: str) -> str:
    """NFC, '\\n' line ends, no control characters, no lone surrogates."""
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").translate(_LINE_BREAKS))
    return _CONTROL.sub("", text)


def has_content(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


# Finite verbs that make a short line a statement ("Staff must report breaches") rather
# than a heading ("Reporting of breaches").
_STATEMENT_WORDS = frozenset(
    "must shall should may might will would can cannot could is are was were be has have had do does"
    " means applies".split()
)


def is_bare_heading(paragraphs: list[str]) -> bool:
    """Whether a whole document is one heading line and nothing else.

    Corpora split into passages (BEIR, rulebook exports) carry headings as passages of
    their own ("Application", "PART 4 - Capital Resources"); indexed, such one-liners
    outrank real rules for any query that shares a word with them.
    """
    if len(paragraphs) != 1 or "\n" in paragraphs[0]:
        return False
    line = paragraphs[0].strip()
    words = line.lower().split()
    return (0 < len(words) <= 12 and len(line) <= 120 and not line.endswith(SENTENCE_END)
            and _STATEMENT_WORDS.isdisjoint(words))


@dataclass(frozen=True, slots=True)
class TextEdit:
    """chunk_text[at:at + length] stands for `original` in the document's original text."""

    at: int
    length: int
    original: str


@dataclass(frozen=True, slots=True)
class Location:
    """Where a chunk lies in its document's original text (as ingested, before `normalise`):
    original[start:end], which is the chunk's text with `edits` applied (`original_text`).
    Retrieval's chunker makes it; generation maps quoted spans back through it (the wire form
    is the contract's ChunkLocation).

    A chunk is not a plain slice of the original: the chunker collapses blank lines, strips
    line ends, drops noise lines and applies NFC. The edits record exactly those places, so
    a citation can point at the original's characters (docs/groundedness.md)."""

    start: int
    end: int
    edits: tuple[TextEdit, ...] = ()

    def original_text(self, chunk_text: str) -> str:
        parts: list[str] = []
        at = 0
        for edit in self.edits:
            parts.append(chunk_text[at:edit.at])
            parts.append(edit.original)
            at = edit.at + edit.length
        parts.append(chunk_text[at:])
        return "".join(parts)

    def to_original(self, position: int, *, end: bool = False) -> int:
        """The original offset of the chunk text's `position`. A position inside an edit maps
        to the edit's start (or, with `end`, its end), so a span never cuts an edit in half."""
        shift = 0
        for edit in self.edits:
            if position < edit.at or (end and position == edit.at):
                break
            if position < edit.at + edit.length:
                base = self.start + edit.at + shift
                return base + len(edit.original) if end else base
            shift += len(edit.original) - edit.length
        return self.start + position + shift
