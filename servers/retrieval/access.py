"""Document-level access control: who may read a document, and who is reading.

A document carries access labels, `group:NAME` and `user:SUBJECT`; a reader (the caller's
verified subject and groups) may read it when the document has no labels (the whole tenant
may) or when any one label names the reader or one of its groups. Nobody is exempt: an
admin changes labels (SetDocumentAccess, audited) rather than reading past them.

Stores enforce it where they rank (docs/access-control.md): a document the reader may not
read is removed before the cut to top_k, so it never takes a permitted document's place.
`AccessCheck` also asks the store how many documents it withheld that would have ranked
within the caller's top_k, a count for the audit trail (never which, never to the caller).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

GROUP = "group"
USER = "user"
# How an unrestricted document is marked where a store needs a value to match (Weaviate's
# `containsAny`): no real label has this form.
PUBLIC_LABEL = "*"

MAX_LABELS = 64
MAX_LABEL_CHARS = 256
_LABEL = re.compile(r"^(group|user):(\S(?:.*\S)?)$")


class AccessLabelError(ValueError):
    """A label that is neither `group:NAME` nor `user:SUBJECT`."""


def parse_labels(labels: Iterable[str]) -> frozenset[str]:
    """Validated, normalised labels (`group:hr`, `user:alice`); raises AccessLabelError."""
    out: set[str] = set()
    for raw in labels:
        label = raw.strip()
        if len(label) > MAX_LABEL_CHARS:
            raise AccessLabelError(f"access label longer than {MAX_LABEL_CHARS} characters")
        match = _LABEL.match(label)
        if match is None or any(ch < " " or ch == "\x7f" for ch in label) or "," in label:
            raise AccessLabelError(f"access label {raw!r} is not group:NAME or user:SUBJECT"
                                   " (no commas or control characters)")
        out.add(label)
    if len(out) > MAX_LABELS:
        raise AccessLabelError(f"at most {MAX_LABELS} access labels per document, got {len(out)}")
    return frozenset(out)


def split_labels(text: str) -> list[str]:
    """`group:hr, user:alice` (a CLI flag, a front-matter line, a BEIR `_access` string) as labels."""
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True, slots=True)
class Reader:
    """Who is searching: the verified subject and groups of the call."""

    subject: str
    groups: frozenset[str] = frozenset()

    @property
    def labels(self) -> frozenset[str]:
        """Every label that admits this reader."""
        users = (f"{USER}:{self.subject}",) if self.subject.strip() else ()
        return frozenset({*users, *(f"{GROUP}:{g}" for g in self.groups if g.strip())})

    def may_read(self, labels: frozenset[str] | set[str] | tuple[str, ...]) -> bool:
        return not labels or not self.labels.isdisjoint(labels)

    def view(self, labels_in_use: frozenset[str] | None) -> tuple[str, ...]:
        """What decides this reader's results among documents labelled with `labels_in_use`
        (None: unknown, so all of the reader's labels): two readers with the same view see
        the same documents, so they may share cached results."""
        mine = self.labels if labels_in_use is None else self.labels & labels_in_use
        return tuple(sorted(mine))


@dataclass(eq=False)
class AccessCheck:
    """One search's access rule and what the store reports back.

    `depth`: a withheld document is counted when, without access control, one of its chunks
    would have ranked within this many of a list the search ran (the caller's top_k).
    """

    reader: Reader
    depth: int
    # Document ids withheld (filled by the store; only the count leaves the service).
    withheld: set[str] = field(default_factory=set)

    @property
    def labels(self) -> frozenset[str]:
        return self.reader.labels
