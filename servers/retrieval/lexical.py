"""A tenant's BM25 index in memory, ranking exactly as FTS5's bm25() does, about ten times faster.

FTS5 answers a lexical query by reading every matching doclist from the index's b-trees and
calling bm25() row by row through the auxiliary-function API: about 10 ms a question on the
ObliQA tenant (12k chunks). `LexicalIndex` holds the same postings as numpy arrays and ranks
with a few array slices and one `bincount` (about 0.3 ms; `python -m bench.lexical`), so
hybrid search fits the latency bar.

Exactness is the contract: the index is read from the tenant's own FTS5 index (fts5vocab), so
its tokens are FTS5's tokens; a query string is cut by SQLite's own tokenizer
(`QueryTokenizer`); and the score is fts5_aux.c's bm25 with the same float operations in the
same order, so scores are bit-identical (only the order of equal scores may differ):

    score(row) = sum over the query's phrases i of
                 idf_i * (f_i * (k1 + 1)) / (f_i + k1 * (1 - b + b * |D| / avgdl))

with FTS5's k1 = 1.2, b = 0.75 (or the store's own: `store.Bm25Params`);
idf_i = log((N - n_i + 0.5) / (n_i + 0.5)), floored at 1e-6, where
n_i is the number of rows holding phrase i anywhere; f_i the phrase's instances in the row,
each weighted by its column's weight; |D| the row's tokens in all columns (FTS5's docsize
record); N and avgdl from FTS5's averages record (rows and tokens in the whole table, empty
rows included). FTS5 returns minus that sum; callers here get the sum (higher is better).

A query's phrases (`store.match_expression`) are single terms and adjacent word pairs, so the
index keeps unigram postings and bigram postings (adjacent tokens in one column). A phrase the
tokenizer cuts into three or more tokens (possible only when it splits a query word) cannot be
scored here: `search` answers None and the caller asks FTS5.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from servers.common.lru import LruCache

# The tokenizer of the tenant tables the store creates. Queries are cut with the tokenizer
# read from each table's own definition (`tokenize_option`), so a file made under another
# setting is still searched with its own.
TOKENIZE = "porter unicode61 remove_diacritics 2"
# FTS5's default when a table names none.
_DEFAULT_TOKENIZE = "unicode61"
_TOKENIZE_OPTION = re.compile(r"""\btokenize\s*=\s*(?:'((?:[^']|'')*)'|"((?:[^"]|"")*)"|([\w]+))""", re.IGNORECASE)
# chunks_fts's columns, in order (the weights follow it).
COLUMNS = ("title", "section", "text")

# fts5_aux.c's constants.
K1 = 1.2
B = 0.75
MIN_IDF = 1e-6

_FTS_TABLE = "chunks_fts"
# fts5_index.c: the averages record (rows, then tokens per column) is row 1 of %_data.
_AVERAGES_ROWID = 1
# Position of a token: row index, column and offset packed in one int64 (an FTS5 offset
# fits 31 bits), so adjacent tokens of one column are exactly one apart.
_ROW_SHIFT = 34
_COL_SHIFT = 32

Int32s = npt.NDArray[np.int32]
Int64s = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Ranked = list[tuple[int, float]]


def _varints(blob: bytes) -> list[int]:
    """SQLite's varints (big-endian 7-bit groups; a 9th byte carries 8 bits)."""
    values: list[int] = []
    value = length = 0
    for byte in blob:
        if length == 8:
            values.append((value << 8) | byte)
            value = length = 0
            continue
        value = (value << 7) | (byte & 0x7F)
        length += 1
        if byte < 0x80:
            values.append(value)
            value = length = 0
    return values


