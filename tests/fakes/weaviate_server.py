"""A local fake of the parts of Weaviate (1.30 API) that the retrieval store uses, for the
real `weaviate-client` v4 to talk to over the wire.

REST (stdlib HTTP server): /v1/meta, /v1/.well-known/{ready,live,openid-configuration},
/v1/schema (list, create, get, delete a collection), /v1/schema/{c}/tenants (create, list,
update activity, delete; HEAD/GET one). gRPC (the client's own generated stubs, service
weaviate.v1.Weaviate): Search (fetch, bm25, near_vector, hybrid with relative-score or
ranked fusion; filters), BatchObjects, BatchDelete, TenantsGet, and grpc.health.v1.

Semantics kept real where the store depends on them: multi-tenant collections refuse a
request without a tenant or for an unknown tenant (each tenant's objects are a separate
dict, as Weaviate keeps a shard per tenant), tenant creation is explicit (auto creation is
not implemented: the store turns it off), an INACTIVE tenant is reactivated on access when
auto-activation is on and refused otherwise, batch inserts replace objects with the same
uuid, filters on unknown properties are errors, BM25 (k1=1.2, b=0.75, `word` tokenization,
per-property boosts) and cosine distance are computed, not canned. Not implemented: named
vector targets (one vector per object), references, generative/rerank modules, group-by,
aggregates, sorting, cursors, BatchStream, GraphQL, RBAC, replication, backups.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import threading
import time
import uuid as uuid_lib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from weaviate.proto.v1 import (
    base_pb2,
    base_search_pb2,
    batch_delete_pb2,
    batch_pb2,
    properties_pb2,
    search_get_pb2,
    tenants_pb2,
    weaviate_pb2_grpc,
)

VERSION = "1.30.0"
HOT, COLD = "HOT", "COLD"
_ACTIVE_NAMES = {"HOT": HOT, "ACTIVE": HOT, "COLD": COLD, "INACTIVE": COLD}
_CLASS_RE = re.compile(r"^[A-Z][_0-9A-Za-z]*$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9\-_]{1,64}$")
_WORD = re.compile(r"[^\W_]+")
K1, B = 1.2, 0.75
# Weaviate's cap on objects per query and per batch delete (its default).
QUERY_MAXIMUM_RESULTS = 10_000
# Each side of a hybrid query retrieves at least this many candidates before fusion.
HYBRID_CANDIDATES = 100


class FakeError(Exception):
    def __init__(self, status: int, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class StoredObject:
    uuid: str
    properties: dict[str, Any]
    vector: np.ndarray | None
    created_ms: int


@dataclass
class FakeState:
    api_key: str | None = None
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # class → tenant → activity status
    tenants: dict[str, dict[str, str]] = field(default_factory=dict)
    # (class, tenant or "") → uuid → object: one dict per shard.
    shards: dict[tuple[str, str], dict[str, StoredObject]] = field(default_factory=dict)
    # (protocol, operation) of every request, for tests that check what the client sent.
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -- schema -------------------------------------------------------------------------

    def collection(self, name: str) -> dict[str, Any]:
        schema = self.classes.get(name)
        if schema is None:
            raise FakeError(422, grpc.StatusCode.NOT_FOUND, f"could not find class {name} in schema")
        return schema

    def multi_tenant(self, name: str) -> bool:
        return bool(self.collection(name).get("multiTenancyConfig", {}).get("enabled"))

    def property_schema(self, name: str, prop: str) -> dict[str, Any]:
        for p in self.collection(name).get("properties", []):
            if p["name"] == prop:
                return dict(p)
        raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT,
                        f"no such prop with name '{prop}' found in class '{name}' in the schema")

    def shard(self, name: str, tenant: str, *, write: bool = False) -> dict[str, StoredObject]:
        """The objects of `tenant` in collection `name`, enforcing multi-tenancy."""
        if self.multi_tenant(name):
            if not tenant:
                raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT,
                                f"class {name} has multi-tenancy enabled, but request was without tenant")
            status = self.tenants.get(name, {}).get(tenant)
            if status is None:
                raise FakeError(422, grpc.StatusCode.NOT_FOUND, f'tenant not found: "{tenant}"')
            if status != HOT:
                config = self.collection(name).get("multiTenancyConfig", {})
                if not config.get("autoTenantActivation"):
                    raise FakeError(422, grpc.StatusCode.FAILED_PRECONDITION, f'tenant not active: "{tenant}"')
                # Loaded back on demand.
                self.tenants[name][tenant] = HOT
        elif tenant:
            raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT,
                            f"class {name} has multi-tenancy disabled, but request was with tenant")
        return self.shards.setdefault((name, tenant), {})

    # -- introspection for tests ----------------------------------------------------------

    def object_count(self, name: str, tenant: str) -> int:
        with self.lock:
            return len(self.shards.get((name, tenant), {}))

    def tenant_names(self, name: str) -> set[str]:
        with self.lock:
            return set(self.tenants.get(name, {}))


# -- REST ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    state: FakeState
    # HTTP/1.0: one request per connection, so stopping the server leaves no kept-alive
    # connection still answering (a stopped fake must look down to the client).
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _send(self, status: int, body: Any = None, *, head: bool = False) -> None:
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        if raw and not head:
            self.wfile.write(raw)

    def _handle(self, method: str) -> None:
        path = urlparse(self.path).path
        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self.state.lock:
            self.state.requests.append(("rest", f"{method} {path}"))
        if parts[:2] != ["v1", ".well-known"] and self.state.api_key is not None \
                and self.headers.get("authorization") != f"Bearer {self.state.api_key}":
            self._send(401, {"code": 401, "message": "anonymous access not enabled"})
            return
        try:
            status, body = self._route(method, parts[1:] if parts[:1] == ["v1"] else None)
        except FakeError as exc:
            status, body = exc.status, {"error": [{"message": exc.message}]}
        self._send(status, body, head=method == "HEAD")

    def _route(self, method: str, parts: list[str] | None) -> tuple[int, Any]:
        state = self.state
        if parts is None:
            return 404, None
        if parts == ["meta"] and method == "GET":
            return 200, {"hostname": "http://[::]:8080", "version": VERSION, "modules": {},
                         "grpcMaxMessageSize": 104858000}
        if parts[:1] == [".well-known"] and len(parts) == 2:
            return (200, None) if parts[1] in ("ready", "live") else (404, None)
        if parts[:1] != ["schema"]:
            return 404, None
        with state.lock:
            if len(parts) == 1:
                if method == "GET":
                    return 200, {"classes": list(state.classes.values())}
                if method == "POST":
                    return self._create_class(self._body())
            name = parts[1] if len(parts) > 1 else ""
            if len(parts) == 2:
                if method == "GET":
                    return (200, state.classes[name]) if name in state.classes else (404, None)
                if method == "DELETE":
                    state.classes.pop(name, None)
                    state.tenants.pop(name, None)
                    for key in [k for k in state.shards if k[0] == name]:
                        del state.shards[key]
                    return 200, None
            if len(parts) == 3 and parts[2] == "properties" and method == "POST":
                # Adding a property in place (a schema upgrade); objects stored before lack it.
                prop = self._body()
                schema = state.collection(name)
                if any(p["name"] == prop.get("name") for p in schema["properties"]):
                    raise FakeError(422, grpc.StatusCode.ALREADY_EXISTS, f"property {prop.get('name')} exists")
                prop.setdefault("tokenization", "word" if prop["dataType"][0] in ("text", "text[]") else None)
                prop.setdefault("indexSearchable", prop["dataType"][0] in ("text", "text[]"))
                prop.setdefault("indexFilterable", True)
                schema["properties"].append(prop)
                return 200, prop
            if len(parts) >= 3 and parts[2] == "tenants":
                return self._tenants(method, name, parts[3] if len(parts) == 4 else None)
        return 404, None

    def _create_class(self, body: Any) -> tuple[int, Any]:
        state = self.state
        name = str(body.get("class", ""))
        if not _CLASS_RE.match(name):
            raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, f"'{name}' is not a valid class name")
        if name in state.classes:
            raise FakeError(422, grpc.StatusCode.ALREADY_EXISTS, f"class name {name} already exists")
        body.setdefault("properties", [])
        for prop in body["properties"]:
            prop.setdefault("tokenization", "word" if prop["dataType"][0] in ("text", "text[]") else None)
            prop.setdefault("indexSearchable", prop["dataType"][0] in ("text", "text[]"))
            prop.setdefault("indexFilterable", True)
        # What Weaviate fills in and its client reads back (add_property checks the schema).
        for vector in (body.get("vectorConfig") or {}).values():
            vector.setdefault("vectorIndexType", "hnsw")
            vector.setdefault("vectorIndexConfig", dict(_HNSW_DEFAULTS))
        state.classes[name] = body
        if body.get("multiTenancyConfig", {}).get("enabled"):
            state.tenants[name] = {}
        return 200, body

    def _tenants(self, method: str, name: str, one: str | None) -> tuple[int, Any]:
        state = self.state
        if not state.multi_tenant(name):
            raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, f"multi-tenancy is not enabled for class {name!r}")
        tenants = state.tenants[name]
        if one is not None:
            if method in ("HEAD", "GET"):
                if one not in tenants:
                    return 404, None
                return 200, {"name": one, "activityStatus": tenants[one]}
            return 405, None
        if method == "GET":
            return 200, [{"name": t, "activityStatus": s} for t, s in sorted(tenants.items())]
        body = self._body() or []
        if method in ("POST", "PUT"):
            for item in body:
                tenant = str(item.get("name", ""))
                if not _TENANT_RE.match(tenant):
                    raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, f"invalid tenant name {tenant!r}")
                status = _ACTIVE_NAMES.get(str(item.get("activityStatus") or HOT).upper(), HOT)
                if method == "PUT" and tenant not in tenants:
                    raise FakeError(422, grpc.StatusCode.NOT_FOUND, f'tenant not found: "{tenant}"')
                if method == "POST" and tenant in tenants:
                    continue  # creating an existing tenant is a no-op, as in current Weaviate
                tenants[tenant] = status
            return 200, body
        if method == "DELETE":
            for tenant in body:
                tenants.pop(tenant, None)
                state.shards.pop((name, tenant), None)
            return 200, None
        return 405, None

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


# -- gRPC ------------------------------------------------------------------------------------


_HNSW_DEFAULTS: dict[str, Any] = {
    "distance": "cosine", "cleanupIntervalSeconds": 300, "dynamicEfFactor": 8, "dynamicEfMax": 500,
    "dynamicEfMin": 100, "ef": -1, "efConstruction": 128, "filterStrategy": "sweeping", "flatSearchCutoff": 40000,
    "maxConnections": 32, "skip": False, "vectorCacheMaxObjects": 1000000000000,
}


def _tokens(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [t for v in values if isinstance(v, str) for t in _WORD.findall(v.lower())]


def _struct_value(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _decode_vector(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32).astype(np.float64)


def _object_vector(obj: batch_pb2.BatchObject) -> np.ndarray | None:
    if obj.vector_bytes:
        return _decode_vector(obj.vector_bytes)
    if len(obj.vectors):
        return _decode_vector(obj.vectors[0].vector_bytes)
    if len(obj.vector):
        return np.asarray(list(obj.vector), dtype=np.float64)
    return None


def _query_vector(message: Any) -> np.ndarray | None:
    """The query vector of a NearVector or Hybrid message, in whichever field it came."""
    if message.vector_bytes:
        return _decode_vector(message.vector_bytes)
    if len(message.vectors):
        return _decode_vector(message.vectors[0].vector_bytes)
    if len(message.vector):
        return np.asarray(list(message.vector), dtype=np.float64)
    if isinstance(message, base_search_pb2.Hybrid) and message.HasField("near_vector"):
        return _query_vector(message.near_vector)
    return None


def _value(value: Any) -> properties_pb2.Value:
    if value is None:
        return properties_pb2.Value(null_value="NULL_VALUE")
    if isinstance(value, bool):
        return properties_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return properties_pb2.Value(int_value=value)
    if isinstance(value, float):
        return properties_pb2.Value(number_value=value)
    if isinstance(value, list):
        return properties_pb2.Value(list_value=properties_pb2.ListValue(
            text_values=properties_pb2.TextValues(values=[str(v) for v in value])))
    return properties_pb2.Value(text_value=str(value))


class _Weaviate(weaviate_pb2_grpc.WeaviateServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def _guard(self, context: grpc.ServicerContext, operation: str) -> None:
        with self.state.lock:
            self.state.requests.append(("grpc", operation))
        if self.state.api_key is not None:
            metadata = dict(context.invocation_metadata())
            if metadata.get("authorization") != f"Bearer {self.state.api_key}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "anonymous access not enabled")

    def _run(self, context: grpc.ServicerContext, operation: str, job: Callable[[], Any]) -> Any:
        self._guard(context, operation)
        try:
            with self.state.lock:
                return job()
        except FakeError as exc:
            context.abort(exc.code, exc.message)

    # -- writes ---------------------------------------------------------------------------

    def BatchObjects(self, request: batch_pb2.BatchObjectsRequest,
                     context: grpc.ServicerContext) -> batch_pb2.BatchObjectsReply:
        started = time.perf_counter()

        def run() -> batch_pb2.BatchObjectsReply:
            errors = []
            for index, obj in enumerate(request.objects):
                try:
                    self._put(obj)
                except FakeError as exc:
                    errors.append(batch_pb2.BatchObjectsReply.BatchError(index=index, error=exc.message))
            return batch_pb2.BatchObjectsReply(took=time.perf_counter() - started, errors=errors)

        return self._run(context, "BatchObjects", run)

    def _put(self, obj: batch_pb2.BatchObject) -> None:
        state = self.state
        shard = state.shard(obj.collection, obj.tenant, write=True)
        props: dict[str, Any] = {}
        p = obj.properties
        for key, value in dict(p.non_ref_properties).items():
            props[key] = _struct_value(value) if not isinstance(value, list) else value
        for arrays in (p.text_array_properties, p.int_array_properties, p.number_array_properties,
                       p.boolean_array_properties):
            for array in arrays:
                props[array.prop_name] = list(array.values)
        for name in p.empty_list_props:
            props[name] = []
        for key in props:
            state.property_schema(obj.collection, key)  # no auto-schema: unknown properties fail
        try:
            uid = str(uuid_lib.UUID(obj.uuid))
        except ValueError as exc:
            raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, f"invalid uuid {obj.uuid!r}") from exc
        vector = _object_vector(obj)
        if vector is not None:
            # A shard's vector index has one dimension, fixed by its first vector.
            width = next((len(o.vector) for o in shard.values() if o.vector is not None and o.uuid != uid), None)
            if width is not None and width != len(vector):
                raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT,
                                f"new node has a vector with length {len(vector)}. "
                                f"Existing nodes have vectors with length {width}")
        old = shard.get(uid)
        shard[uid] = StoredObject(uid, props, vector, old.created_ms if old else int(time.time() * 1000))

    def BatchDelete(self, request: batch_delete_pb2.BatchDeleteRequest,
                    context: grpc.ServicerContext) -> batch_delete_pb2.BatchDeleteReply:
        started = time.perf_counter()

        def run() -> batch_delete_pb2.BatchDeleteReply:
            if not request.HasField("filters"):
                raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, "batch delete needs filters")
            shard = self.state.shard(request.collection, request.tenant, write=True)
            matches = [o for o in shard.values()
                       if self._matches(request.collection, request.filters, o)][:QUERY_MAXIMUM_RESULTS]
            if not request.dry_run:
                for obj in matches:
                    del shard[obj.uuid]
            objects = [batch_delete_pb2.BatchDeleteObject(uuid=uuid_lib.UUID(o.uuid).bytes, successful=True)
                       for o in matches] if request.verbose else []
            return batch_delete_pb2.BatchDeleteReply(
                took=time.perf_counter() - started, failed=0, matches=len(matches),
                successful=0 if request.dry_run else len(matches), objects=objects)

        return self._run(context, "BatchDelete", run)

    def TenantsGet(self, request: tenants_pb2.TenantsGetRequest,
                   context: grpc.ServicerContext) -> tenants_pb2.TenantsGetReply:
        def run() -> tenants_pb2.TenantsGetReply:
            if not self.state.multi_tenant(request.collection):
                raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, "multi-tenancy is not enabled")
            tenants = self.state.tenants[request.collection]
            names = list(request.names.values) if request.HasField("names") else sorted(tenants)
            status = {HOT: tenants_pb2.TENANT_ACTIVITY_STATUS_HOT, COLD: tenants_pb2.TENANT_ACTIVITY_STATUS_COLD}
            return tenants_pb2.TenantsGetReply(tenants=[
                tenants_pb2.Tenant(name=n, activity_status=status[tenants[n]]) for n in names if n in tenants])

        return self._run(context, "TenantsGet", run)

    # -- search ---------------------------------------------------------------------------

    def Search(self, request: search_get_pb2.SearchRequest,
               context: grpc.ServicerContext) -> search_get_pb2.SearchReply:
        started = time.perf_counter()

        def run() -> search_get_pb2.SearchReply:
            kind = next((f for f in ("bm25_search", "near_vector", "hybrid_search") if request.HasField(f)), "fetch")
            self.state.requests.append(("grpc", f"Search/{kind}"))
            name = request.collection
            shard = self.state.shard(name, request.tenant)
            candidates = [o for o in shard.values()
                          if not request.HasField("filters") or self._matches(name, request.filters, o)]
            limit = request.limit or 10  # Weaviate's QUERY_DEFAULTS_LIMIT
            scored: list[tuple[StoredObject, float | None, float | None]]
            if request.HasField("bm25_search"):
                bm25 = self._bm25(name, shard, candidates, request.bm25_search.query,
                                  list(request.bm25_search.properties))
                scored = [(o, s, None) for o, s in bm25[:limit]]
            elif request.HasField("near_vector"):
                vector = _query_vector(request.near_vector)
                if vector is None:
                    raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, "near_vector without a vector")
                scored = [(o, None, d) for o, d in self._near(candidates, vector)[:limit]]
            elif request.HasField("hybrid_search"):
                scored = [(o, s, None) for o, s in self._hybrid(name, shard, candidates, request.hybrid_search, limit)]
            elif any(request.HasField(f) for f in ("near_text", "near_object", "near_image", "near_audio",
                                                   "near_video", "near_depth", "near_thermal", "near_imu")):
                raise FakeError(422, grpc.StatusCode.UNIMPLEMENTED, "this fake only supports bm25, near_vector"
                                " and hybrid searches")
            else:
                ordered = sorted(candidates, key=lambda o: o.uuid)
                offset = request.offset
                scored = [(o, None, None) for o in ordered[offset:offset + limit]]
            return search_get_pb2.SearchReply(
                took=time.perf_counter() - started,
                results=[self._result(name, request, o, s, d) for o, s, d in scored])

        return self._run(context, "Search", run)

    def _result(self, name: str, request: search_get_pb2.SearchRequest, obj: StoredObject,
                score: float | None, distance: float | None) -> search_get_pb2.SearchResult:
        wanted = request.properties
        if wanted.return_all_nonref_properties or not request.HasField("properties"):
            keys = list(obj.properties)
        else:
            keys = [k for k in wanted.non_ref_properties if k in obj.properties]
        metadata = search_get_pb2.MetadataResult(
            id=obj.uuid, id_as_bytes=uuid_lib.UUID(obj.uuid).bytes,
            creation_time_unix=obj.created_ms, creation_time_unix_present=request.metadata.creation_time_unix)
        if score is not None and request.metadata.score:
            metadata.score, metadata.score_present = score, True
        if distance is not None and request.metadata.distance:
            metadata.distance, metadata.distance_present = distance, True
        if distance is not None and request.metadata.certainty:
            metadata.certainty, metadata.certainty_present = 1 - distance / 2, True
        if request.metadata.vector and obj.vector is not None:
            metadata.vector_bytes = obj.vector.astype(np.float32).tobytes()
        return search_get_pb2.SearchResult(
            properties=search_get_pb2.PropertiesResult(
                target_collection=name,
                non_ref_props=properties_pb2.Properties(fields={k: _value(obj.properties[k]) for k in keys})),
            metadata=metadata)

    def _bm25(self, name: str, shard: dict[str, StoredObject], candidates: Iterable[StoredObject], query: str,
              properties: list[str]) -> list[tuple[StoredObject, float]]:
        """BM25 summed over the searched properties (each with its own length statistics)
        times its boost; idf over the whole shard, as Weaviate computes it per shard."""
        boosts: dict[str, float] = {}
        for spec in properties or [p["name"] for p in self.state.collection(name)["properties"]
                                   if p.get("indexSearchable") and p["dataType"][0] in ("text", "text[]")]:
            prop, _, boost = spec.partition("^")
            schema = self.state.property_schema(name, prop)
            if not schema.get("indexSearchable"):
                raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, f"property '{prop}' is not searchable")
            boosts[prop] = float(boost) if boost else 1.0
        terms = list(dict.fromkeys(_tokens(query)))
        if not terms:
            return []
        # The collection's own BM25 parameters, as Weaviate reads them (its defaults otherwise).
        params = (self.state.collection(name).get("invertedIndexConfig") or {}).get("bm25") or {}
        k1, b = float(params.get("k1", K1)), float(params.get("b", B))
        objects = list(shard.values())
        total = len(objects)
        tokens = {o.uuid: {p: _tokens(o.properties.get(p, "")) for p in boosts} for o in objects}
        avg = {p: (sum(len(t[p]) for t in tokens.values()) / total if total else 0.0) or 1.0 for p in boosts}
        df = {term: sum(1 for t in tokens.values() if any(term in t[p] for p in boosts)) for term in terms}
        results: list[tuple[StoredObject, float]] = []
        for obj in candidates:
            score = 0.0
            for prop, weight in boosts.items():
                words = tokens[obj.uuid][prop]
                for term in terms:
                    tf = words.count(term)
                    if not tf:
                        continue
                    idf = math.log(1 + (total - df[term] + 0.5) / (df[term] + 0.5))
                    score += weight * idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(words) / avg[prop]))
            if score > 0:
                results.append((obj, score))
        results.sort(key=lambda r: (-r[1], r[0].uuid))
        return results

    @staticmethod
    def _near(candidates: Iterable[StoredObject], vector: np.ndarray) -> list[tuple[StoredObject, float]]:
        norm = float(np.linalg.norm(vector)) or 1.0
        results = []
        for obj in candidates:
            if obj.vector is None or obj.vector.shape != vector.shape:
                continue
            other = float(np.linalg.norm(obj.vector)) or 1.0
            results.append((obj, 1.0 - float(obj.vector @ vector) / (norm * other)))
        results.sort(key=lambda r: (r[1], r[0].uuid))
        return results

    def _hybrid(self, name: str, shard: dict[str, StoredObject], candidates: list[StoredObject],
                hybrid: base_search_pb2.Hybrid, limit: int) -> list[tuple[StoredObject, float]]:
        alpha = hybrid.alpha_param if hybrid.use_alpha_param else hybrid.alpha
        depth = max(limit, HYBRID_CANDIDATES)
        keyword = self._bm25(name, shard, candidates, hybrid.query, list(hybrid.properties))[:depth] \
            if hybrid.query and alpha < 1 else []
        vector = _query_vector(hybrid)
        dense = [(o, -d) for o, d in self._near(candidates, vector)[:depth]] if vector is not None and alpha > 0 else []
        scores: dict[str, float] = {}
        by_id: dict[str, StoredObject] = {}
        ranked = hybrid.fusion_type == base_search_pb2.Hybrid.FUSION_TYPE_RANKED
        for weight, hits in ((1 - alpha, keyword), (alpha, dense)):
            if not hits:
                continue
            low, high = min(s for _, s in hits), max(s for _, s in hits)
            for rank, (obj, value) in enumerate(hits):
                by_id[obj.uuid] = obj
                if ranked:
                    part = weight / (60 + rank)
                else:
                    part = weight * ((value - low) / (high - low) if high > low else 1.0)
                scores[obj.uuid] = scores.get(obj.uuid, 0.0) + part
        order = sorted(scores, key=lambda u: (-scores[u], u))[:limit]
        return [(by_id[u], scores[u]) for u in order]

    # -- filters --------------------------------------------------------------------------

    def _matches(self, name: str, flt: base_pb2.Filters, obj: StoredObject) -> bool:
        op = flt.operator
        F = base_pb2.Filters
        if op == F.OPERATOR_AND:
            return all(self._matches(name, f, obj) for f in flt.filters)
        if op == F.OPERATOR_OR:
            return any(self._matches(name, f, obj) for f in flt.filters)
        if op == F.OPERATOR_NOT:
            return not self._matches(name, flt.filters[0], obj)
        prop = flt.target.property if flt.HasField("target") else (flt.on[0] if len(flt.on) else "")
        self.state.property_schema(name, prop)
        actual = obj.properties.get(prop)
        values = actual if isinstance(actual, list) else ([] if actual is None else [actual])
        kind = flt.WhichOneof("test_value")
        if kind is None:
            raise FakeError(422, grpc.StatusCode.INVALID_ARGUMENT, "filter without a value")
        raw = getattr(flt, kind)
        wanted = list(raw.values) if kind.endswith("_array") else [raw]
        if op == F.OPERATOR_EQUAL:
            return wanted[0] in values
        if op == F.OPERATOR_NOT_EQUAL:
            return wanted[0] not in values
        if op == F.OPERATOR_CONTAINS_ANY:
            return any(w in values for w in wanted)
        if op == F.OPERATOR_CONTAINS_ALL:
            return all(w in values for w in wanted)
        if op == F.OPERATOR_CONTAINS_NONE:
            return not any(w in values for w in wanted)
        comparisons = {F.OPERATOR_GREATER_THAN: lambda a, b: a > b, F.OPERATOR_GREATER_THAN_EQUAL: lambda a, b: a >= b,
                       F.OPERATOR_LESS_THAN: lambda a, b: a < b, F.OPERATOR_LESS_THAN_EQUAL: lambda a, b: a <= b}
        if op in comparisons:
            return any(comparisons[op](v, wanted[0]) for v in values)
        raise FakeError(422, grpc.StatusCode.UNIMPLEMENTED, f"this fake does not implement filter operator {op}")


# -- server ----------------------------------------------------------------------------------


class FakeWeaviate:
    """REST and gRPC on two loopback ports, served from threads (usable from any event loop)."""

    def __init__(self, *, http_port: int = 0, grpc_port: int = 0, api_key: str | None = None) -> None:
        self.state = FakeState(api_key=api_key)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._http = ThreadingHTTPServer(("127.0.0.1", http_port), handler)
        self._http.daemon_threads = True
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._grpc = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-weaviate"))
        weaviate_pb2_grpc.add_WeaviateServicer_to_server(_Weaviate(self.state), self._grpc)
        checker = health.HealthServicer()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{grpc_port}")
        self.running = False

    @property
    def http_port(self) -> int:
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> FakeWeaviate:
        self._http_thread.start()
        self._grpc.start()
        self.running = True
        return self

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(grace=None).wait(5)

    def __enter__(self) -> FakeWeaviate:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake Weaviate (REST + gRPC) for local tests")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    fake = FakeWeaviate(http_port=args.http_port, grpc_port=args.grpc_port, api_key=args.api_key).start()
    print(json.dumps({"url": fake.url, "grpc_port": fake.grpc_port}), flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    fake.stop()


if __name__ == "__main__":
    main()
