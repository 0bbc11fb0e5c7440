"""The Weaviate document store: the same `DocumentStore` contract on a Weaviate server.

One collection of chunks with Weaviate's native multi-tenancy: every tenant is its own
shard, created when the tenant is provisioned (auto tenant creation is off, so a stray
write can never invent a tenant) and dropped whole when it is erased. Every read and write
names the tenant through `collection.with_tenant(...)`: Weaviate itself refuses a request
without one, so isolation does not rest on a filter being right. Tenants are created HOT
with auto-activation on, so an operator may set idle tenants INACTIVE/OFFLOADED (Weaviate
then unloads them from memory) and the next request reloads them, like the embedded store.

We embed with our own embedder (vectorizer none, one self-provided named vector) so both
stores rank by the same vectors. BM25 is Weaviate's (`query.bm25`, title and section boosted
like the embedded store's bm25() weights), dense is `query.near_vector`, and hybrid runs
natively in one request (`query.hybrid`, relative-score or ranked fusion with our alpha).

Documents have no row of their own: every chunk carries its document's fields, and the
chunk with ordinal 0 is the document's version marker (hash, signature, chunk count).
Weaviate has no multi-object transactions, so a replacement is ordered to be safe to
retry: new chunks first, then the old version's leftovers are deleted, then the marker is
written. A failure at any step leaves a marker that is missing or old, so the next ingest
of the document redoes it instead of reporting UNCHANGED. Readers may briefly see a mix of
old and new chunks of one document while it is being replaced.

Access labels (access.py) are a field-tokenized `access` array on every chunk, `*` for a
document the whole tenant may read; every search carries `access containsAny [*, the
reader's labels]` in its filter, so Weaviate drops what the reader may not read before its
limit. Relabelling rewrites the document's chunk objects with their stored vectors (no
re-embedding). A collection made before labels existed has no `access` property: give it a
new collection prefix and re-ingest.

Per-tenant search settings live in a second small multi-tenant collection, one object per
key, in the same tenant shard names, so erasing a tenant drops them too.

Replicas: Weaviate is the shared engine, so every retrieval process reads the same data.
It offers no cheap per-tenant revision to key caches on, so with replicas (`shared`) the
engine caches no search results or tenant defaults for this store (each search reads the
settings and searches Weaviate), and this store does not trust its memory of which tenants
exist (a write checks the tenant is there, creating it if another replica erased it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import weaviate
import weaviate.classes as wvc
from weaviate import WeaviateAsyncClient
from weaviate.collections.classes.filters import _Filters
from weaviate.exceptions import (
    UnexpectedStatusCodeError,
    WeaviateBaseError,
    WeaviateInvalidInputError,
    WeaviateQueryError,
)
from weaviate.util import generate_uuid5

from servers.common.errors import Unavailable
from servers.common.identity import TENANT_ID_RE
from servers.retrieval.access import PUBLIC_LABEL, AccessCheck
from servers.retrieval.chunker import location_from_json, location_to_json
from servers.retrieval.fusion import Fusion
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
from servers.retrieval.query import query_terms
from servers.retrieval.stores.base import Bm25Params

log = logging.getLogger(__name__)

T = TypeVar("T")

VECTOR_NAME = "default"
# Weaviate answers at most QUERY_MAXIMUM_RESULTS (10,000 by default) objects per query;
# id lists are cut well below that and below gRPC's message size.
_IDS_PER_QUERY = 200
_OBJECTS_PER_BATCH = 256
_SETTINGS_MAX = 1000

_HIT_PROPERTIES = ["document_id", "chunk_id", "title", "section", "text", "source", "metadata_json", "access",
                   "location_json"]


@dataclass(frozen=True, slots=True)
class WeaviateConfig:
    url: str
    grpc_port: int = 50051
    # Defaults to the host of `url`.
    grpc_host: str | None = None
    api_key: str | None = None
    # Every call to Weaviate is bounded by this, on top of the client's own timeouts.
    timeout_s: float = 10.0
    # Collections are `<prefix>Chunk` and `<prefix>Settings`; tests use their own prefix.
    collection_prefix: str = "Copilot"


class WeaviateStore:
    """`DocumentStore` on Weaviate (weaviate-client v4, async)."""

    def __init__(self, config: WeaviateConfig, *, bm25: Bm25Params | None = None, shared: bool = False) -> None:
        """`shared`: other processes (replicas) write the same Weaviate, so what this one
        remembers of its tenants is not trusted (see `_writable`)."""
        parts = urlsplit(config.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"WEAVIATE_URL must be an http(s) URL, got {config.url!r}")
        self.config = config
        self.bm25 = bm25 or Bm25Params()
        self.chunks_name = f"{config.collection_prefix}Chunk"
        self.settings_name = f"{config.collection_prefix}Settings"
        self._http_host = parts.hostname
        self._http_port = parts.port or (443 if parts.scheme == "https" else 80)
        self._secure = parts.scheme == "https"
        self._client: WeaviateAsyncClient | None = None
        self._connect_lock = asyncio.Lock()
        # Tenants this process has seen provisioned: writes to others provision them first,
        # like the embedded store, where a write creates the tenant's file.
        self._tenants: set[str] = set()
        self.shared = shared
        self._closed = False

    # -- connection -------------------------------------------------------------------------

    def _new_client(self) -> WeaviateAsyncClient:
        timeout = self.config.timeout_s
        return weaviate.use_async_with_custom(
            http_host=self._http_host, http_port=self._http_port, http_secure=self._secure,
            grpc_host=self.config.grpc_host or self._http_host, grpc_port=self.config.grpc_port,
            grpc_secure=self._secure,
            auth_credentials=wvc.init.Auth.api_key(self.config.api_key) if self.config.api_key else None,
            additional_config=wvc.init.AdditionalConfig(
                timeout=wvc.init.Timeout(init=timeout, query=timeout, insert=timeout)),
            # The init checks include a PyPI request for the latest client version: a
            # server must not depend on the internet to start. Readiness is our own probe.
            skip_init_checks=True,
        )

    async def _connected(self) -> WeaviateAsyncClient:
        if self._closed:
            raise RuntimeError("the store is closed")
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                client = self._new_client()
                try:
                    await asyncio.wait_for(client.connect(), self.config.timeout_s)
                    await asyncio.wait_for(self._ensure_schema(client), self.config.timeout_s)
                except BaseException:
                    await client.close()
                    raise
                self._client = client
            return self._client

    async def _ensure_schema(self, client: WeaviateAsyncClient) -> None:
        field = wvc.config.Tokenization.FIELD
        text, text_array, integer = wvc.config.DataType.TEXT, wvc.config.DataType.TEXT_ARRAY, wvc.config.DataType.INT
        # Word tokenization (lower-cased, split on non-alphanumerics) is BM25's; FIELD
        # keeps exact-match filter values whole.
        chunk_properties = [
            wvc.config.Property(name="text", data_type=text),
            wvc.config.Property(name="title", data_type=text),
            wvc.config.Property(name="section", data_type=text),
            wvc.config.Property(name="document_id", data_type=text, tokenization=field, index_searchable=False),
            wvc.config.Property(name="chunk_id", data_type=text, tokenization=field, index_searchable=False),
            wvc.config.Property(name="source", data_type=text, tokenization=field, index_searchable=False),
            wvc.config.Property(name="version", data_type=text, tokenization=field, index_searchable=False),
            wvc.config.Property(name="ordinal", data_type=integer),
            wvc.config.Property(name="chunk_count", data_type=integer, index_filterable=False),
            wvc.config.Property(name="content_hash", data_type=text, tokenization=field,
                                index_searchable=False, index_filterable=False),
            wvc.config.Property(name="index_signature", data_type=text, tokenization=field,
                                index_searchable=False, index_filterable=False),
            # Returned with every hit as the document's metadata, verbatim.
            wvc.config.Property(name="metadata_json", data_type=text, index_searchable=False,
                                index_filterable=False),
            # Metadata flattened for exact-match filters (["key","value"] as JSON) and key checks: the
            # schema stays fixed whatever keys tenants use.
            wvc.config.Property(name="metadata_pairs", data_type=text_array, tokenization=field,
                                index_searchable=False),
            wvc.config.Property(name="metadata_keys", data_type=text_array, tokenization=field,
                                index_searchable=False),
            # Who may read the chunk's document: its labels, or "*" for the whole tenant.
            wvc.config.Property(name="access", data_type=text_array, tokenization=field, index_searchable=False),
            *self._added_properties(),
        ]
        settings_properties = [
            wvc.config.Property(name="key", data_type=text, tokenization=field, index_searchable=False),
            wvc.config.Property(name="value", data_type=text, index_searchable=False, index_filterable=False),
        ]
        for name, properties, vectors in ((self.chunks_name, chunk_properties, True),
                                          (self.settings_name, settings_properties, False)):
            if await client.collections.exists(name):
                if vectors:
                    await self._upgrade(client, name)
                continue
            try:
                await client.collections.create(
                    name,
                    properties=properties,
                    vector_config=wvc.config.Configure.Vectors.self_provided(name=VECTOR_NAME) if vectors else None,
                    multi_tenancy_config=wvc.config.Configure.multi_tenancy(
                        enabled=True, auto_tenant_creation=False, auto_tenant_activation=True),
                    # The same k1 and b as the embedded store's BM25 (Weaviate's own are 1.2, 0.75).
                    inverted_index_config=wvc.config.Configure.inverted_index(
                        bm25_k1=self.bm25.k1, bm25_b=self.bm25.b),
                )
            except UnexpectedStatusCodeError:
                # Another replica created it first.
                if not await client.collections.exists(name):
                    raise

    @staticmethod
    def _added_properties() -> list[wvc.config.Property]:
        """Chunk properties added after the collection's first version; `_upgrade` adds them to
        a collection made before (Weaviate adds a property in place, existing objects without it)."""
        # servers.common.text.Location as JSON: where the chunk lies in the document's original text.
        return [wvc.config.Property(name="location_json", data_type=wvc.config.DataType.TEXT,
                                    index_searchable=False, index_filterable=False)]

    async def _upgrade(self, client: WeaviateAsyncClient, name: str) -> None:
        collection = client.collections.get(name)
        for prop in self._added_properties():
            try:
                await collection.config.add_property(prop)
            except WeaviateInvalidInputError:
                pass  # added before (the client checks first)
            except UnexpectedStatusCodeError as exc:
                # Another replica added it between the client's check and its request.
                if "exist" not in str(exc).lower():
                    raise

    async def _call(self, what: str, op: Callable[[WeaviateAsyncClient], Awaitable[T]], *,
                    bounded: bool = True) -> T:
        """Runs one operation against Weaviate; any failure to reach it or to complete the
        operation is UNAVAILABLE (inputs are ours and valid, so a failure is the backend's).

        `bounded`: the whole operation within the timeout. Writes of a big batch take many
        round trips, each bounded by the client's own timeout and (few) retries, so they
        are not bounded as a whole (the caller's gRPC deadline still is)."""
        try:
            client = await self._connected()
            if not bounded:
                return await op(client)
            return await asyncio.wait_for(op(client), self.config.timeout_s)
        except (WeaviateBaseError, httpx.HTTPError, OSError, TimeoutError) as exc:
            log.warning("weaviate %s failed: %s", what, exc)
            raise Unavailable(f"the document store (Weaviate) could not {what}; retry later",
                              metadata={"backend": "weaviate"}) from exc

    async def _read(self, tenant: str, what: str, op: Callable[[WeaviateAsyncClient], Awaitable[T]],
                    default: T) -> T:
        """A read of a tenant that may not exist: reads never create a tenant, and one that
        does not exist has nothing (as in the embedded store)."""
        _check_tenant(tenant)
        try:
            client = await self._connected()
            return await asyncio.wait_for(op(client), self.config.timeout_s)
        except WeaviateQueryError as exc:
            if not await self._tenant_exists(tenant):
                self._tenants.discard(tenant)
                return default
            log.warning("weaviate %s failed: %s", what, exc)
            raise Unavailable(f"the document store (Weaviate) could not {what}; retry later",
                              metadata={"backend": "weaviate"}) from exc
        except (WeaviateBaseError, httpx.HTTPError, OSError, TimeoutError) as exc:
            log.warning("weaviate %s failed: %s", what, exc)
            raise Unavailable(f"the document store (Weaviate) could not {what}; retry later",
                              metadata={"backend": "weaviate"}) from exc

    async def _tenant_exists(self, tenant: str) -> bool:
        return await self._call("check a tenant",
                                lambda c: c.collections.use(self.chunks_name).tenants.exists(tenant))

    # -- tenant lifecycle -------------------------------------------------------------------

    async def provision(self, tenant: str) -> None:
        _check_tenant(tenant)

        async def create(client: WeaviateAsyncClient) -> None:
            for name in (self.chunks_name, self.settings_name):
                tenants = client.collections.use(name).tenants
                if await tenants.exists(tenant):
                    continue
                try:
                    await tenants.create(wvc.tenants.Tenant(name=tenant))
                except UnexpectedStatusCodeError:
                    # Created concurrently (older servers reject an existing tenant).
                    if not await tenants.exists(tenant):
                        raise

        await self._call("create the tenant", create)
        self._tenants.add(tenant)

    async def _writable(self, tenant: str) -> None:
        # With replicas another process may have erased the tenant since this one saw it:
        # a write must find it there (as the embedded store's write finds or creates the
        # file), not fail once on a stale memory. Two existence checks a write; searches
        # pay nothing.
        if self.shared or tenant not in self._tenants:
            await self.provision(tenant)

    async def erase(self, tenant: str) -> None:
        _check_tenant(tenant)
        self._tenants.discard(tenant)

        async def remove(client: WeaviateAsyncClient) -> None:
            for name in (self.chunks_name, self.settings_name):
                tenants = client.collections.use(name).tenants
                if await tenants.exists(tenant):
                    await tenants.remove([tenant])

        await self._call("erase the tenant", remove)

    # -- documents --------------------------------------------------------------------------

    async def indexed_versions(self, tenant: str, document_ids: Sequence[str]) -> dict[str, IndexedVersion]:
        ids = list(dict.fromkeys(document_ids))
        if not ids:
            return {}

        async def read(client: WeaviateAsyncClient) -> dict[str, IndexedVersion]:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)
            found: dict[str, IndexedVersion] = {}
            for start in range(0, len(ids), _IDS_PER_QUERY):
                part = ids[start:start + _IDS_PER_QUERY]
                result = await chunks.query.fetch_objects(
                    filters=(wvc.query.Filter.by_property("ordinal").equal(0)
                             & wvc.query.Filter.by_property("document_id").contains_any(part)),
                    limit=len(part),
                    return_properties=["document_id", "content_hash", "index_signature", "chunk_count", "access"])
                for obj in result.objects:
                    p = obj.properties
                    found[str(p["document_id"])] = IndexedVersion(
                        str(p["content_hash"]), str(p["index_signature"]), int(p["chunk_count"]),  # type: ignore[arg-type]
                        _labels(p.get("access")))
            return found

        return await self._read(tenant, "read document versions", read, {})

    async def upsert(self, tenant: str, documents: Sequence[PreparedDocument]) -> list[IngestResult]:
        if not documents:
            return []
        await self._writable(tenant)
        indexed = await self.indexed_versions(tenant, [p.document_id for p in documents])

        async def write(client: WeaviateAsyncClient) -> list[IngestResult]:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)
            results: list[IngestResult] = []
            bodies: list[wvc.data.DataObject[dict[str, Any], None]] = []
            markers: list[wvc.data.DataObject[dict[str, Any], None]] = []
            stale: list[_Filters] = []
            emptied: list[str] = []
            for prepared in documents:
                doc_id = prepared.document_id
                old = indexed.get(doc_id)
                if old is not None and (old.content_hash, old.index_signature) == (
                        prepared.content_hash, prepared.index_signature):
                    results.append(IngestResult(doc_id, IngestStatus.UNCHANGED, old.chunks, old.content_hash))
                    continue
                if not prepared.chunks:
                    emptied.append(doc_id)
                    results.append(IngestResult(doc_id, IngestStatus.EMPTY, 0, prepared.content_hash))
                    continue
                if prepared.vectors is not None and len(prepared.vectors) != len(prepared.chunks):
                    raise ValueError(f"{doc_id}: {len(prepared.vectors)} vectors for {len(prepared.chunks)} chunks")
                version = _version(prepared)
                for index, obj in enumerate(_objects(prepared, version)):
                    (markers if prepared.chunks[index].ordinal == 0 else bodies).append(obj)
                stale.append(wvc.query.Filter.by_property("document_id").equal(doc_id)
                             & wvc.query.Filter.by_property("version").not_equal(version))
                status = IngestStatus.REPLACED if old is not None else IngestStatus.CREATED
                results.append(IngestResult(doc_id, status, len(prepared.chunks), prepared.content_hash))
            # Order matters (see the module docstring): bodies, then old leftovers, then markers.
            await _insert(chunks, bodies)
            for start in range(0, len(stale), _IDS_PER_QUERY):
                part = stale[start:start + _IDS_PER_QUERY]
                await _delete_all(chunks, part[0] if len(part) == 1 else wvc.query.Filter.any_of(part))
            for start in range(0, len(emptied), _IDS_PER_QUERY):
                await _delete_all(chunks, wvc.query.Filter.by_property("document_id").contains_any(
                    emptied[start:start + _IDS_PER_QUERY]))
            await _insert(chunks, markers)
            return results

        try:
            return await self._call("write documents", write, bounded=False)
        except Unavailable:
            # The tenant may have been erased by another replica: provision again next time.
            self._tenants.discard(tenant)
            raise

    async def delete(self, tenant: str, document_ids: Sequence[str]) -> DeleteResult:
        ids = list(dict.fromkeys(document_ids))
        present = await self.indexed_versions(tenant, ids)

        async def delete(client: WeaviateAsyncClient) -> int:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)
            deleted = 0
            # Every id, not only those with a marker: a half-written document goes too.
            for start in range(0, len(ids), _IDS_PER_QUERY):
                deleted += await _delete_all(
                    chunks, wvc.query.Filter.by_property("document_id").contains_any(ids[start:start + _IDS_PER_QUERY]))
            return deleted

        deleted_chunks = await self._read(tenant, "delete documents", delete, 0) if ids else 0
        return DeleteResult(len(present), deleted_chunks, tuple(i for i in ids if i not in present))

    # -- search -----------------------------------------------------------------------------

    def _query_properties(self) -> list[str]:
        w = self.bm25
        return [f"title^{w.title:g}", f"section^{w.section:g}", f"text^{w.text:g}"]

    async def search_lexical(self, tenant: str, text: str, top_k: int,
                             filters: Mapping[str, str], access: AccessCheck | None = None) -> list[Hit]:
        # The same terms as the embedded store (stop words out); over gRPC no user text
        # can form query syntax anyway.
        terms = query_terms(text)
        if not terms or top_k <= 0:
            return []

        async def search(client: WeaviateAsyncClient) -> list[Hit]:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)

            async def run(limit: int, where: _Filters | None, properties: list[str]) -> Any:
                return await chunks.query.bm25(
                    query=" ".join(terms), query_properties=self._query_properties(), limit=limit,
                    filters=where, return_properties=properties, return_metadata=wvc.query.MetadataQuery(score=True))

            result = await _restricted(access, top_k, lambda limit, restrict: run(
                limit, _where(filters, access if restrict else None), _HIT_PROPERTIES))
            return [_hit(obj.properties, obj.metadata.score or 0.0) for obj in result.objects]

        return await self._read(tenant, "search", search, [])

    async def search_dense(self, tenant: str, vector: Vectors, top_k: int,
                           filters: Mapping[str, str], access: AccessCheck | None = None) -> list[Hit]:
        if top_k <= 0:
            return []
        query = [float(x) for x in vector.reshape(-1)]

        async def search(client: WeaviateAsyncClient) -> list[Hit]:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)

            async def run(limit: int, where: _Filters | None, properties: list[str]) -> Any:
                return await chunks.query.near_vector(
                    near_vector=query, target_vector=VECTOR_NAME, limit=limit, filters=where,
                    return_properties=properties, return_metadata=wvc.query.MetadataQuery(distance=True))

            result = await _restricted(access, top_k, lambda limit, restrict: run(
                limit, _where(filters, access if restrict else None), _HIT_PROPERTIES))
            # Cosine distance back to the contract's cosine similarity (higher is better).
            return [_hit(obj.properties, 1.0 - (obj.metadata.distance or 0.0)) for obj in result.objects]

        return await self._read(tenant, "search", search, [])

    async def search_hybrid(self, tenant: str, text: str, vector: Vectors, top_k: int,
                            filters: Mapping[str, str], *, alpha: float, fusion: Fusion,
                            access: AccessCheck | None = None) -> list[Hit]:
        """BM25 and dense fused by Weaviate in one request (`alpha` weighs dense, as ours)."""
        if top_k <= 0:
            return []
        terms = query_terms(text)
        query = [float(x) for x in vector.reshape(-1)]
        method = (wvc.query.HybridFusion.RANKED if fusion is Fusion.RRF
                  else wvc.query.HybridFusion.RELATIVE_SCORE)

        async def search(client: WeaviateAsyncClient) -> list[Hit]:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)

            async def run(limit: int, where: _Filters | None, properties: list[str]) -> Any:
                return await chunks.query.hybrid(
                    query=" ".join(terms) if terms else None, vector=query, alpha=alpha, fusion_type=method,
                    query_properties=self._query_properties(), target_vector=VECTOR_NAME, limit=limit,
                    filters=where, return_properties=properties,
                    return_metadata=wvc.query.MetadataQuery(score=True))

            result = await _restricted(access, top_k, lambda limit, restrict: run(
                limit, _where(filters, access if restrict else None), _HIT_PROPERTIES))
            return [_hit(obj.properties, obj.metadata.score or 0.0) for obj in result.objects]

        return await self._read(tenant, "search", search, [])

    async def set_access(self, tenant: str, changes: Mapping[str, frozenset[str]]) -> AccessChange:
        """Rewrites each relabelled document's chunk objects (same ids, stored vectors)."""
        wanted = dict(changes)
        present = await self.indexed_versions(tenant, list(wanted))
        updated = [d for d in wanted if d in present and present[d].access != wanted[d]]
        unchanged = tuple(d for d in wanted if d in present and d not in updated)

        async def write(client: WeaviateAsyncClient) -> None:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)
            for doc_id in updated:
                result = await chunks.query.fetch_objects(
                    filters=wvc.query.Filter.by_property("document_id").equal(doc_id),
                    limit=_DELETE_MAX_PER_CALL, include_vector=True)
                await _insert(chunks, [wvc.data.DataObject(
                    properties={**obj.properties, "access": _stored_labels(wanted[doc_id])}, uuid=obj.uuid,
                    vector=obj.vector or None) for obj in result.objects])

        if updated:
            await self._writable(tenant)
            await self._call("relabel documents", write, bounded=False)
        return AccessChange(tuple(updated), unchanged, tuple(d for d in wanted if d not in present))

    async def labels_in_use(self, tenant: str) -> frozenset[str] | None:
        # No cheap way to list them: results are then keyed on every label of the reader.
        return None

    async def unknown_metadata_keys(self, tenant: str, keys: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))

        async def read(client: WeaviateAsyncClient) -> set[str]:
            chunks = client.collections.use(self.chunks_name).with_tenant(tenant)
            unknown: set[str] = set()
            for key in wanted:
                result = await chunks.query.fetch_objects(
                    filters=wvc.query.Filter.by_property("metadata_keys").contains_any([key]), limit=1,
                    return_properties=["document_id"])
                if not result.objects:
                    unknown.add(key)
            return unknown

        return await self._read(tenant, "check metadata keys", read, set(wanted))

    # -- settings ---------------------------------------------------------------------------

    async def get_settings(self, tenant: str) -> dict[str, str]:
        async def read(client: WeaviateAsyncClient) -> dict[str, str]:
            settings = client.collections.use(self.settings_name).with_tenant(tenant)
            result = await settings.query.fetch_objects(limit=_SETTINGS_MAX, return_properties=["key", "value"])
            return {str(o.properties["key"]): str(o.properties["value"]) for o in result.objects}

        return await self._read(tenant, "read settings", read, {})

    async def put_settings(self, tenant: str, values: Mapping[str, str | None]) -> dict[str, str]:
        items = dict(values)
        await self._writable(tenant)

        async def write(client: WeaviateAsyncClient) -> None:
            settings = client.collections.use(self.settings_name).with_tenant(tenant)
            put = [wvc.data.DataObject(properties={"key": k, "value": v}, uuid=generate_uuid5(k))
                   for k, v in items.items() if v is not None]
            await _insert(settings, put)
            removed = [k for k, v in items.items() if v is None]
            if removed:
                await settings.data.delete_many(where=wvc.query.Filter.by_property("key").contains_any(removed))

        try:
            await self._call("write settings", write)
        except Unavailable:
            self._tenants.discard(tenant)
            raise
        return await self.get_settings(tenant)

    async def drop_collections(self) -> None:
        """Deletes this store's collections with every tenant in them (tests use their own
        collection prefix and drop it afterwards; never called by the service)."""
        self._tenants.clear()
        await self._call("drop collections",
                         lambda c: c.collections.delete([self.chunks_name, self.settings_name]))

    # -- health and shutdown ----------------------------------------------------------------

    async def healthy(self) -> bool:
        """Weaviate reachable and ready (REST readiness), with our collections in place."""
        if self._closed:
            return False
        try:
            client = await self._connected()
            if not await asyncio.wait_for(client.is_ready(), self.config.timeout_s):
                return False
            if not await client.collections.exists(self.chunks_name):
                # Weaviate came back empty (a new volume): recreate the collections; the
                # tenants this process knew are gone with them.
                self._tenants.clear()
                await asyncio.wait_for(self._ensure_schema(client), self.config.timeout_s)
            return True
        except Exception as exc:  # any failure to answer is "not healthy", never an error
            log.debug("weaviate health probe failed: %s", exc)
            return False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._connect_lock:
            if self._client is not None:
                await self._client.close()
                self._client = None