def tokenize_option(conn: sqlite3.Connection, table: str) -> str:
    """The `tokenize=` option an FTS5 table was created with."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    found = _TOKENIZE_OPTION.search(row[0]) if row is not None else None
    if found is None:
        return _DEFAULT_TOKENIZE
    single, double, bare = found.groups()
    if single is not None:
        return str(single).replace("''", "'")
    if double is not None:
        return str(double).replace('""', '"')
    return str(bare)


def _parse_ints(parts: list[str]) -> Int64s:
    # group_concat + one numpy parse is several times faster than a Python row per token.
    text = " ".join(part for part in parts if part)
    return np.fromstring(text, dtype=np.int64, sep=" ") if text else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class _Postings:
    """Postings keyed by sorted int64 keys: for key i, rows[starts[i]:starts[i+1]] (row
    indexes, ascending) and the phrase's column-weighted frequency in each."""

    keys: Int64s
    starts: Int64s
    rows: Int32s
    freqs: Floats

    @classmethod
    def group(cls, keys: npt.NDArray[np.integer], rows: Int64s, weights: Floats) -> _Postings:
        """From instances sorted by (key, row, position): one posting per (key, row)."""
        if not len(keys):
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0))
        change = np.empty(len(keys), dtype=bool)
        change[0] = True
        np.not_equal(keys[1:], keys[:-1], out=change[1:])
        change[1:] |= rows[1:] != rows[:-1]
        firsts = np.flatnonzero(change)
        # Summed in position order, as bm25() adds one weight per instance.
        freqs = np.add.reduceat(weights, firsts)
        posting_keys = keys[firsts]
        key_change = np.empty(len(firsts), dtype=bool)
        key_change[0] = True
        np.not_equal(posting_keys[1:], posting_keys[:-1], out=key_change[1:])
        key_firsts = np.flatnonzero(key_change)
        starts = np.append(key_firsts, len(firsts)).astype(np.int64)
        return cls(posting_keys[key_firsts].astype(np.int64), starts, rows[firsts].astype(np.int32), freqs)

    def lookup(self, key: int) -> tuple[Int32s, Floats] | None:
        i = int(np.searchsorted(self.keys, key))
        if i == len(self.keys) or self.keys[i] != key:
            return None
        start, end = self.starts[i], self.starts[i + 1]
        return self.rows[start:end], self.freqs[start:end]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.starts.nbytes + self.rows.nbytes + self.freqs.nbytes


