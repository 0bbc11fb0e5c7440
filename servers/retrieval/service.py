"""gRPC boundary of the retrieval service: validation and protobuf ↔ domain conversion.

The tenant always comes from the verified identity the server interceptor put in the
call's context, never from a request field. Invalid requests fail with INVALID_ARGUMENT
and a BadRequest detail naming every offending field (up to a limit), so a client can
fix a whole batch in one go.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from grpc.aio import ServicerContext

from copilot.v1 import audit_pb2
from copilot.v1 import retrieval_pb2 as pb
from copilot.v1 import retrieval_pb2_grpc as pb_grpc
from servers.common.audit import AuditTrail
from servers.common.errors import FieldViolation, InvalidArgument
from servers.common.identity import ADMIN, INGEST, SERVICE, current, is_internal, require_role, tenant_id
from servers.retrieval.access import AccessLabelError, Reader, parse_labels
from servers.retrieval.chunker import section_below_title
from servers.retrieval.engine import (
    SETTING_ALPHA,
    SETTING_FUSION,
    SETTING_MODE,
    SETTING_TOP_K,
    RetrievalEngine,
    TenantDefaults,
)
from servers.retrieval.fusion import Fusion
from servers.retrieval.models import (
    MARKDOWN,
    PLAIN_TEXT,
    RESERVED_FILTER_KEYS,
    DocumentInput,
    Hit,
    IngestResult,
    IngestStatus,
    SearchMode,
    SearchQuery,
    SearchResult,
)
from servers.retrieval.tenants import TenantRegistry

MAX_QUERY_CHARS = 2_000
MAX_TOP_K = 100
MAX_DOCUMENT_ID_CHARS = 256
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_BATCH_DOCUMENTS = 1_000
MAX_DELETE_IDS = 1_000
MAX_TITLE_CHARS = 2_000
MAX_SOURCE_CHARS = 2_000
MAX_METADATA_ENTRIES = 64
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 2_000
MAX_FILTERS = 16
# Enough to fix a batch in one round trip without an unbounded error payload.
MAX_REPORTED_VIOLATIONS = 20
# Search's trailing metadata to a peer of the mesh (generation, for its audit): how many
# documents were withheld from the caller. Never sent to a call from outside the mesh: the
# count would tell a reader that documents it may not see match its query.
WITHHELD_TRAILER = "x-copilot-withheld"

_CONTENT_TYPES = {"": PLAIN_TEXT, "text/plain": PLAIN_TEXT, "text/markdown": MARKDOWN,
                  "text/x-markdown": MARKDOWN}

_MODES: dict[int, SearchMode | None] = {
    pb.SEARCH_MODE_UNSPECIFIED: None,
    pb.SEARCH_MODE_BM25: SearchMode.BM25,
    pb.SEARCH_MODE_DENSE: SearchMode.DENSE,
    pb.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
}
_MODES_OUT: dict[SearchMode, pb.SearchMode] = {
    SearchMode.BM25: pb.SEARCH_MODE_BM25,
    SearchMode.DENSE: pb.SEARCH_MODE_DENSE,
    SearchMode.HYBRID: pb.SEARCH_MODE_HYBRID,
}
_FUSIONS: dict[int, Fusion | None] = {
    pb.FUSION_METHOD_UNSPECIFIED: None,
    pb.FUSION_METHOD_RECIPROCAL_RANK: Fusion.RRF,
    pb.FUSION_METHOD_RELATIVE_SCORE: Fusion.RELATIVE_SCORE,
}
_FUSIONS_OUT: dict[Fusion, pb.FusionMethod] = {
    Fusion.RRF: pb.FUSION_METHOD_RECIPROCAL_RANK,
    Fusion.RELATIVE_SCORE: pb.FUSION_METHOD_RELATIVE_SCORE,
}
_STATUS_OUT: dict[IngestStatus, pb.IngestStatus] = {
    IngestStatus.CREATED: pb.INGEST_STATUS_CREATED,
    IngestStatus.REPLACED: pb.INGEST_STATUS_REPLACED,
    IngestStatus.UNCHANGED: pb.INGEST_STATUS_UNCHANGED,
    IngestStatus.EMPTY: pb.INGEST_STATUS_EMPTY,
}


@dataclass
class _Violations:
    """Collects field violations; raises them together as one INVALID_ARGUMENT."""

    suffix: str = ""
    items: list[FieldViolation] = field(default_factory=list)
    total: int = 0

    def add(self, name: str, description: str) -> None:
        self.total += 1
        if len(self.items) < MAX_REPORTED_VIOLATIONS:
            self.items.append(FieldViolation(name, description + self.suffix))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        first = self.items[0]
        message = f"{first.field}: {first.description}"
        if self.total > 1:
            message += f" (and {self.total - 1} more problem{'s' if self.total > 2 else ''})"
        raise InvalidArgument(message, self.items)


def _check_text(violations: _Violations, name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        violations.add(name, f"must be at most {limit:,} characters, got {len(value):,}")


def _check_document_id(violations: _Violations, name: str, value: str) -> None:
    if not value.strip():
        violations.add(name, "must not be empty")
    elif len(value) > MAX_DOCUMENT_ID_CHARS:
        violations.add(name, f"must be at most {MAX_DOCUMENT_ID_CHARS} characters, got {len(value):,}")
    elif any(ch < " " or ch == "\x7f" for ch in value):
        violations.add(name, "must not contain control characters")


def documents_from_proto(documents: Sequence[pb.Document], suffix: str = "") -> list[DocumentInput]:
    violations = _Violations(suffix)
    if len(documents) > MAX_BATCH_DOCUMENTS:
        violations.add("documents", f"at most {MAX_BATCH_DOCUMENTS:,} documents per batch, got {len(documents):,}"
                       " (split the batch)")
        violations.raise_if_any()
    seen: dict[str, int] = {}
    converted: list[DocumentInput] = []
    for index, doc in enumerate(documents):
        prefix = f"documents[{index}]"
        _check_document_id(violations, f"{prefix}.document_id", doc.document_id)
        if doc.document_id in seen:
            violations.add(f"{prefix}.document_id",
                           f"duplicates documents[{seen[doc.document_id]}].document_id {doc.document_id!r}")
        seen.setdefault(doc.document_id, index)
        size = len(doc.text.encode("utf-8"))
        if size > MAX_DOCUMENT_BYTES:
            violations.add(f"{prefix}.text", f"must be at most 1 MiB ({MAX_DOCUMENT_BYTES:,} bytes) of UTF-8,"
                           f" got {size:,} bytes (split the document)")
        _check_text(violations, f"{prefix}.title", doc.title, MAX_TITLE_CHARS)
        _check_text(violations, f"{prefix}.source", doc.source, MAX_SOURCE_CHARS)
        content_type = _CONTENT_TYPES.get(doc.content_type.split(";")[0].strip().lower())
        if content_type is None:
            violations.add(f"{prefix}.content_type",
                           f"unsupported {doc.content_type!r}: use text/plain or text/markdown")
        _check_metadata(violations, f"{prefix}.metadata", doc.metadata)
        access = _labels(violations, f"{prefix}.access", doc.access)
        converted.append(DocumentInput(
            document_id=doc.document_id, title=doc.title, text=doc.text, source=doc.source,
            metadata=dict(doc.metadata), content_type=content_type or PLAIN_TEXT, access=access,
        ))
    violations.raise_if_any()
    return converted


def _labels(violations: _Violations, name: str, labels: Sequence[str]) -> frozenset[str]:
    try:
        return parse_labels(labels)
    except AccessLabelError as exc:
        violations.add(name, str(exc))
        return frozenset()


def access_changes_from_proto(documents: Sequence[pb.DocumentAccess]) -> dict[str, frozenset[str]]:
    violations = _Violations()
    if not documents:
        violations.add("documents", "must name at least one document")
    elif len(documents) > MAX_BATCH_DOCUMENTS:
        violations.add("documents", f"at most {MAX_BATCH_DOCUMENTS:,} documents per call, got {len(documents):,}")
    changes: dict[str, frozenset[str]] = {}
    for index, doc in enumerate(documents[:MAX_BATCH_DOCUMENTS]):
        _check_document_id(violations, f"documents[{index}].document_id", doc.document_id)
        if doc.document_id in changes:
            violations.add(f"documents[{index}].document_id", f"names {doc.document_id!r} twice")
        changes[doc.document_id] = _labels(violations, f"documents[{index}].access", doc.access)
    violations.raise_if_any()
    return changes


def _check_metadata(violations: _Violations, name: str, metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        violations.add(name, f"at most {MAX_METADATA_ENTRIES} entries, got {len(metadata)}")
        return
    for key, value in metadata.items():
        if not key.strip():
            violations.add(name, "keys must not be empty")
        elif key in RESERVED_FILTER_KEYS:
            violations.add(f"{name}[{key!r}]", f"{key!r} is reserved: set Document.{key} instead")
        _check_text(violations, f"{name}[{key[:MAX_KEY_CHARS]!r}]", key, MAX_KEY_CHARS)
        _check_text(violations, f"{name}[{key[:MAX_KEY_CHARS]!r}]", value, MAX_VALUE_CHARS)


def search_query_from_proto(request: pb.SearchRequest) -> SearchQuery:
    violations = _Violations()
    query = request.query
    if not query.strip():
        violations.add("query", "must not be empty")
    elif len(query) > MAX_QUERY_CHARS:
        violations.add("query", f"must be at most {MAX_QUERY_CHARS:,} characters, got {len(query):,}")
    if not 0 <= request.top_k <= MAX_TOP_K:
        violations.add("top_k", f"must be between 1 and {MAX_TOP_K} (0 for the default), got {request.top_k}")
    if request.mode not in _MODES:
        violations.add("mode", f"unknown search mode {request.mode}")
    mode = _MODES.get(request.mode)
    if request.fusion not in _FUSIONS:
        violations.add("fusion", f"unknown fusion method {request.fusion}")
    fusion = _FUSIONS.get(request.fusion)
    alpha: float | None = None
    if request.HasField("alpha"):
        alpha = request.alpha
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            violations.add("alpha", f"must be between 0 and 1, got {alpha}")
    if len(request.filters) > MAX_FILTERS:
        violations.add("filters", f"at most {MAX_FILTERS} filters, got {len(request.filters)}")
    else:
        for key, value in request.filters.items():
            if not key.strip():
                violations.add("filters", "keys must not be empty")
            _check_text(violations, f"filters[{key[:MAX_KEY_CHARS]!r}]", key, MAX_KEY_CHARS)
            _check_text(violations, f"filters[{key[:MAX_KEY_CHARS]!r}]", value, MAX_VALUE_CHARS)
    violations.raise_if_any()
    return SearchQuery(text=query, top_k=request.top_k, filters=dict(request.filters),
                       mode=mode, alpha=alpha, fusion=fusion.value if fusion else None)


def search_response(result: SearchResult) -> pb.SearchResponse:
    response = pb.SearchResponse(hits=[hit_to_proto(hit) for hit in result.hits], mode=_MODES_OUT[result.mode],
                                 cached=result.cached)
    if result.alpha is not None:
        response.alpha = result.alpha
    if result.fusion is not None:
        response.fusion = _FUSIONS_OUT[Fusion(result.fusion)]
    return response


def settings_from_proto(request: pb.ConfigureSearchRequest) -> dict[str, str | None]:
    """The settings to store (None: remove), validated."""
    violations = _Violations()
    values: dict[str, str | None] = {}
    if request.reset:
        values.update(dict.fromkeys((SETTING_MODE, SETTING_ALPHA, SETTING_FUSION, SETTING_TOP_K)))
    if request.HasField("default_mode"):
        if request.default_mode not in _MODES:
            violations.add("default_mode", f"unknown search mode {request.default_mode}")
        mode = _MODES.get(request.default_mode)
        values[SETTING_MODE] = mode.value if mode else None
    if request.HasField("default_alpha"):
        alpha = request.default_alpha
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            violations.add("default_alpha", f"must be between 0 and 1, got {alpha}")
        values[SETTING_ALPHA] = repr(alpha)
    if request.HasField("default_fusion"):
        if request.default_fusion not in _FUSIONS:
            violations.add("default_fusion", f"unknown fusion method {request.default_fusion}")
        fusion = _FUSIONS.get(request.default_fusion)
        values[SETTING_FUSION] = fusion.value if fusion else None
    if request.HasField("default_top_k"):
        if not 0 <= request.default_top_k <= MAX_TOP_K:
            violations.add("default_top_k", f"must be between 1 and {MAX_TOP_K} (0 for the server's default),"
                           f" got {request.default_top_k}")
        values[SETTING_TOP_K] = str(request.default_top_k) if request.default_top_k else None
    violations.raise_if_any()
    return values


def _settings_to_proto(defaults: TenantDefaults) -> pb.SearchSettings:
    settings = pb.SearchSettings(
        default_mode=_MODES_OUT[defaults.mode] if defaults.mode else pb.SEARCH_MODE_UNSPECIFIED,
        default_fusion=_FUSIONS_OUT[defaults.fusion] if defaults.fusion else pb.FUSION_METHOD_UNSPECIFIED,
        default_top_k=defaults.top_k or 0)
    if defaults.alpha is not None:
        settings.default_alpha = defaults.alpha
    return settings


def delete_ids_from_proto(document_ids: Sequence[str]) -> list[str]:
    violations = _Violations()
    if not document_ids:
        violations.add("document_ids", "must name at least one document")
    elif len(document_ids) > MAX_DELETE_IDS:
        violations.add("document_ids", f"at most {MAX_DELETE_IDS:,} ids per call, got {len(document_ids):,}")
    else:
        for index, doc_id in enumerate(document_ids):
            _check_document_id(violations, f"document_ids[{index}]", doc_id)
    violations.raise_if_any()
    return list(document_ids)


def result_to_proto(result: IngestResult) -> pb.DocumentResult:
    return pb.DocumentResult(document_id=result.document_id, status=_STATUS_OUT[result.status],
                             chunks=result.chunks, content_hash=result.content_hash)


def hit_to_proto(hit: Hit) -> pb.SearchHit:
    location = None
    if hit.location is not None:
        location = pb.ChunkLocation(start=hit.location.start, end=hit.location.end,
                                    edits=[pb.TextEdit(at=e.at, length=e.length, original=e.original)
                                           for e in hit.location.edits])
    return pb.SearchHit(document_id=hit.document_id, chunk_id=hit.chunk_id, title=hit.title,
                        section=section_below_title(hit.title, hit.section), text=hit.text, score=hit.score,
                        source=hit.source, metadata=dict(hit.metadata), access=list(hit.access), location=location)


def _results(results: Iterable[IngestResult]) -> list[pb.DocumentResult]:
    return [result_to_proto(result) for result in results]


def _audit_ingested(audit: AuditTrail | None, results: Sequence[IngestResult]) -> Awaitable[bool] | None:
    if audit is None:
        return None
    return audit.record(audit_pb2.AUDIT_EVENT_KIND_DOCUMENTS_INGESTED, documents=audit_pb2.DocumentsAudit(documents=[
        audit_pb2.AuditedDocument(document_id=r.document_id, content_hash=r.content_hash, status=r.status.value,
                                  chunks=r.chunks) for r in results]))


class RetrievalServiceServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, engine: RetrievalEngine, audit: AuditTrail | None = None,
                 registry: TenantRegistry | None = None) -> None:
        self._engine = engine
        # Ingests, deletes and search-setting changes, recorded off the request path.
        self._audit = audit
        # Writes (and their audit events) only for tenants metering's registry knows; checked
        # before the role, so not even a refusal is recorded for a tenant that does not exist.
        self._registry = registry

    async def _require_tenant(self) -> str:
        tenant = tenant_id()
        if self._registry is not None:
            exists = await self._engine.exists(tenant)
            # A store that cannot tell: trust what this process remembers unless other
            # replicas may have erased the tenant meanwhile.
            await self._registry.require(tenant, remembered_ok=exists if exists is not None
                                         else not self._engine.shared)
        return tenant

    async def IngestDocuments(
        self, request: pb.IngestDocumentsRequest,
        context: ServicerContext[pb.IngestDocumentsRequest, pb.IngestDocumentsResponse],
    ) -> pb.IngestDocumentsResponse:
        tenant = await self._require_tenant()
        require_role(ADMIN, INGEST)
        documents = documents_from_proto(request.documents)
        results = await self._engine.ingest(tenant, documents)
        if (audited := _audit_ingested(self._audit, results)) is not None:
            await audited  # an OK only once the audit event is durable (not stored: that comes later)
        return pb.IngestDocumentsResponse(results=_results(results))

    async def StreamIngestDocuments(
        self, request_iterator: AsyncIterator[pb.StreamIngestDocumentsRequest],
        context: ServicerContext[pb.StreamIngestDocumentsRequest, pb.StreamIngestDocumentsResponse],
    ) -> AsyncIterator[pb.StreamIngestDocumentsResponse]:
        # Checked before reading anything, so a caller without the role uploads nothing.
        tenant = await self._require_tenant()
        require_role(ADMIN, INGEST)
        done = 0
        batch = 0
        audited: list[Awaitable[bool]] = []
        async for request in request_iterator:
            documents = documents_from_proto(request.documents, suffix=f" (stream batch {batch})")
            results = await self._engine.ingest(tenant, documents)
            if (pending := _audit_ingested(self._audit, results)) is not None:
                audited.append(pending)
            done += len(results)
            batch += 1
            yield pb.StreamIngestDocumentsResponse(results=_results(results), documents_done=done)
        # The batches' answers are not held up; the OK status waits until their events are durable.
        await asyncio.gather(*audited)

    async def Search(self, request: pb.SearchRequest,
                     context: ServicerContext[pb.SearchRequest, pb.SearchResponse]) -> pb.SearchResponse:
        caller = current()
        query = search_query_from_proto(request)
        result = await self._engine.search(caller.tenant_id, query, Reader(caller.subject, caller.groups))
        if is_internal(context.invocation_metadata()):
            context.set_trailing_metadata(((WITHHELD_TRAILER, str(result.withheld)),))
        return search_response(result)

    async def SetDocumentAccess(
        self, request: pb.SetDocumentAccessRequest,
        context: ServicerContext[pb.SetDocumentAccessRequest, pb.SetDocumentAccessResponse],
    ) -> pb.SetDocumentAccessResponse:
        tenant = await self._require_tenant()
        require_role(ADMIN)
        changes = access_changes_from_proto(request.documents)
        result = await self._engine.set_access(tenant, changes)
        if self._audit is not None and result.updated:
            # The trail's documents record with status "access_changed": which documents were
            # relabelled, by whom (the labels themselves are the store's state, not history).
            await self._audit.record(audit_pb2.AUDIT_EVENT_KIND_DOCUMENTS_INGESTED, documents=audit_pb2.DocumentsAudit(
                documents=[audit_pb2.AuditedDocument(document_id=d, status="access_changed")
                           for d in result.updated]))
        return pb.SetDocumentAccessResponse(updated=len(result.updated), unchanged=len(result.unchanged),
                                            not_found=list(result.not_found))

    async def DeleteDocuments(
        self, request: pb.DeleteDocumentsRequest,
        context: ServicerContext[pb.DeleteDocumentsRequest, pb.DeleteDocumentsResponse],
    ) -> pb.DeleteDocumentsResponse:
        tenant = await self._require_tenant()
        require_role(ADMIN, INGEST)
        document_ids = delete_ids_from_proto(request.document_ids)
        # Read before deleting so the trail says which content was removed, not only its id.
        versions = (await self._engine.store.indexed_versions(tenant, document_ids)
                    if self._audit is not None else {})
        result = await self._engine.delete(tenant, document_ids)
        if self._audit is not None:
            missing = set(result.not_found)
            await self._audit.record(audit_pb2.AUDIT_EVENT_KIND_DOCUMENTS_DELETED, documents=audit_pb2.DocumentsAudit(
                documents=[audit_pb2.AuditedDocument(
                    document_id=d, status="deleted",
                    content_hash=versions[d].content_hash if d in versions else "")
                    for d in dict.fromkeys(document_ids) if d not in missing],
                not_found=list(result.not_found)))
        return pb.DeleteDocumentsResponse(deleted_documents=result.deleted_documents,
                                          deleted_chunks=result.deleted_chunks,
                                          not_found=list(result.not_found))

    async def ProvisionTenant(
        self, request: pb.ProvisionTenantRequest,
        context: ServicerContext[pb.ProvisionTenantRequest, pb.ProvisionTenantResponse],
    ) -> pb.ProvisionTenantResponse:
        require_role(SERVICE)
        await self._engine.provision(tenant_id())
        if self._registry is not None:
            self._registry.provisioned(tenant_id())
        return pb.ProvisionTenantResponse()

    async def EraseTenant(
        self, request: pb.EraseTenantRequest,
        context: ServicerContext[pb.EraseTenantRequest, pb.EraseTenantResponse],
    ) -> pb.EraseTenantResponse:
        require_role(SERVICE)
        await self._engine.erase(tenant_id())
        if self._registry is not None:
            self._registry.forget(tenant_id())
        return pb.EraseTenantResponse()

    async def ConfigureSearch(
        self, request: pb.ConfigureSearchRequest,
        context: ServicerContext[pb.ConfigureSearchRequest, pb.ConfigureSearchResponse],
    ) -> pb.ConfigureSearchResponse:
        tenant = tenant_id()
        values = settings_from_proto(request)
        if values:
            await self._require_tenant()
            require_role(ADMIN)
            before = await self._engine.defaults(tenant) if self._audit is not None else None
            defaults = await self._engine.configure(tenant, values)
            if self._audit is not None and before is not None:
                change = audit_pb2.SearchConfigAudit(before=_settings_to_proto(before),
                                                     after=_settings_to_proto(defaults))
                await self._audit.record(audit_pb2.AUDIT_EVENT_KIND_SEARCH_CONFIGURED, search_config=change)
        else:
            defaults = await self._engine.defaults(tenant)
        mode, alpha, fusion, top_k = self._engine.effective(defaults)
        effective = TenantDefaults(mode=mode, alpha=alpha, fusion=fusion, top_k=top_k)
        return pb.ConfigureSearchResponse(settings=_settings_to_proto(defaults),
                                          effective=_settings_to_proto(effective),
                                          dense_available=self._engine.embedder is not None
                                          and self._engine.embedder.ready())