def _check_tenant(tenant: str) -> None:
    # Defence in depth: identity validates tenant ids; Weaviate tenant names are a superset.
    if not TENANT_ID_RE.match(tenant):
        raise ValueError(f"invalid tenant id {tenant!r}")


def _version(prepared: PreparedDocument) -> str:
    return generate_uuid5(f"{prepared.content_hash}|{prepared.index_signature}")


def _objects(prepared: PreparedDocument, version: str) -> list[wvc.data.DataObject[dict[str, Any], None]]:
    doc = prepared.document
    metadata = dict(sorted(doc.metadata.items()))
    common = {
        "document_id": doc.document_id, "title": doc.title, "source": doc.source, "version": version,
        "chunk_count": len(prepared.chunks), "content_hash": prepared.content_hash,
        "index_signature": prepared.index_signature,
        "metadata_json": json.dumps(metadata, ensure_ascii=False),
        "metadata_pairs": [_pair(k, v) for k, v in metadata.items()],
        "metadata_keys": list(metadata),
        "access": _stored_labels(doc.access),
    }
    objects = []
    for index, chunk in enumerate(prepared.chunks):
        vector = None
        if prepared.vectors is not None:
            vector = {VECTOR_NAME: [float(x) for x in prepared.vectors[index]]}
        objects.append(wvc.data.DataObject(
            properties={**common, "chunk_id": chunk.chunk_id, "ordinal": chunk.ordinal, "section": chunk.section,
                        "text": chunk.text,
                        "location_json": location_to_json(chunk.location) if chunk.location is not None else ""},
            # Stable per chunk: re-writing a chunk replaces its object.
            uuid=generate_uuid5(chunk.chunk_id, doc.document_id),
            vector=vector,
        ))
    return objects