@dataclass(frozen=True, slots=True)
class LexicalIndex:
    """One tenant's FTS5 postings and length norms, read once; immutable."""

    rowids: Int64s                 # chunk rowids, ascending; a row index points here
    norms: Floats                  # k1 * (1 - b + b * |D| / avgdl) per row
    k1: float
    total_rows: int                # N as bm25() sees it
    terms: dict[str, int]          # token -> term id
    unigrams: _Postings            # keyed by term id
    bigrams: _Postings             # keyed by first * len(terms) + second
    weights: tuple[float, ...]     # column weights the frequencies were summed with
    tokenize: str                  # the table's tokenizer: queries must be cut with it

    @classmethod
    def load(cls, conn: sqlite3.Connection, weights: Sequence[float], *, k1: float = K1,
             b: float = B) -> LexicalIndex:
        """Reads the tenant's FTS5 index (`chunks_fts`) on its connection, in one snapshot;
        scores with `k1` and `b` (FTS5's own by default, where the scores are bm25()'s)."""
        column_weights = np.asarray(weights, dtype=np.float64)
        if column_weights.shape != (len(COLUMNS),):
            raise ValueError(f"one weight per column {COLUMNS}, got {weights!r}")
        code = " ".join(f"WHEN '{name}' THEN {i}" for i, name in enumerate(COLUMNS))
        conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.lexical_instances"
                     f" USING fts5vocab(main, {_FTS_TABLE}, 'instance')")
        conn.execute("BEGIN")
        try:
            tokenize = tokenize_option(conn, _FTS_TABLE)
            averages = conn.execute(f"SELECT block FROM {_FTS_TABLE}_data WHERE id = ?",
                                    (_AVERAGES_ROWID,)).fetchone()
            sizes = conn.execute(f"SELECT id, sz FROM {_FTS_TABLE}_docsize ORDER BY id").fetchall()
            # fts5vocab walks the index term by term, so GROUP BY costs no sort; the three
            # aggregates see the same rows in the same order, so their items line up.
            groups = conn.execute(
                f"SELECT term, count(*), group_concat(doc, ' '), group_concat(CASE col {code} END, ''),"
                " group_concat(offset, ' ') FROM temp.lexical_instances GROUP BY term").fetchall()
        finally:
            conn.execute("COMMIT")

        # A table that never held a row has no averages record, or an empty one.
        totals = (_varints(averages[0]) if averages is not None and averages[0] else []) or [0]
        total_rows, total_tokens = totals[0], sum(totals[1:])
        rowids = np.fromiter((rowid for rowid, _ in sizes), dtype=np.int64, count=len(sizes))
        lengths = np.fromiter((sum(_varints(blob)) for _, blob in sizes), dtype=np.float64, count=len(sizes))
        if total_rows > 0:
            avgdl = float(total_tokens) / float(total_rows)
            norms = k1 * ((1 - b) + (b * lengths) / avgdl)
        else:
            norms = np.zeros(len(rowids))

        terms = {term: i for i, (term, *_) in enumerate(groups)}
        counts = np.fromiter((count for _, count, *_ in groups), dtype=np.int64, count=len(groups))
        # Intermediates are dropped as soon as they are used: the peak, not the result, is
        # what a big tenant's build costs in memory.
        docs = _parse_ints([g[2] for g in groups])
        columns = np.frombuffer("".join(g[3] for g in groups).encode("ascii"), dtype=np.uint8) - ord("0")
        offsets = _parse_ints([g[4] for g in groups])
        del groups
        if not (len(docs) == len(columns) == len(offsets) == int(counts.sum())):
            raise RuntimeError(f"{_FTS_TABLE}: fts5vocab rows do not line up")
        term_ids = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        positions = np.searchsorted(rowids, docs)
        if len(positions) and (positions.max() >= len(rowids) or np.any(rowids[positions] != docs)):
            raise RuntimeError(f"{_FTS_TABLE}: a token's row has no docsize record")
        del docs
        positions <<= _ROW_SHIFT
        positions |= columns.astype(np.int64) << _COL_SHIFT
        positions |= offsets
        del offsets

        # Unigrams: instances in (term, position) order (fts5vocab's own order; sorted only if not).
        ordered = len(term_ids) < 2 or bool(np.all(
            (term_ids[1:] > term_ids[:-1]) | ((term_ids[1:] == term_ids[:-1]) & (positions[1:] > positions[:-1]))))
        if not ordered:
            order = np.lexsort((positions, term_ids))
            term_ids, positions, columns = term_ids[order], positions[order], columns[order]
            del order
        unigrams = _Postings.group(term_ids, positions >> _ROW_SHIFT, column_weights[columns])

        # Bigrams: tokens one position apart (same row, same column), keyed by both terms.
        order = np.argsort(positions)  # positions are unique: no stability needed
        by_position = positions[order]
        del positions
        firsts = np.flatnonzero(by_position[1:] == by_position[:-1] + 1)
        pair_rows = by_position[firsts] >> _ROW_SHIFT
        del by_position
        vocabulary = max(len(terms), 1)
        pair_keys = term_ids[order[firsts]].astype(np.int64) * vocabulary + term_ids[order[firsts + 1]]
        pair_weights = column_weights[columns[order[firsts]]]
        del order, firsts, term_ids, columns
        # Stable on the key: within a key the pairs stay in position order.
        by_key = np.argsort(pair_keys, kind="stable")
        bigrams = _Postings.group(pair_keys[by_key], pair_rows[by_key], pair_weights[by_key])

        return cls(rowids, norms, k1, total_rows, terms, unigrams, bigrams,
                   tuple(float(w) for w in column_weights), tokenize)

    @property
    def nbytes(self) -> int:
        """The arrays' size (the term dictionary comes on top: about 100 bytes a term)."""
        return self.rowids.nbytes + self.norms.nbytes + self.unigrams.nbytes + self.bigrams.nbytes

    def _postings(self, tokens: Sequence[str]) -> tuple[Int32s, Floats] | None:
        ids = [i for i in (self.terms.get(token) for token in tokens) if i is not None]
        if len(ids) < len(tokens):
            return None
        if len(ids) == 1:
            return self.unigrams.lookup(ids[0])
        first, second = ids
        return self.bigrams.lookup(first * len(self.terms) + second)

    def search(self, phrases: Sequence[Sequence[str]], top_k: int,
               allowed: Int64s | None = None) -> Ranked | None:
        """The best `top_k` (rowid, score) for phrases given as token sequences (in the
        MATCH expression's order), best first and equal scores by rowid; only rows in
        `allowed` (rowids) when given. None when a phrase has more than two tokens."""
        ranked = self.rank(phrases, top_k, allowed)
        return None if ranked is None else ranked[0]

    def rank(self, phrases: Sequence[Sequence[str]], top_k: int, allowed: Int64s | None = None,
             denied: Int64s | None = None, depth: int = 0) -> tuple[Ranked, list[int]] | None:
        """As `search`, and never a row in `denied` (rowids: chunks the reader may not read),
        removed before the cut so they take no place. Second: the denied rowids that would
        have ranked within the best `depth` without that removal (the withheld ones)."""
        if any(len(tokens) > 2 for tokens in phrases):
            return None
        if top_k <= 0 or not len(self.rowids):
            return [], []
        parts: list[tuple[Int32s, Floats]] = []
        idfs: list[float] = []
        for tokens in phrases:
            # A phrase with no tokens, or one absent from the index, matches no row and adds 0.
            found = self._postings(tokens) if tokens else None
            if found is None:
                continue
            hits = len(found[0])
            idf = math.log((self.total_rows - hits + 0.5) / (hits + 0.5))
            parts.append(found)
            idfs.append(idf if idf > 0.0 else MIN_IDF)
        if not parts:
            return [], []
        rows = np.concatenate([part[0] for part in parts])
        freqs = np.concatenate([part[1] for part in parts])
        weights = np.repeat(np.asarray(idfs), [len(part[0]) for part in parts])
        contributions = weights * ((freqs * (self.k1 + 1.0)) / (freqs + self.norms[rows]))
        # bincount adds in array order, i.e. phrase by phrase from 0.0: bm25()'s own sum.
        scores = np.bincount(rows, weights=contributions, minlength=len(self.rowids))
        candidates = np.flatnonzero(np.bincount(rows, minlength=len(self.rowids)))
        if allowed is not None:
            candidates = candidates[np.isin(self.rowids[candidates], allowed)]
        withheld: list[int] = []
        if denied is not None and len(denied):
            hidden = np.isin(self.rowids[candidates], denied)
            if depth > 0 and hidden.any():
                unrestricted = _best(candidates, scores[candidates], depth)
                withheld = [int(self.rowids[i]) for i in unrestricted if hidden[np.searchsorted(candidates, i)]]
            candidates = candidates[~hidden]
        return [(int(self.rowids[i]), float(scores[i])) for i in _best(candidates, scores[candidates], top_k)], \
            withheld


