"""Structure-aware chunking of plain text and markdown.

A document is first cut into sections at its structure (markdown headings and numbered
rules such as "1.2", "Article 5", "Rule 3.1", "§ 4"); every chunk remembers its path of
headings, which both ranks it (the section is indexed) and cites it. A section longer
than the size limit is packed into several chunks along paragraph, line and sentence
boundaries, each later chunk starting with the last sentence(s) of the one before, so a
rule split in two still reads with its context. Sections with no body (a heading followed
by another heading) and passages with no letters or digits are dropped rather than
indexed: they only ever match as noise.

Everything here is pure and deterministic: the same input yields the same chunks and ids.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

from servers.common.text import (
    SECTION_SEPARATOR,
    SENTENCE_END,
    Location,
    TextEdit,
    has_content,
    is_bare_heading,
    normalise,
)

# Bumped whenever chunk boundaries change, so stored documents are re-indexed.
# v2: chunks carry their place in the original text (`Location`); boundaries as in v1.
CHUNKER_VERSION = 2

MAX_LABEL_CHARS = 200


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    max_chars: int = 1200
    overlap_chars: int = 200

    def __post_init__(self) -> None:
        if self.max_chars < 100:
            raise ValueError("max_chars must be at least 100")
        if not 0 <= self.overlap_chars <= self.max_chars // 3:
            raise ValueError("overlap_chars must be between 0 and a third of max_chars")

    @property
    def signature(self) -> str:
        return f"chunker-v{CHUNKER_VERSION}:{self.max_chars}:{self.overlap_chars}"


DEFAULT_CONFIG = ChunkingConfig()


@dataclass(frozen=True, slots=True)
class Chunk:
    document_id: str
    ordinal: int
    section_path: tuple[str, ...]
    text: str
    # None only for chunks read back from a store that indexed them before offsets were kept.
    location: Location | None = None

    @property
    def chunk_id(self) -> str:
        return chunk_id(self.document_id, self.ordinal)

    @property
    def section(self) -> str:
        return SECTION_SEPARATOR.join(self.section_path)


def section_below_title(title: str, section: str) -> str:
    """The heading path to show beside a document's title: a markdown document's first
    heading is usually its title too, and "Policy › Policy > 6. Approvals" says it twice.
    The stored section keeps it (it ranks the chunk); only what is shown drops it."""
    head, sep, rest = section.partition(SECTION_SEPARATOR)
    if title and " ".join(head.split()).casefold() == " ".join(title.split()).casefold():
        return rest if sep else ""
    return section


def chunk_id(document_id: str, ordinal: int) -> str:
    # Unambiguous even when document ids contain '#': the ordinal is after the last one.
    return f"{document_id}#{ordinal}"


def chunk_document(document_id: str, text: str, *, markdown: bool = False,
                   config: ChunkingConfig = DEFAULT_CONFIG) -> list[Chunk]:
    """The chunks of one document, in reading order, with ordinals 0..n-1, each located in
    `text` as given."""
    sections = _Parser(markdown).parse(normalise(text).split("\n"))
    if len(sections) == 1 and not sections[0].path and is_bare_heading(sections[0].paragraphs):
        return []
    chunks: list[Chunk] = []
    cursor = 0
    for section in sections:
        paragraphs = [p for p in section.paragraphs if has_content(p)]
        if not paragraphs:
            continue
        for piece in _pack(paragraphs, config):
            location = locate(piece, text, cursor)
            # Chunks follow each other; an overlapping one starts inside its predecessor.
            cursor = location.start
            chunks.append(Chunk(document_id, len(chunks), section.path, piece, location))
    return chunks


# --- location -------------------------------------------------------------------------------

_TOKEN = re.compile(r"\S+")
# How far past the previous match a token may be found: further means a long dropped stretch
# (a table rule, a heading-free noise block) or a false match; the token is then left to an edit.
_TOKEN_REACH = 400
_ANCHOR_TOKENS = 6


def locate(chunk: str, original: str, cursor: int = 0) -> Location:
    """Where `chunk` (the chunker's text) lies in `original` at or after `cursor`.

    Walks the chunk's words through the original in order; whatever lies between two
    matched words and differs becomes an edit. The result reproduces the original exactly
    (`Location.original_text`), whatever the match quality: a word that cannot be matched
    only widens an edit."""
    tokens = [(m.start(), m.group(0)) for m in _TOKEN.finditer(chunk)]
    start = _anchor(tokens, original, cursor)
    if start < 0:
        return Location(cursor, cursor, (TextEdit(0, len(chunk), ""),)) if chunk else Location(cursor, cursor)
    edits: list[TextEdit] = []
    chunk_at, orig_at = 0, start
    for position, token in tokens:
        limit = orig_at + _TOKEN_REACH + (position - chunk_at)
        found = original.find(token, orig_at, limit + len(token))
        if found < 0:
            continue
        if chunk[chunk_at:position] != original[orig_at:found]:
            edits.append(TextEdit(chunk_at, position - chunk_at, original[orig_at:found]))
        chunk_at, orig_at = position + len(token), found + len(token)
    if chunk_at < len(chunk):
        edits.append(TextEdit(chunk_at, len(chunk) - chunk_at, ""))
    return Location(start, orig_at, tuple(edits))


def location_to_json(location: Location) -> str:
    """The stores' compact form: [start, end, [[at, length, original], ...]]."""
    return json.dumps([location.start, location.end, [[e.at, e.length, e.original] for e in location.edits]],
                      ensure_ascii=False, separators=(",", ":"))


def location_from_json(raw: str | None) -> Location | None:
    """None for a chunk stored before offsets were kept (or an unreadable value)."""
    if not raw:
        return None
    try:
        start, end, edits = json.loads(raw)
        return Location(int(start), int(end), tuple(TextEdit(int(a), int(n), str(o)) for a, n, o in edits))
    except (ValueError, TypeError):
        return None


def _anchor(tokens: list[tuple[int, str]], original: str, cursor: int) -> int:
    """Where the chunk's first words are in the original: the first few words in order with
    any whitespace between them, else the first word found alone."""
    if not tokens:
        return -1
    words = [re.escape(t) for _, t in tokens[:_ANCHOR_TOKENS]]
    match = re.compile(r"\s+".join(words)).search(original, cursor)
    if match:
        return match.start()
    for _, token in tokens[:_ANCHOR_TOKENS]:
        found = original.find(token, cursor)
        if found >= 0:
            return found
    return -1


# --- structure ----------------------------------------------------------------------------

_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_THEMATIC_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")

_KEYWORD_RANK = {
    "part": 10, "title": 10, "chapter": 11,
    "section": 12, "article": 12, "schedule": 12, "annex": 12, "appendix": 12,
    "regulation": 13, "rule": 13, "clause": 13,
}
_NUMBER = r"\d{1,4}[A-Za-z]?(?:\.\d{1,4}[A-Za-z]?)*"
_KEYWORD_MARKER = re.compile(
    r"^(?P<kw>[A-Za-z]+)[ \t]+(?P<num>" + _NUMBER + r"|[IVXLCDM]{1,8}|[A-Z])(?=$|[\s.:)\-\u2013\u2014])"
    r"[.:)]?[ \t]*(?:[-\u2013\u2014:][ \t]*)?(?P<rest>.*)$"
)
_SECTION_SIGN = re.compile(r"^(?P<kw>§{1,2})[ \t]*(?P<num>" + _NUMBER + r")\.?(?:[ \t]+|$)(?P<rest>.*)$")
# "1." needs its dot (a bare "1" starts too many ordinary lines); "1.2" and deeper need not.
_NUMERIC_MARKER = re.compile(r"^(?P<num>\d{1,3}\.|\d{1,3}(?:\.\d{1,3})+\.?)(?:[ \t]+|$)(?P<rest>.*)$")


@dataclass(frozen=True, slots=True)
class _Marker:
    rank: int
    # Same style and depth: consecutive short markers of one kind are a list, not headings.
    kind: str
    keyword: bool
    label: str
    rest: str
    line: str

    @property
    def title_like(self) -> bool:
        rest = self.rest
        return not rest or (len(rest) <= 100 and len(rest.split()) <= 12 and not rest.endswith(SENTENCE_END))


def _depth(number: str) -> int:
    return len([part for part in number.strip(".").split(".") if part])


def _marker(line: str, markdown: bool) -> _Marker | None:
    stripped = line.strip()
    if not stripped or (not stripped[0].isalnum() and stripped[0] != "§"):
        return None
    match = _KEYWORD_MARKER.match(stripped)
    if match:
        keyword = match["kw"]
        base = _KEYWORD_RANK.get(keyword.lower())
        # Capitalised or upper case only: "section 5 of the Act" mid-sentence is prose.
        if base is None or not (keyword[0].isupper() and (keyword[1:].islower() or keyword.isupper())):
            match = None
        else:
            rank = base + _depth(match["num"]) - 1 if match["num"][0].isdigit() else base
            kind = f"{keyword.lower()}:{_depth(match['num'])}"
            label = f"{keyword} {match['num']}"
    if match is None:
        match = _SECTION_SIGN.match(stripped)
        if match:
            rank, kind = 12 + _depth(match["num"]) - 1, f"§:{_depth(match['num'])}"
            label = f"{match['kw']} {match['num']}"
    if match is None:
        match = _NUMERIC_MARKER.match(stripped)
        if match is None:
            return None
        depth = _depth(match["num"])
        if markdown and depth == 1:
            return None  # "1. item" is a markdown ordered list, structure comes from '#'.
        rank, kind, label = 12 + depth, f"n:{depth}", match["num"]
    rest = match["rest"].strip()
    # "5.1 of the Act applies..." is a wrapped sentence, not a rule starting.
    if rest[:1].islower():
        return None
    return _Marker(rank=rank, kind=kind, keyword=not kind.startswith("n:"),
                   label=label, rest=rest, line=stripped)


def _clean_label(text: str) -> str:
    label = " ".join(text.split())
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "\u2026"


@dataclass
class _Section:
    path: tuple[str, ...]
    paragraphs: list[str]


class _Parser:
    def __init__(self, markdown: bool) -> None:
        self.markdown = markdown
        self.stack: list[tuple[int, str, bool]] = []
        self.sections: list[_Section] = []
        self.current = _Section((), [])
        self.paragraph: list[str] = []

    def parse(self, lines: list[str]) -> list[_Section]:
        markers = [_marker(line, self.markdown) for line in lines]
        fence: str | None = None
        for index, raw in enumerate(lines):
            line = raw.rstrip()
            if fence is not None:
                # Inside a code block nothing is structure, and blank lines do not split it.
                self.paragraph.append(line)
                if line.strip().startswith(fence):
                    fence = None
                    self._end_paragraph()
                continue
            if not line.strip():
                self._end_paragraph()
                continue
            if self.markdown and (fence_match := _FENCE.match(line)):
                self._end_paragraph()
                fence = fence_match.group(1)
                self.paragraph.append(line)
                continue
            heading = _MD_HEADING.match(line)
            if heading:
                title = (heading.group(2) or "").strip()
                if title:
                    self._open(len(heading.group(1)), title)
                else:
                    self._end_paragraph()
                continue
            if self.markdown and self._markdown_break(line):
                continue
            marker = markers[index]
            if marker is not None and not self._in_list(markers, lines, index, marker):
                if marker.title_like:
                    self._open(marker.rank, marker.line, marker.keyword)
                else:
                    # A rule with its text on the same line: the number names the section
                    # and the line is the section's first paragraph.
                    self._open(marker.rank, marker.label, marker.keyword)
                    self.paragraph.append(line)
                continue
            self.paragraph.append(line)
        self._end_section()
        return self.sections

    def _markdown_break(self, line: str) -> bool:
        setext = _SETEXT.match(line)
        if setext and len(self.paragraph) == 1 and _marker_free(self.paragraph[0]):
            title = self.paragraph.pop().strip()
            self._open(1 if setext.group(1)[0] == "=" else 2, title)
            return True
        if _THEMATIC_BREAK.match(line):
            self._end_paragraph()
            return True
        return False

    @staticmethod
    def _in_list(markers: list[_Marker | None], lines: list[str], index: int, marker: _Marker) -> bool:
        if not marker.title_like or marker.keyword:
            return False
        for neighbour in (index - 1, index + 1):
            if 0 <= neighbour < len(lines) and lines[neighbour].strip():
                other = markers[neighbour]
                if other is not None and other.kind == marker.kind:
                    return True
        return False

    def _open(self, rank: int, label: str, explicit: bool = True) -> None:
        """Starts a section. `explicit` headings (markdown, "Article 5", "Rule 3.1") state
        their full address, so they also close bare-number items ("1.", "2.") opened since,
        which are local to the rule they sit in."""
        self._end_section()
        while self.stack and (self.stack[-1][0] >= rank or (explicit and not self.stack[-1][2])):
            self.stack.pop()
        self.stack.append((rank, _clean_label(label), explicit))
        self.current = _Section(tuple(label for _, label, _ in self.stack), [])

    def _end_paragraph(self) -> None:
        if self.paragraph:
            self.current.paragraphs.append("\n".join(self.paragraph).strip("\n"))
            self.paragraph = []

    def _end_section(self) -> None:
        self._end_paragraph()
        if self.current.paragraphs:
            self.sections.append(self.current)
        self.current = _Section(self.current.path, [])


def _marker_free(line: str) -> bool:
    return not line.lstrip().startswith(("-", "*", "+", ">", "|"))


# --- size ---------------------------------------------------------------------------------

# A sentence ends at . ! ? … (optionally followed by a closing quote or bracket) before
# whitespace, or right after a CJK full stop, which is not followed by a space.
_SENTENCE_BREAK = re.compile(
    r"(?:(?<=[.!?\u2026])|(?<=[.!?\u2026][\"'\u201d\u2019)\]]))\s+|(?<=[\u3002\uff01\uff1f])(?=\S)"
)
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(text) if s.strip()]


