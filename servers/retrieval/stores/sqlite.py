"""The embedded default document store (the interface it implements is in base.py).

`SqliteFtsStore` keeps ONE SQLite file per tenant (`<root>/<tenant>.sqlite`): a tenant's
query can only ever open its own file, so isolation does not depend on a WHERE clause
being right, and erasing a tenant is deleting its files. Text is indexed in FTS5 with the
`porter unicode61` tokenizer (stemming, case and diacritic folding) and ranked by bm25();
lexical searches are answered from an in-memory copy of that index (`lexical.LexicalIndex`)
that ranks exactly as bm25() does, several times faster.

Threading: sqlite calls block, so they run on dedicated worker threads, never on the event
loop. Each tenant is pinned to one worker (a stable hash of its id) and its connection is
opened, used and closed only on that thread; the same pinning serialises a tenant's writes
and reads without any lock. Each worker keeps an LRU of open connections, so memory is
bounded by the recently active tenants, not by the number of tenants on disk.

Several processes may share one directory (retrieval replicas, docs/retrieval-replicas.md):
SQLite serialises their writes (WAL, busy_timeout) and each reads committed data, so the
files are always coherent; what each process holds in memory is kept coherent by keying it
on the tenant's `Revision`, a row of the tenant's own file:

* (incarnation, version): the incarnation is drawn at random when the file is made, and
  every write transaction (`_transaction`: documents, chunks, vectors, settings) bumps the
  version in the same commit, whichever process writes. So a revision read once is never
  read again after any change, and equal revisions mean equal contents, across processes,
  reopened connections and erase-then-re-create (an inode number, or SQLite's
  `PRAGMA data_version`, which is per connection and blind to its own commits, is not).
* Erasing a tenant deletes its files, but a connection another process holds open keeps
  reading the unlinked file (whose revision never moves again). So every use of an
  open connection first `stat`s the path: another inode, or none, means erased (and maybe
  re-created), and the connection is closed and the file opened again (or found absent).
  Closing such a connection is safe: SQLite neither checkpoints nor deletes the WAL of a
  database file that has moved. A held-open inode cannot be reused, so the check is exact.
* The in-memory BM25 postings and dense vectors are stored with the revision they were
  read at and rebuilt when it moved; the "settle" delay before a lexical rebuild is read
  from the file's modification times, so every process agrees on it.
* Reads open files with `mode=rw`: a read never creates a file, even racing an erase.

A revision costs one `stat` and a one-row read on the tenant's worker thread; nothing else is
re-read from the file unless it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from servers.common.identity import TENANT_ID_RE
from servers.common.lru import LruCache
from servers.retrieval.access import AccessCheck
from servers.retrieval.chunker import location_from_json, location_to_json
from servers.retrieval.lexical import TOKENIZE, LexicalIndex, QueryTokenizer, Ranked
from servers.retrieval.models import (
    AccessChange,
    DeleteResult,
    Hit,
    IndexedVersion,
    IngestResult,
    IngestStatus,
    PreparedDocument,
    Vectors,
)
from servers.retrieval.query import query_phrases, query_terms
from servers.retrieval.stores.base import Bm25Params, Revision

T = TypeVar("T")


# FTS5's own bm25() parameters (fts5_aux.c): what `Bm25Params` must say for the two to agree.
FTS5_BM25 = Bm25Params(k1=1.2, b=0.75)


SCHEMA_VERSION = 5

_SCHEMA_V1 = f"""
CREATE TABLE IF NOT EXISTS documents (
    document_id     TEXT PRIMARY KEY,
    title           TEXT NOT NULL,
    source          TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    metadata        TEXT NOT NULL,          -- JSON object, returned with every hit
    content_hash    TEXT NOT NULL,
    index_signature TEXT NOT NULL,
    chunk_count     INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
-- Metadata as rows too, so exact-match filters use an index instead of parsing JSON.
CREATE TABLE IF NOT EXISTS document_metadata (
    document_id TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (document_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS document_metadata_by_value ON document_metadata (key, value, document_id);
CREATE INDEX IF NOT EXISTS documents_by_source ON documents (source);
CREATE TABLE IF NOT EXISTS chunks (
    id          INTEGER PRIMARY KEY,
    chunk_id    TEXT NOT NULL UNIQUE,
    document_id TEXT NOT NULL,
    ordinal     INTEGER NOT NULL,
    title       TEXT NOT NULL,
    section     TEXT NOT NULL,
    text        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (document_id, ordinal);
-- External-content FTS: the text is stored once (in chunks); triggers keep the index in step.
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    title, section, text,
    content='chunks', content_rowid='id',
    tokenize='{TOKENIZE}'
);
CREATE TRIGGER IF NOT EXISTS chunks_after_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, title, section, text) VALUES (new.id, new.title, new.section, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_after_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, title, section, text)
    VALUES ('delete', old.id, old.title, old.section, old.text);
END;
"""

# v2: dense vectors (one float32 blob per chunk, keyed by the chunk's rowid) and per-tenant
# search settings. Vectors live in the tenant's own file, so they share its isolation,
# its transactions (a document's chunks and vectors change together) and its erasure.
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS chunk_vectors (
    id     INTEGER PRIMARY KEY,             -- chunks.id
    vector BLOB NOT NULL                    -- float32, L2-normalised
);
CREATE TRIGGER IF NOT EXISTS chunks_vector_after_delete AFTER DELETE ON chunks BEGIN
    DELETE FROM chunk_vectors WHERE id = old.id;
END;
CREATE TABLE IF NOT EXISTS tenant_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# v3: the tenant's revision (see the module docstring), one row: an id drawn at random when
# the file is made, so a tenant erased and re-created never repeats a revision, and a
# counter every write transaction bumps, whichever process writes.
_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS tenant_revision (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    incarnation TEXT NOT NULL,
    version     INTEGER NOT NULL
);
"""

# v4: who may read each document (access.py): one row per label; a document without rows
# is readable by the whole tenant. Kept beside the chunks, so a change of labels is one
# small transaction (no re-chunking, no re-embedding) that bumps the revision like any write.
_SCHEMA_V4 = """
CREATE TABLE IF NOT EXISTS document_access (
    document_id TEXT NOT NULL,
    label       TEXT NOT NULL,              -- group:NAME or user:SUBJECT
    PRIMARY KEY (document_id, label)
) WITHOUT ROWID;
"""

# v5: where each chunk lies in its document's original text (servers.common.text.Location as JSON), keyed
# by the chunk's rowid like its vector; chunks indexed before have no row (no offsets) until
# their document is re-ingested.
_SCHEMA_V5 = """
CREATE TABLE IF NOT EXISTS chunk_locations (
    id       INTEGER PRIMARY KEY,           -- chunks.id
    location TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS chunks_location_after_delete AFTER DELETE ON chunks BEGIN
    DELETE FROM chunk_locations WHERE id = old.id;
END;
"""

_SIDE_FILES = ("-wal", "-shm", "-journal")

# Keeps write transactions short so a tenant's searches interleave with a big ingest.
_WRITE_BATCH_DOCS = 64
_WRITE_BATCH_CHARS = 4 * 1024 * 1024
# Below SQLite's host-parameter limit with room to spare.
_IN_CLAUSE_MAX = 500
# Opening a tenant's file while another process erases and re-creates it, over and over.
_OPEN_ATTEMPTS = 5


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def match_phrases(text: str) -> list[str]:
    """The phrases a lexical search scores, in order: every term, then every adjacent pair
    of content words (`query_phrases`); none when the text has no term."""
    terms = query_terms(text)
    return [*terms, *query_phrases(text)] if terms else []


def match_expression(text: str) -> str | None:
    """An FTS5 MATCH expression that is always valid: every phrase of `match_phrases` a
    quoted string, OR-ed. bm25() sums over the query's phrases, so a pair found as written
    adds its own (rarer, higher-idf) evidence.

    Inside an FTS5 string only '"' is special (doubled), so no user text can form an
    operator, a column filter, a prefix query or a syntax error.
    """
    return _or_of_phrases(match_phrases(text))


def _or_of_phrases(phrases: Sequence[str]) -> str | None:
    if not phrases:
        return None
    return " OR ".join('"' + phrase.replace('"', '""') + '"' for phrase in phrases)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: no deadlock-prone upgrade from a read.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("UPDATE tenant_revision SET version = version + 1 WHERE id = 1")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _open(path: Path, *, create: bool) -> sqlite3.Connection:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    # mode=rw: a read of a tenant erased a moment ago (by another process) fails instead of
    # creating an empty file. Autocommit mode (isolation_level=None): transactions are
    # explicit, see _transaction.
    target = f"file:{urllib.parse.quote(str(path))}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(target, uri=True, isolation_level=None, check_same_thread=True, cached_statements=32)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        _use_wal(conn)
        # In WAL mode NORMAL loses nothing on a process crash, only possibly the last
        # commits on power loss, and spares an fsync per commit.
        conn.execute("PRAGMA synchronous=NORMAL")
        # Small per-connection page cache: up to max_open tenants are open at once.
        conn.execute("PRAGMA cache_size=-1024")
        conn.execute("PRAGMA temp_store=MEMORY")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path.name} has schema v{version}, newer than this server (v{SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            # Idempotent, so two processes opening an old file at once both succeed.
            conn.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA_V1}{_SCHEMA_V2}{_SCHEMA_V3}{_SCHEMA_V4}{_SCHEMA_V5}"
                f"INSERT OR IGNORE INTO tenant_revision (id, incarnation, version) VALUES (1, '{uuid.uuid4().hex}', 0);"
                f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
    except BaseException:
        conn.close()
        raise
    return conn


# Two replicas creating one tenant's file at once: switching it to WAL needs the file to
# itself, and SQLite answers "locked" at once rather than waiting on the busy timeout.
WAL_SWITCH_ATTEMPTS = 100
WAL_SWITCH_PAUSE_S = 0.02


def _use_wal(conn: sqlite3.Connection) -> None:
    """Puts the file in WAL mode (persistent: a file already in it costs one read)."""
    for attempt in range(WAL_SWITCH_ATTEMPTS):
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_SWITCH_ATTEMPTS - 1:
                raise
            time.sleep(WAL_SWITCH_PAUSE_S)


# Ranks one tenant's rows on its worker thread: (worker, open tenant) -> (rowid, score).
_Ranker = Callable[["_Worker", "_OpenTenant"], Ranked]

def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path` now, None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _last_written(path: Path) -> float:
    """When the tenant's file or its WAL was last written (wall clock seconds), by any process."""
    latest = 0.0
    for file in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            latest = max(latest, os.stat(file).st_mtime)
    return latest


@dataclass(eq=False)
class _OpenTenant:
    """A tenant's open connection and what this process holds in memory for it, each index
    with the revision it was read at (dropped with the connection: memory follows the
    active tenants)."""

    conn: sqlite3.Connection
    path: Path
    # The file the connection opened: when the path names another file (or none), the
    # tenant was erased (and maybe re-created) by another process.
    file: tuple[int, int]
    dense: tuple[DenseIndex, Revision] | None = None
    lexical: tuple[LexicalIndex, Revision] | None = None
    access: tuple[AccessIndex, Revision] | None = None

    def revision(self) -> Revision:
        incarnation, version = self.conn.execute(
            "SELECT incarnation, version FROM tenant_revision WHERE id = 1").fetchone()
        return Revision(str(incarnation), int(version))

    def current(self) -> bool:
        return _file_identity(self.path) == self.file


class _Worker:
    """One thread and the open connections of the tenants pinned to it.

    Every attribute except `executor` is touched only from the worker's own thread.
    """

    def __init__(self, index: int, capacity: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"retrieval-sqlite-{index}")
        self.capacity = capacity
        # An evicted tenant's connection is closed and its in-memory indexes dropped.
        self._tenants: LruCache[str, _OpenTenant] = LruCache(capacity, on_evict=self._evicted)
        # Query tokenizers by `tokenize=` option (in practice one: TOKENIZE).
        self._tokenizers: dict[str, QueryTokenizer] = {}
        self._thread: int | None = None

    def open(self, tenant: str, path: Path, create: bool) -> _OpenTenant | None:
        """The tenant's open connection to the file now at `path` (one `stat` when already
        open); None when it has no file and `create` is False (reads never create one)."""
        self._check_thread()
        held = self._tenants.get(tenant)
        if held is not None:
            if held.current():
                return held
            # Erased by another process (and maybe re-created): this connection still reads
            # the old, unlinked file. Closing it leaves the new file alone (SQLite neither
            # checkpoints nor deletes the WAL of a database file that has moved).
            self.discard(tenant)
        for _ in range(_OPEN_ATTEMPTS):
            before = _file_identity(path)
            if before is None and not create:
                return None
            try:
                conn = _open(path, create=create)
            except sqlite3.OperationalError:
                if create or _file_identity(path) is not None:
                    raise
                return None  # erased between the stat and the open
            after = _file_identity(path)
            if after is not None and before in (None, after):
                opened = _OpenTenant(conn, path, after)
                self._tenants.put(tenant, opened)
                return opened
            _close(conn)  # replaced while opening: open the file that is there now
        raise sqlite3.OperationalError(f"{path.name} kept being replaced while opening it")

    def _evicted(self, _tenant: str, held: _OpenTenant) -> None:
        _close(held.conn)

    def revision(self, tenant: str, path: Path) -> Revision | None:
        held = self.open(tenant, path, False)
        return None if held is None else held.revision()

    def dense_index(self, held: _OpenTenant) -> DenseIndex:
        self._check_thread()
        revision = held.revision()
        if held.dense is None or held.dense[1] != revision:
            held.dense = None
            held.dense = (DenseIndex.load(held.conn), revision)
        return held.dense[0]

    def lexical_index(self, held: _OpenTenant, weights: Bm25Params, settle_seconds: float) -> LexicalIndex | None:
        """The tenant's in-memory postings, or None while the tenant is still changing.

        Reading them takes about 0.5 s for a 12k-chunk tenant: rebuilding after every batch
        of a long ingest would stall the worker, so until the tenant's file has been quiet
        for `settle_seconds` the caller asks FTS5 instead (the same ranking, only slower).
        "Quiet" is read from the file's own modification times, so every process that
        shares the file agrees on it, whoever wrote.
        """
        self._check_thread()
        revision = held.revision()
        if held.lexical is not None and held.lexical[1] == revision:
            return held.lexical[0]
        held.lexical = None
        if settle_seconds > 0 and time.time() - _last_written(held.path) < settle_seconds:
            return None
        held.lexical = (LexicalIndex.load(held.conn, weights.columns, k1=weights.k1, b=weights.b), revision)
        return held.lexical[0]

    def access_index(self, held: _OpenTenant) -> AccessIndex:
        self._check_thread()
        revision = held.revision()
        if held.access is None or held.access[1] != revision:
            held.access = None
            held.access = (AccessIndex.load(held.conn), revision)
        return held.access[0]

    def tokenizer(self, tokenize: str) -> QueryTokenizer:
        self._check_thread()
        tokenizer = self._tokenizers.get(tokenize)
        if tokenizer is None:
            tokenizer = self._tokenizers[tokenize] = QueryTokenizer(tokenize)
        return tokenizer

    def wrote(self, held: _OpenTenant) -> None:
        """After this process committed on `held` (or may have)."""
        self._check_thread()
        # Stale from now on (their revision says so too); dropped now to free the memory
        # during a long ingest.
        held.dense = held.lexical = held.access = None

    def discard(self, tenant: str) -> None:
        self._check_thread()
        held = self._tenants.pop(tenant)
        if held is not None:
            _close(held.conn)

    def sweep(self) -> list[str]:
        """Closes the connections of tenants whose file was erased or replaced by another
        process (an unlinked file's space is only freed when its last holder closes it)."""
        self._check_thread()
        gone = [tenant for tenant in self._tenants.snapshot()
                if (held := self._tenants.peek(tenant)) is not None and not held.current()]
        for tenant in gone:
            self.discard(tenant)
        return gone

    def close_all(self) -> None:
        self._check_thread()
        while self._tokenizers:
            _, tokenizer = self._tokenizers.popitem()
            tokenizer.close()
        for held in self._tenants.clear():
            _close(held.conn)

    def dense_tenants(self) -> list[str]:
        self.sweep()
        return [t for t in self._tenants.snapshot() if (h := self._tenants.peek(t)) is not None and h.dense]

    def lexical_tenants(self) -> list[str]:
        self.sweep()
        return [t for t in self._tenants.snapshot() if (h := self._tenants.peek(t)) is not None and h.lexical]

    def open_tenants(self) -> list[str]:
        self.sweep()
        return self._tenants.snapshot()

    def _check_thread(self) -> None:
        ident = threading.get_ident()
        if self._thread is None:
            self._thread = ident
        elif self._thread != ident:
            raise RuntimeError("a tenant connection was used outside its worker thread")


def _close(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("PRAGMA optimize")
    conn.close()


class SqliteFtsStore:
    """The embedded default store: one SQLite + FTS5 file per tenant."""

    def __init__(self, root: Path, *, max_open_tenants: int = 256, workers: int = 2,
                 bm25: Bm25Params | None = None, in_memory_lexical: bool = True,
                 lexical_settle_seconds: float = 2.0) -> None:
        """`in_memory_lexical`: answer lexical searches from `LexicalIndex` (False: FTS5's
        bm25() in SQL, same results); `lexical_settle_seconds`: how long a tenant must go
        unchanged before its in-memory index is rebuilt (see `_Worker.lexical_index`)."""
        if max_open_tenants < 1 or workers < 1:
            raise ValueError("max_open_tenants and workers must be at least 1")
        self.root = root
        self.bm25 = bm25 or Bm25Params()
        self.in_memory_lexical = in_memory_lexical
        self.lexical_settle_seconds = lexical_settle_seconds
        workers = min(workers, max_open_tenants)
        per_worker = max(1, max_open_tenants // workers)
        self._workers = [_Worker(i, per_worker) for i in range(workers)]
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------

    def path(self, tenant: str) -> Path:
        # Defence in depth: identity already validates tenant ids, but a path is built here.
        if not TENANT_ID_RE.match(tenant):
            raise ValueError(f"invalid tenant id {tenant!r}")
        return self.root / f"{tenant}.sqlite"

    def files(self, tenant: str) -> list[Path]:
        """Every file that may hold the tenant's data."""
        path = self.path(tenant)
        return [path, *(path.with_name(path.name + suffix) for suffix in _SIDE_FILES)]

    def _worker(self, tenant: str) -> _Worker:
        return self._workers[zlib.crc32(tenant.encode()) % len(self._workers)]

    async def _run(self, tenant: str, job: Callable[[_Worker, Path], T]) -> T:
        if self._closed:
            raise RuntimeError("the store is closed")
        path = self.path(tenant)
        worker = self._worker(tenant)
        return await asyncio.get_running_loop().run_in_executor(worker.executor, job, worker, path)

    async def _with_connection(self, tenant: str, create: bool,
                               job: Callable[[sqlite3.Connection], T], default: T, *, writes: bool = False) -> T:
        def run(worker: _Worker, path: Path) -> T:
            held = worker.open(tenant, path, create)
            if held is None:
                return default
            try:
                return job(held.conn)
            finally:
                if writes:
                    worker.wrote(held)

        return await self._run(tenant, run)

    # -- tenant lifecycle -------------------------------------------------------------------

    async def provision(self, tenant: str) -> None:
        def provision(worker: _Worker, path: Path) -> None:
            worker.open(tenant, path, create=True)

        await self._run(tenant, provision)

    async def erase(self, tenant: str) -> None:
        files = self.files(tenant)

        def erase(worker: _Worker, _path: Path) -> None:
            # Runs on the tenant's own thread, so no call of this tenant is mid-flight.
            worker.discard(tenant)
            for file in files:
                file.unlink(missing_ok=True)

        await self._run(tenant, erase)

    async def revision(self, tenant: str) -> Revision | None:
        """The tenant's revision now (see the module docstring); None when it has no file."""
        return await self._run(tenant, lambda worker, path: worker.revision(tenant, path))

    async def sweep(self) -> list[str]:
        """Closes this process's connections to tenant files erased or replaced by another
        process; the tenants closed."""
        loop = asyncio.get_running_loop()
        lists = await asyncio.gather(*(loop.run_in_executor(w.executor, w.sweep) for w in self._workers))
        return [tenant for names in lists for tenant in names]

    async def open_tenants(self) -> list[str]:
        """Tenants whose connection is currently open (for tests and metrics)."""
        loop = asyncio.get_running_loop()
        lists = await asyncio.gather(*(loop.run_in_executor(w.executor, w.open_tenants) for w in self._workers))
        return [tenant for names in lists for tenant in names]

    # -- documents --------------------------------------------------------------------------

    async def indexed_versions(self, tenant: str, document_ids: Sequence[str]) -> dict[str, IndexedVersion]:
        ids = list(dict.fromkeys(document_ids))

        def read(conn: sqlite3.Connection) -> dict[str, IndexedVersion]:
            found: dict[str, IndexedVersion] = {}
            for start in range(0, len(ids), _IN_CLAUSE_MAX):
                part = ids[start:start + _IN_CLAUSE_MAX]
                rows = conn.execute(
                    "SELECT document_id, content_hash, index_signature, chunk_count FROM documents"
                    f" WHERE document_id IN ({','.join('?' * len(part))})", part)
                for doc_id, content_hash, signature, chunks in rows:
                    found[doc_id] = IndexedVersion(content_hash, signature, chunks)
                for doc_id, label in conn.execute(
                        "SELECT document_id, label FROM document_access"
                        f" WHERE document_id IN ({','.join('?' * len(part))})", part):
                    version = found[doc_id]
                    found[doc_id] = replace(version, access=version.access | {label})
            return found

        if not ids:
            return {}
        return await self._with_connection(tenant, False, read, {})

    async def upsert(self, tenant: str, documents: Sequence[PreparedDocument]) -> list[IngestResult]:
        results: list[IngestResult] = []
        for batch in _write_batches(documents):
            results.extend(await self._with_connection(tenant, True, partial(_upsert_batch, documents=batch), [],
                                                       writes=True))
        return results

    async def delete(self, tenant: str, document_ids: Sequence[str]) -> DeleteResult:
        ids = list(dict.fromkeys(document_ids))
        return await self._with_connection(tenant, False, lambda conn: _delete(conn, ids),
                                           DeleteResult(0, 0, tuple(ids)), writes=True)

    async def search_lexical(self, tenant: str, text: str, top_k: int,
                             filters: Mapping[str, str], access: AccessCheck | None = None) -> list[Hit]:
        return await self._ranked_hits(tenant, self._lexical_ranker(text, top_k, filters, access))

    async def search_dense(self, tenant: str, vector: Vectors, top_k: int,
                           filters: Mapping[str, str], access: AccessCheck | None = None) -> list[Hit]:
        return await self._ranked_hits(tenant, self._dense_ranker(vector, top_k, filters, access))

    async def rank_lexical(self, tenant: str, text: str, top_k: int, filters: Mapping[str, str],
                           access: AccessCheck | None = None) -> Ranked:
        return await self._ranked(tenant, self._lexical_ranker(text, top_k, filters, access))

    async def rank_dense(self, tenant: str, vector: Vectors, top_k: int, filters: Mapping[str, str],
                         access: AccessCheck | None = None) -> Ranked:
        return await self._ranked(tenant, self._dense_ranker(vector, top_k, filters, access))

    async def set_access(self, tenant: str, changes: Mapping[str, frozenset[str]]) -> AccessChange:
        wanted = dict(changes)
        return await self._with_connection(tenant, False, lambda conn: _set_access(conn, wanted),
                                           AccessChange((), (), tuple(wanted)), writes=True)

    async def labels_in_use(self, tenant: str) -> frozenset[str] | None:
        return await self._run(tenant, lambda worker, path: (
            frozenset() if (held := worker.open(tenant, path, False)) is None
            else worker.access_index(held).labels_in_use))

    async def fetch(self, tenant: str, ranked: Ranked) -> list[Hit]:
        return await self._ranked_hits(tenant, lambda _worker, _held: ranked)

    def _lexical_ranker(self, text: str, top_k: int, filters: Mapping[str, str],
                        access: AccessCheck | None) -> _Ranker:
        """BM25 over the tenant's FTS5 index: from its in-memory copy when there is one
        (filters become a mask of allowed rows and access a mask of denied ones, so idf stays
        whole-table as in FTS5), otherwise (while the tenant is being written) from FTS5
        itself, with FTS5's k1 and b and access as a condition of the query."""
        phrases = match_phrases(text)
        expression = _or_of_phrases(phrases)
        filters = dict(filters)
        weights, in_memory, settle = self.bm25, self.in_memory_lexical, self.lexical_settle_seconds

        def rank(worker: _Worker, held: _OpenTenant) -> Ranked:
            if expression is None or top_k <= 0:
                return []
            conn = held.conn
            rule = worker.access_index(held).rule(access)
            index = worker.lexical_index(held, weights, settle) if in_memory else None
            if index is not None:
                allowed = _allowed_rowids(conn, filters) if filters else None
                found = index.rank(worker.tokenizer(index.tokenize).tokens(phrases), top_k, allowed,
                                   rule.denied if rule else None, rule.depth if rule else 0)
                if found is not None:
                    if rule is not None:
                        rule.withheld(found[1])
                    return found[0]
            ranked = _rank_fts(conn, expression, top_k, filters, weights, rule.labels if rule else None)
            if rule is not None and rule.depth > 0:
                rule.withheld([rowid for rowid, _ in _rank_fts(conn, expression, rule.depth, filters, weights)])
            return ranked

        return rank

    def _dense_ranker(self, vector: Vectors, top_k: int, filters: Mapping[str, str],
                      access: AccessCheck | None) -> _Ranker:
        """Exact cosine over the tenant's chunk vectors (brute force in numpy: a 14k-chunk
        tenant costs about a millisecond, with no index to build or tune); rows the reader
        may not read are out before the cut."""
        filters = dict(filters)
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)

        def rank(worker: _Worker, held: _OpenTenant) -> Ranked:
            rule = worker.access_index(held).rule(access)
            ranked, withheld = _rank_dense(held.conn, worker.dense_index(held), query, top_k, filters,
                                           rule.denied if rule else None, rule.depth if rule else 0)
            if rule is not None:
                rule.withheld(withheld)
            return ranked

        return rank

    async def _ranked(self, tenant: str, rank: _Ranker) -> Ranked:
        def run(worker: _Worker, path: Path) -> Ranked:
            held = worker.open(tenant, path, False)
            return [] if held is None else rank(worker, held)

        return await self._run(tenant, run)

    async def _ranked_hits(self, tenant: str, rank: _Ranker) -> list[Hit]:
        def run(worker: _Worker, path: Path) -> list[Hit]:
            held = worker.open(tenant, path, False)
            return [] if held is None else _fetch_hits(held.conn, rank(worker, held))

        return await self._run(tenant, run)

    async def dense_tenants(self) -> list[str]:
        """Tenants whose vectors are currently held in memory (for tests and metrics)."""
        loop = asyncio.get_running_loop()
        lists = await asyncio.gather(*(loop.run_in_executor(w.executor, w.dense_tenants) for w in self._workers))
        return [tenant for names in lists for tenant in names]

    async def lexical_tenants(self) -> list[str]:
        """Tenants whose lexical index is currently held in memory (for tests and metrics)."""
        loop = asyncio.get_running_loop()
        lists = await asyncio.gather(*(loop.run_in_executor(w.executor, w.lexical_tenants) for w in self._workers))
        return [tenant for names in lists for tenant in names]

    async def unknown_metadata_keys(self, tenant: str, keys: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))

        def read(conn: sqlite3.Connection) -> set[str]:
            return {key for key in wanted
                    if conn.execute("SELECT 1 FROM document_metadata WHERE key = ? LIMIT 1", (key,)).fetchone() is None}

        return await self._with_connection(tenant, False, read, set(wanted))

    async def get_settings(self, tenant: str) -> dict[str, str]:
        def read(conn: sqlite3.Connection) -> dict[str, str]:
            return dict(conn.execute("SELECT key, value FROM tenant_settings").fetchall())

        return await self._with_connection(tenant, False, read, {})

    async def put_settings(self, tenant: str, values: Mapping[str, str | None]) -> dict[str, str]:
        """Sets (or, for None, removes) per-tenant settings; returns them all."""
        items = dict(values)

        def write(conn: sqlite3.Connection) -> dict[str, str]:
            with _transaction(conn):
                for key, value in items.items():
                    if value is None:
                        conn.execute("DELETE FROM tenant_settings WHERE key = ?", (key,))
                    else:
                        conn.execute("INSERT INTO tenant_settings (key, value) VALUES (?, ?)"
                                     " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
            return dict(conn.execute("SELECT key, value FROM tenant_settings").fetchall())

        return await self._with_connection(tenant, True, write, {}, writes=True)

    # -- health and shutdown ----------------------------------------------------------------

    async def healthy(self) -> bool:
        if self._closed:
            return False
        # The health loop (every couple of seconds) is the store's clock: files other
        # processes erased are let go of even by a replica that sees no call for them.
        # Queued on the workers, not awaited: a probe must not wait behind a long ingest.
        with contextlib.suppress(RuntimeError):  # closing meanwhile
            for worker in self._workers:
                worker.executor.submit(worker.sweep)
        # Not on the workers: a probe must not queue behind a long ingest.
        return await asyncio.to_thread(probe_writable, self.root)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(w.executor, w.close_all) for w in self._workers))
        for worker in self._workers:
            worker.executor.shutdown(wait=False)


def probe_writable(directory: Path) -> bool:
    """Whether a file can be created, written and removed in `directory`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".health-", dir=directory)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError:
        return False
    return True


def _write_batches(documents: Sequence[PreparedDocument]) -> Iterator[list[PreparedDocument]]:
    batch: list[PreparedDocument] = []
    size = 0
    for prepared in documents:
        batch.append(prepared)
        size += len(prepared.document.text)
        if len(batch) >= _WRITE_BATCH_DOCS or size >= _WRITE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _upsert_batch(conn: sqlite3.Connection, *, documents: Sequence[PreparedDocument]) -> list[IngestResult]:
    now = _now()
    with _transaction(conn):
        return [_upsert_one(conn, prepared, now) for prepared in documents]


def _upsert_one(conn: sqlite3.Connection, prepared: PreparedDocument, now: str) -> IngestResult:
    doc = prepared.document
    doc_id = doc.document_id
    row = conn.execute(
        "SELECT content_hash, index_signature, chunk_count, created_at FROM documents WHERE document_id = ?",
        (doc_id,)).fetchone()
    # Re-checked inside the write transaction: the caller's earlier check may be stale.
    if row is not None and row[0] == prepared.content_hash and row[1] == prepared.index_signature:
        _write_access(conn, doc_id, doc.access)
        return IngestResult(doc_id, IngestStatus.UNCHANGED, row[2], row[0])
    if row is not None:
        conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
        conn.execute("DELETE FROM document_metadata WHERE document_id = ?", (doc_id,))
    conn.execute("DELETE FROM document_access WHERE document_id = ?", (doc_id,))
    if not prepared.chunks:
        if row is not None:
            conn.execute("DELETE FROM documents WHERE document_id = ?", (doc_id,))
        return IngestResult(doc_id, IngestStatus.EMPTY, 0, prepared.content_hash)
    conn.execute(
        "INSERT INTO documents (document_id, title, source, content_type, metadata, content_hash,"
        " index_signature, chunk_count, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (document_id) DO UPDATE SET title = excluded.title, source = excluded.source,"
        " content_type = excluded.content_type, metadata = excluded.metadata,"
        " content_hash = excluded.content_hash, index_signature = excluded.index_signature,"
        " chunk_count = excluded.chunk_count, updated_at = excluded.updated_at",
        (doc_id, doc.title, doc.source, doc.content_type,
         json.dumps(dict(sorted(doc.metadata.items())), ensure_ascii=False),
         prepared.content_hash, prepared.index_signature, len(prepared.chunks),
         row[3] if row is not None else now, now))
    conn.executemany(
        "INSERT INTO chunks (chunk_id, document_id, ordinal, title, section, text) VALUES (?, ?, ?, ?, ?, ?)",
        [(c.chunk_id, doc_id, c.ordinal, doc.title, c.section, c.text) for c in prepared.chunks])
    conn.executemany(
        "INSERT INTO chunk_locations (id, location) SELECT id, ? FROM chunks WHERE chunk_id = ?",
        [(location_to_json(c.location), c.chunk_id) for c in prepared.chunks if c.location is not None])
    conn.executemany(
        "INSERT INTO document_metadata (document_id, key, value) VALUES (?, ?, ?)",
        [(doc_id, key, value) for key, value in doc.metadata.items()])
    _write_access(conn, doc_id, doc.access)
    if prepared.vectors is not None:
        if len(prepared.vectors) != len(prepared.chunks):
            raise ValueError(f"{doc_id}: {len(prepared.vectors)} vectors for {len(prepared.chunks)} chunks")
        conn.executemany(
            "INSERT INTO chunk_vectors (id, vector) SELECT id, ? FROM chunks WHERE chunk_id = ?",
            [(np.ascontiguousarray(row, dtype=np.float32).tobytes(), c.chunk_id)
             for c, row in zip(prepared.chunks, prepared.vectors, strict=True)])
    status = IngestStatus.REPLACED if row is not None else IngestStatus.CREATED
    return IngestResult(doc_id, status, len(prepared.chunks), prepared.content_hash)


def _delete(conn: sqlite3.Connection, ids: Sequence[str]) -> DeleteResult:
    deleted_documents = deleted_chunks = 0
    not_found: list[str] = []
    with _transaction(conn):
        for doc_id in ids:
            gone = conn.execute("DELETE FROM documents WHERE document_id = ?", (doc_id,)).rowcount
            if not gone:
                not_found.append(doc_id)
                continue
            deleted_documents += 1
            deleted_chunks += conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,)).rowcount
            conn.execute("DELETE FROM document_metadata WHERE document_id = ?", (doc_id,))
            conn.execute("DELETE FROM document_access WHERE document_id = ?", (doc_id,))
    return DeleteResult(deleted_documents, deleted_chunks, tuple(not_found))


def _write_access(conn: sqlite3.Connection, doc_id: str, labels: frozenset[str]) -> bool:
    """Makes the document's labels `labels`; whether they changed."""
    current = {label for (label,) in conn.execute(
        "SELECT label FROM document_access WHERE document_id = ?", (doc_id,))}
    if current == labels:
        return False
    conn.execute("DELETE FROM document_access WHERE document_id = ?", (doc_id,))
    conn.executemany("INSERT INTO document_access (document_id, label) VALUES (?, ?)",
                     [(doc_id, label) for label in sorted(labels)])
    return True


def _set_access(conn: sqlite3.Connection, changes: Mapping[str, frozenset[str]]) -> AccessChange:
    updated: list[str] = []
    unchanged: list[str] = []
    not_found: list[str] = []
    with _transaction(conn):
        for doc_id, labels in changes.items():
            if conn.execute("SELECT 1 FROM documents WHERE document_id = ?", (doc_id,)).fetchone() is None:
                not_found.append(doc_id)
            elif _write_access(conn, doc_id, labels):
                updated.append(doc_id)
            else:
                unchanged.append(doc_id)
    return AccessChange(tuple(updated), tuple(unchanged), tuple(not_found))


def _filter_clauses(filters: Mapping[str, str]) -> tuple[list[str], list[object]]:
    """SQL conditions on `c` (chunks) and `d` (documents) for exact-match filters."""
    clauses: list[str] = []
    params: list[object] = []
    for key, value in sorted(filters.items()):
        if key == "document_id":
            clauses.append("c.document_id = ?")
        elif key == "source":
            clauses.append("d.source = ?")
        else:
            clauses.append("EXISTS (SELECT 1 FROM document_metadata m"
                           " WHERE m.document_id = c.document_id AND m.key = ? AND m.value = ?)")
            params.append(key)
        params.append(value)
    return clauses, params


_HIT_COLUMNS = ("c.document_id, c.chunk_id, c.title, c.section, c.text, d.source, d.metadata,"
                " (SELECT group_concat(a.label, char(10)) FROM document_access a WHERE a.document_id = c.document_id),"
                " (SELECT l.location FROM chunk_locations l WHERE l.id = c.id)")


def _rank_fts(conn: sqlite3.Connection, expression: str, top_k: int, filters: Mapping[str, str],
              weights: Bm25Params, reader_labels: frozenset[str] | None = None) -> Ranked:
    """FTS5's own bm25() ranking (its k1 1.2 and b 0.75 whatever `weights` says); with
    `reader_labels`, only chunks of documents without labels or with one of them."""
    clauses, filter_params = _filter_clauses(filters)
    if reader_labels is not None:
        mine = sorted(reader_labels)
        clauses.append("(NOT EXISTS (SELECT 1 FROM document_access a WHERE a.document_id = c.document_id)"
                       " OR EXISTS (SELECT 1 FROM document_access a WHERE a.document_id = c.document_id"
                       f" AND a.label IN ({','.join('?' * len(mine))})))")
        filter_params.extend(mine)
    params: list[object] = [weights.title, weights.section, weights.text, expression, *filter_params, top_k]
    if clauses:
        where = "".join(f" AND {clause}" for clause in clauses)
        # CROSS JOIN pins the join order: the FTS index drives, chunks and documents follow.
        sql = ("SELECT chunks_fts.rowid, bm25(chunks_fts, ?, ?, ?) AS score"
               " FROM chunks_fts CROSS JOIN chunks c ON c.id = chunks_fts.rowid"
               " CROSS JOIN documents d ON d.document_id = c.document_id"
               f" WHERE chunks_fts MATCH ?{where} ORDER BY score LIMIT ?")
    else:
        sql = "SELECT rowid, bm25(chunks_fts, ?, ?, ?) AS score FROM chunks_fts WHERE chunks_fts MATCH ?" \
              " ORDER BY score LIMIT ?"
    # bm25() is lower-is-better; the contract's score is higher-is-better.
    return [(rowid, -score) for rowid, score in conn.execute(sql, params)]


@dataclass(frozen=True, slots=True)
class DenseIndex:
    """A tenant's chunk vectors in memory: rowids and one row-aligned matrix."""

    ids: npt.NDArray[np.int64]
    matrix: Vectors

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> DenseIndex:
        rows = conn.execute("SELECT id, vector FROM chunk_vectors ORDER BY id").fetchall()
        if not rows:
            return cls(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
        # Vectors of one embedder only: the most common width wins (rows of an embedder
        # configured before are re-made when their documents are re-ingested).
        widths: dict[int, int] = {}
        for _, blob in rows:
            widths[len(blob)] = widths.get(len(blob), 0) + 1
        width = max(widths, key=lambda w: widths[w])
        kept = [(rowid, blob) for rowid, blob in rows if len(blob) == width]
        ids = np.fromiter((rowid for rowid, _ in kept), dtype=np.int64, count=len(kept))
        matrix = np.frombuffer(b"".join(blob for _, blob in kept), dtype=np.float32).reshape(len(kept), -1)
        return cls(ids, matrix)

    @property
    def dimension(self) -> int:
        return int(self.matrix.shape[1]) if self.matrix.size else 0


def _rank_dense(conn: sqlite3.Connection, index: DenseIndex, query: Vectors, top_k: int,
                filters: Mapping[str, str], denied: npt.NDArray[np.int64] | None = None,
                depth: int = 0) -> tuple[Ranked, list[int]]:
    """Best `top_k` (rowid, cosine), never a row in `denied`; and the denied rowids that
    would have ranked within the best `depth` without that removal."""
    if not len(index.ids) or index.dimension != query.shape[0] or top_k <= 0:
        return [], []
    scores = index.matrix @ query
    if filters:
        scores = np.where(np.isin(index.ids, _allowed_rowids(conn, filters)), scores, -np.inf)
    withheld: list[int] = []
    if denied is not None and len(denied):
        hidden = np.isin(index.ids, denied)
        if depth > 0 and hidden.any():
            withheld = [int(index.ids[i]) for i in _best_rows(scores, depth) if hidden[i]]
        scores = np.where(hidden, -np.inf, scores)
    return [(int(index.ids[i]), float(scores[i])) for i in _best_rows(scores, top_k)], withheld


def _best_rows(scores: npt.NDArray[np.float32], top_k: int) -> npt.NDArray[np.intp]:
    """Indexes of the best `top_k` finite scores, best first."""
    count = min(top_k, len(scores))
    top = np.argpartition(-scores, count - 1)[:count]
    top = top[np.argsort(-scores[top], kind="stable")]
    result: npt.NDArray[np.intp] = top[np.isfinite(scores[top])]
    return result


def _allowed_rowids(conn: sqlite3.Connection, filters: Mapping[str, str]) -> npt.NDArray[np.int64]:
    """The rowids of the chunks that pass exact-match filters."""
    clauses, params = _filter_clauses(filters)
    return np.fromiter(
        (row[0] for row in conn.execute(
            "SELECT c.id FROM chunks c CROSS JOIN documents d ON d.document_id = c.document_id"
            f" WHERE {' AND '.join(clauses)}", params)), dtype=np.int64)


def _fetch_hits(conn: sqlite3.Connection, ranked: Ranked) -> list[Hit]:
    """Hits for (rowid, score) pairs, in their order; only these rows are read."""
    if not ranked:
        return []
    chosen = [rowid for rowid, _ in ranked]
    by_id: dict[int, Any] = {}
    for start in range(0, len(chosen), _IN_CLAUSE_MAX):
        part = chosen[start:start + _IN_CLAUSE_MAX]
        for row in conn.execute(
                f"SELECT c.id, {_HIT_COLUMNS} FROM chunks c CROSS JOIN documents d ON d.document_id = c.document_id"
                f" WHERE c.id IN ({','.join('?' * len(part))})", part):
            by_id[row[0]] = row
    return [Hit(document_id=r[1], chunk_id=r[2], title=r[3], section=r[4], text=r[5], score=score,
                source=r[6], metadata=json.loads(r[7]), access=tuple(sorted(r[8].split("\n"))) if r[8] else (),
                location=location_from_json(r[9]))
            for rowid, score in ranked if (r := by_id.get(rowid)) is not None]


@dataclass(frozen=True, slots=True)
class AccessIndex:
    """A tenant's restricted documents in memory (read once per revision): which chunk rows
    belong to which restricted document and its labels. Unrestricted documents are not held,
    so a tenant without labels costs nothing."""

    rowids: npt.NDArray[np.int64]        # chunk rows of restricted documents, ascending
    documents: npt.NDArray[np.int32]     # for each of those rows, its index in `ids`
    ids: tuple[str, ...]                 # restricted document ids
    labels: tuple[frozenset[str], ...]   # their labels, aligned with `ids`
    labels_in_use: frozenset[str]

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> AccessIndex:
        by_document: dict[str, set[str]] = {}
        for doc_id, label in conn.execute("SELECT document_id, label FROM document_access"):
            by_document.setdefault(doc_id, set()).add(label)
        ids = tuple(sorted(by_document))
        position = {doc_id: i for i, doc_id in enumerate(ids)}
        rows = conn.execute("SELECT c.id, c.document_id FROM chunks c WHERE c.document_id IN"
                            " (SELECT DISTINCT document_id FROM document_access) ORDER BY c.id").fetchall() \
            if ids else []
        return cls(rowids=np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
                   documents=np.fromiter((position[r[1]] for r in rows), dtype=np.int32, count=len(rows)),
                   ids=ids, labels=tuple(frozenset(by_document[d]) for d in ids),
                   labels_in_use=frozenset(label for labels in by_document.values() for label in labels))

    def rule(self, access: AccessCheck | None) -> _AccessRule | None:
        """What `access` means for this tenant now (None: nothing is restricted for it)."""
        if access is None or not self.ids:
            return None
        mine = access.labels
        denied_docs = np.fromiter((not mine & labels for labels in self.labels), dtype=bool, count=len(self.ids))
        return _AccessRule(self, access, self.rowids[denied_docs[self.documents]])


@dataclass(frozen=True, slots=True)
class _AccessRule:
    index: AccessIndex
    check: AccessCheck
    denied: npt.NDArray[np.int64]   # chunk rows the reader may not read, ascending

    @property
    def labels(self) -> frozenset[str]:
        return self.check.labels

    @property
    def depth(self) -> int:
        return self.check.depth

    def withheld(self, rowids: Sequence[int]) -> None:
        """Reports the documents of these (denied) rows as withheld."""
        for rowid in rowids:
            i = int(np.searchsorted(self.index.rowids, rowid))
            if i < len(self.index.rowids) and self.index.rowids[i] == rowid \
                    and not self.check.labels & self.index.labels[self.index.documents[i]]:
                self.check.withheld.add(self.index.ids[self.index.documents[i]])
