"""The answer pipeline: tenant config → quota → retrieval → provider → citations → usage.

One async generator serves both the unary and the streaming RPC: it yields text deltas
and, last, the answer's details.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import timestamp_pb2

from copilot.v1 import common_pb2, metering_pb2, metering_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from servers.common import identity
from servers.common.errors import QuotaViolation, ResourceExhausted
from servers.common.interceptors import detached_deadline
from servers.generation.providers import Generation, Passage, Prompt, Provider
from servers.generation.tenant_config import TenantConfigCache

log = logging.getLogger("copilot.generation")

USAGE_ATTEMPTS = 4
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Modes this build runs; the others degrade to basic and say so.
AVAILABLE_MODES = frozenset({common_pb2.RETRIEVAL_MODE_BASIC})


@dataclass(frozen=True)
class Question:
    text: str
    top_k: int
    mode: int
    filters: Mapping[str, str]
    request_id: str


@dataclass(frozen=True)
class CitedPassage:
    index: int
    passage: Passage
    quote: str


@dataclass
class AnswerDetails:
    request_id: str
    citations: list[CitedPassage] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = True
    latency_s: float = 0.0
    mode_used: int = common_pb2.RETRIEVAL_MODE_BASIC
    degraded: bool = False
    degraded_reason: str = ""
    provider: str = ""
    model: str = ""


class Pipeline:
    def __init__(self, retrieval: retrieval_pb2_grpc.RetrievalServiceAsyncStub,
                 metering: metering_pb2_grpc.MeteringServiceAsyncStub, configs: TenantConfigCache,
                 providers: Mapping[str, Provider]) -> None:
        self._retrieval = retrieval
        self._metering = metering
        self._configs = configs
        self._providers = providers

    async def run(self, question: Question) -> AsyncIterator[str | AnswerDetails]:
        started = time.perf_counter()
        config = await self._configs.get()
        request_id = question.request_id or uuid.uuid4().hex
        details = AnswerDetails(request_id=request_id)
        await self._check_quota(config.max_tokens)
        # The billing key is ours, one per run: a client reusing its request id gets (and pays
        # for) every answer it is given.
        event_id = f"answer:{uuid.uuid4().hex}"

        wanted = question.mode or config.retrieval_mode
        details.mode_used = wanted if wanted in AVAILABLE_MODES else common_pb2.RETRIEVAL_MODE_BASIC
        if details.mode_used != wanted:
            details.degraded = True
            details.degraded_reason = (
                f"retrieval mode {common_pb2.RetrievalMode.Name(wanted)} is not available; ran basic retrieval"
            )
        passages = await self._search(question, question.top_k or config.top_k)

        provider = self._providers.get(config.provider)
        if provider is None:
            provider = self._providers["extractive"]
            details.degraded = True
            details.degraded_reason = "; ".join(filter(None, [
                details.degraded_reason, f"provider {config.provider!r} is not configured; answered extractively"]))
        details.provider, details.model = provider.name, provider.model
        prompt = Prompt(system_prompt=config.system_prompt, question=question.text, passages=passages,
                        max_tokens=config.max_tokens, temperature=config.temperature)
        result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=True)
        try:
            async for delta in provider.stream(prompt, result):
                yield delta
        finally:
            # Recorded even when the caller goes away mid-stream: what was generated is billed.
            details.input_tokens, details.output_tokens = result.input_tokens, result.output_tokens
            details.estimated = result.estimated
            await asyncio.shield(self._record_usage(details, event_id))
        details.citations = [
            CitedPassage(index=i, passage=passages[q.passage], quote=q.text)
            for i, q in enumerate(result.quotes, start=1)
        ]
        details.latency_s = time.perf_counter() - started
        yield details

    async def _check_quota(self, estimated_tokens: int) -> None:
        response = await self._metering.CheckQuota(
            metering_pb2.CheckQuotaRequest(estimated_tokens=estimated_tokens), timeout=2)
        if response.allowed:
            return
        # A token quota can refuse before it is used up: the estimate would cross it.
        exhausted = [q for q in response.quotas if q.limit and (
            q.used >= q.limit or (q.name == "tokens_per_month" and q.used + estimated_tokens > q.limit))]
        raise ResourceExhausted(
            "quota exhausted: " + ", ".join(f"{q.name} {q.used}/{q.limit}" for q in exhausted),
            [QuotaViolation(subject=f"tenant:{identity.tenant_id()}:{q.name}",
                            description=f"{q.used} of {q.limit} used") for q in exhausted],
            retry_after_s=response.retry_after.seconds + response.retry_after.nanos / 1e9,
        )

    async def _search(self, question: Question, top_k: int) -> list[Passage]:
        response = await self._retrieval.Search(retrieval_pb2.SearchRequest(
            query=question.text, top_k=top_k, filters=dict(question.filters)), timeout=5)
        return [Passage(document_id=h.document_id, chunk_id=h.chunk_id, title=h.title, section=h.section,
                        text=h.text, score=h.score, source=h.source) for h in response.hits]

    async def _record_usage(self, details: AnswerDetails, event_id: str) -> None:
        caller = identity.current()
        event = metering_pb2.UsageEvent(
            event_id=event_id, kind=metering_pb2.USAGE_KIND_QUERY,
            model=details.model, requests=1, input_tokens=details.input_tokens,
            output_tokens=details.output_tokens, occur_time=timestamp_pb2.Timestamp(seconds=int(time.time())),
            attributes={"user": caller.subject, "provider": details.provider},
        )
        # Usage is written by the platform for the caller's tenant: end users hold no write role.
        writer = identity.Identity(tenant_id=caller.tenant_id, subject="service:generation",
                                   roles=frozenset({identity.SERVICE}))
        request = metering_pb2.RecordUsageRequest(events=[event])
        # Not bounded by the caller's deadline: the answer was given, so its usage must be
        # written even when the caller's time ran out. Retries reuse the event id.
        with identity.acting_as(writer), detached_deadline():
            for attempt in range(USAGE_ATTEMPTS):
                try:
                    await self._metering.RecordUsage(request, timeout=5)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE or attempt == USAGE_ATTEMPTS - 1:
                        # Issue 4 adds a durable outbox replayed with the same event id.
                        log.error("usage not recorded", extra={"event_id": event_id, "code": exc.code().name})
                        return
                await asyncio.sleep(0.1 * 2**attempt)