def _pack(paragraphs: list[str], config: ChunkingConfig) -> list[str]:
    """Greedy packing of paragraph/line/sentence units into chunks of at most max_chars."""
    # Every unit leaves room for the overlap and its separator, so overlap always fits.
    limit = config.max_chars - config.overlap_chars - 2
    units: list[tuple[str, str]] = []
    for paragraph in paragraphs:
        units.extend(_units(paragraph, "\n\n", limit))
    chunks: list[str] = []
    current = ""
    for separator, unit in units:
        if not current:
            current = unit
        elif len(current) + len(separator) + len(unit) <= config.max_chars:
            current += separator + unit
        else:
            chunks.append(current)
            overlap = _overlap(current, config.overlap_chars)
            # The overlap is the previous chunk's exact tail, so joining it with the unit's
            # own separator reproduces the original text.
            current = overlap + separator + unit if overlap else unit
    if current:
        chunks.append(current)
    return [c.strip() for c in chunks if has_content(c)]


def _units(text: str, separator: str, limit: int) -> list[tuple[str, str]]:
    if len(text) <= limit:
        return [(separator, text)]
    units: list[tuple[str, str]] = []
    if "\n" in text:
        for i, line in enumerate(text.split("\n")):
            if line.strip():
                units.extend(_units(line, separator if i == 0 or not units else "\n", limit))
        return units
    parts = sentences(text)
    if len(parts) > 1:
        for part in parts:
            units.extend(_units(part, separator if not units else " ", limit))
        return units
    return _hard_split(text, separator, limit)