async def _insert(collection: Any, objects: Sequence[wvc.data.DataObject[dict[str, Any], None]]) -> None:
    for start in range(0, len(objects), _OBJECTS_PER_BATCH):
        result = await collection.data.insert_many(list(objects[start:start + _OBJECTS_PER_BATCH]))
        if result.has_errors:
            first = next(iter(result.errors.values()))
            raise WeaviateQueryError(f"{len(result.errors)} objects failed: {first.message}", "GRPC batch")


# Weaviate deletes at most QUERY_MAXIMUM_RESULTS (10,000 by default) matches per call;
# a call that matched that many may have left more behind.
_DELETE_MAX_PER_CALL = 10_000
_DELETE_ROUNDS = 1000


async def _delete_all(collection: Any, where: _Filters) -> int:
    """Deletes every object matching `where`, in as many calls as Weaviate needs."""
    deleted = 0
    for _ in range(_DELETE_ROUNDS):
        result = await collection.data.delete_many(where=where)
        deleted += result.successful
        if result.successful == 0 or result.matches < _DELETE_MAX_PER_CALL:
            break
    return deleted




def _stored_labels(labels: frozenset[str]) -> list[str]:
    return sorted(labels) if labels else [PUBLIC_LABEL]


def _labels(stored: Any) -> frozenset[str]:
    return frozenset(str(label) for label in stored or () if label != PUBLIC_LABEL)