def _best(candidates: Int64s, chosen: npt.NDArray[Any], top_k: int) -> Int64s:
    """The best `top_k` of `candidates` (ascending row indexes) by their scores `chosen`,
    best first, equal scores by row."""
    if len(candidates) > top_k:
        # Every row tied with the k-th best stays, so ties break by rowid, not by chance.
        kth = np.partition(chosen, len(chosen) - top_k)[len(chosen) - top_k]
        keep = chosen >= kth
        candidates, chosen = candidates[keep], chosen[keep]
    order = np.lexsort((candidates, -chosen))[:top_k]
    result: Int64s = candidates[order]
    return result


class QueryTokenizer:
    """Cuts query strings into index tokens with SQLite's own FTS5 tokenizer, so a query's
    tokens are exactly those FTS5 would look up (stemming, case and diacritic folding).

    A contentless FTS5 table in a private in-memory database: the strings are inserted in a
    transaction, their tokens read back through fts5vocab, and the transaction rolled back,
    so nothing accumulates. Results are cached (queries repeat their words). The connection
    belongs to the thread that created the tokenizer.
    """

    def __init__(self, tokenize: str = TOKENIZE, capacity: int = 16_384) -> None:
        self._conn = sqlite3.connect(":memory:", isolation_level=None)
        quoted = "'" + tokenize.replace("'", "''") + "'"
        self._conn.execute(f"CREATE VIRTUAL TABLE query USING fts5(text, content='', tokenize={quoted})")
        self._conn.execute("CREATE VIRTUAL TABLE query_tokens USING fts5vocab(query, 'instance')")
        self._cache: LruCache[str, tuple[str, ...]] = LruCache(capacity)

    def tokens(self, texts: Sequence[str]) -> list[tuple[str, ...]]:
        known: dict[str, tuple[str, ...]] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            cached = self._cache.get(text)
            if cached is None:
                missing.append(text)
            else:
                known[text] = cached
        if missing:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany("INSERT INTO query (rowid, text) VALUES (?, ?)", enumerate(missing))
                found = self._conn.execute("SELECT doc, offset, term FROM query_tokens").fetchall()
            finally:
                self._conn.execute("ROLLBACK")
            cut: list[list[tuple[int, str]]] = [[] for _ in missing]
            for doc, offset, term in found:
                cut[doc].append((offset, term))
            for text, tokens in zip(missing, cut, strict=True):
                known[text] = tuple(term for _, term in sorted(tokens))
                self._cache.put(text, known[text])
        return [known[text] for text in texts]

    def close(self) -> None:
        self._conn.close()