def _hard_split(text: str, separator: str, limit: int) -> list[tuple[str, str]]:
    """Cuts one over-long sentence at whitespace, or mid-text when it has none (CJK, URLs)."""
    pieces: list[tuple[str, str]] = []
    start, join = 0, separator
    while len(text) - start > limit:
        end = start + limit
        cut = end
        while cut > start + limit // 2 and not text[cut].isspace():
            cut -= 1
        if text[cut].isspace():
            pieces.append((join, text[start:cut]))
            start, join = cut + 1, " "
            while start < len(text) and text[start].isspace():
                start += 1
        else:
            end = _safe_cut(text, start, end)
            pieces.append((join, text[start:end]))
            start, join = end, ""
    if start < len(text):
        pieces.append((join, text[start:]))
    return pieces


def _safe_cut(text: str, start: int, end: int) -> int:
    """Moves a cut back so it never separates a base character from its combining marks
    or an emoji from its joiners."""
    while end > start + 1 and (unicodedata.combining(text[end]) or text[end] in _JOINERS
                               or text[end - 1] == "\u200d"):
        end -= 1
    return end


def _overlap(chunk: str, budget: int) -> str:
    """The chunk's last whole sentence(s) within budget, else its last words within budget."""
    if budget <= 0:
        return ""
    for match in _SENTENCE_BREAK.finditer(chunk):
        if len(chunk) - match.end() <= budget and chunk[match.end():].strip():
            return chunk[match.end():]
    tail = chunk[-budget:]
    if len(chunk) > budget:
        space = next((i for i, ch in enumerate(tail) if ch.isspace()), -1)
        if space >= 0:
            return tail[space + 1:].lstrip()
        return tail[_grapheme_start(tail):]
    return tail


def _grapheme_start(text: str) -> int:
    index = 0
    while index < len(text) - 1 and (unicodedata.combining(text[index]) or text[index] in _JOINERS):
        index += 1
    return index