async def _restricted(access: AccessCheck | None, top_k: int,
                      query: Callable[[int, bool], Awaitable[Any]]) -> Any:
    """A search's result for `access`'s reader, and the documents withheld from it within
    `access.depth` added to `access.withheld`.

    The query runs first without the access filter (to `max(top_k, depth)`): when nothing in
    it is withheld, it is the answer cut to top_k, in one request as without labels (BM25 and
    cosine scores do not depend on the filter; hybrid's fused scores may differ slightly
    from a filtered query's); otherwise the filtered query runs as well, so a withheld
    document never takes a place."""
    if access is None:
        return await query(top_k, False)
    depth = max(top_k, access.depth)
    unrestricted = await query(depth, False)
    withheld = False
    for rank, obj in enumerate(unrestricted.objects):
        if not access.reader.may_read(_labels(obj.properties.get("access"))):
            withheld = True
            if rank < access.depth:
                access.withheld.add(str(obj.properties.get("document_id", "")))
    if not withheld:
        unrestricted.objects[:] = unrestricted.objects[:top_k]
        return unrestricted
    return await query(top_k, True)


def _where(filters: Mapping[str, str], access: AccessCheck | None = None) -> _Filters | None:
    """Exact-match filters: `document_id`, `source`, else a metadata key; with `access`, only
    chunks of documents its reader may read."""
    clauses: list[_Filters] = []
    if access is not None:
        clauses.append(wvc.query.Filter.by_property("access").contains_any(sorted({PUBLIC_LABEL, *access.labels})))
    for key, value in sorted(filters.items()):
        if key in ("document_id", "source"):
            clauses.append(wvc.query.Filter.by_property(key).equal(value))
        else:
            clauses.append(wvc.query.Filter.by_property("metadata_pairs").contains_any([_pair(key, value)]))
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else wvc.query.Filter.all_of(clauses)


def _pair(key: str, value: str) -> str:
    # JSON, so no key or value can be confused with another pair ("a=b"+"c" vs "a"+"b=c").
    return json.dumps([key, value], ensure_ascii=False, separators=(",", ":"))


def _hit(properties: Mapping[str, Any], score: float) -> Hit:
    return Hit(document_id=str(properties.get("document_id", "")), chunk_id=str(properties.get("chunk_id", "")),
               title=str(properties.get("title") or ""), section=str(properties.get("section") or ""),
               text=str(properties.get("text") or ""), score=float(score),
               source=str(properties.get("source") or ""),
               metadata=json.loads(str(properties.get("metadata_json") or "{}")),
               access=tuple(sorted(_labels(properties.get("access")))),
               location=location_from_json(str(properties.get("location_json") or "")))
