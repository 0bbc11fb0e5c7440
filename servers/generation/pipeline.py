"""The answer pipeline: tenant config → quota → PII masking → retrieval in the tenant's mode →
provider (with circuit breakers and graceful degradation) → citations → usage (outbox).

One async generator serves both the unary and the streaming RPC: it yields text deltas
and, last, the answer's details.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from opentelemetry import trace

from copilot.v1 import audit_pb2, common_pb2, metering_pb2, metering_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from servers.common import identity, telemetry
from servers.common.audit import AuditTrail
from servers.common.errors import QuotaViolation, ResourceExhausted
from servers.common.interceptors import detached_deadline
from servers.common.outbox import Outbox
from servers.generation import decompose, pii
from servers.generation.llm import ProviderFailure, SearchFn, provider_call
from servers.generation.providers import Generation, Passage, Prompt, Provider
from servers.generation.resilience import Breakers
from servers.generation.tenant_config import TenantConfig, TenantConfigCache, allowed_modes

log = logging.getLogger("copilot.generation")

USAGE_ATTEMPTS = 3
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# While Metering is unreachable, a tenant it allowed this recently is still answered (and
# its usage kept in the outbox): a metering restart must not take answers down.
QUOTA_GRACE_S = 120.0
AGENTIC_MAX_STEPS = 3
# A cap; the caller's remaining deadline (forwarded by the client interceptor) is shorter.
SEARCH_TIMEOUT_S = 10.0
MODE_NAMES: dict[int, str] = {common_pb2.RETRIEVAL_MODE_BASIC: "basic", common_pb2.RETRIEVAL_MODE_HYBRID: "hybrid",
              common_pb2.RETRIEVAL_MODE_DECOMPOSED: "decomposed", common_pb2.RETRIEVAL_MODE_AGENTIC: "agentic"}


class Agentic(Protocol):
    name: str

    async def gather(self, prompt: Prompt, search: SearchFn, max_steps: int, result: Generation) -> list[str]: ...


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
    pii_masks: list[pii.Mask] = field(default_factory=list)
    sub_questions: list[str] = field(default_factory=list)
    usage_pending: bool = False
    retrieval_s: float = 0.0
    provider_s: float = 0.0

    def degrade(self, reason: str) -> None:
        self.degraded = True
        self.degraded_reason = "; ".join(filter(None, [self.degraded_reason, reason]))


class Pipeline:
    def __init__(self, retrieval: retrieval_pb2_grpc.RetrievalServiceAsyncStub,
                 metering: metering_pb2_grpc.MeteringServiceAsyncStub, configs: TenantConfigCache,
                 providers: Mapping[str, Provider], outbox: Outbox[metering_pb2.UsageEvent] | None = None,
                 breakers: Breakers | None = None) -> None:
        self._retrieval = retrieval
        self._metering = metering
        self._configs = configs
        self._providers = providers
        self._outbox = outbox
        self._breakers = breakers or Breakers()
        self._last_allowed: dict[str, float] = {}
        self._audit: AuditTrail | None = None
        for name in providers:
            if name != "extractive":
                self._breakers.track(name)

    def attach_outbox(self, outbox: Outbox[metering_pb2.UsageEvent]) -> None:
        self._outbox = outbox

    def attach_audit(self, audit: AuditTrail) -> None:
        self._audit = audit

    async def run(self, question: Question) -> AsyncIterator[str | AnswerDetails]:
        started = time.perf_counter()
        config = await self._configs.get()
        request_id = question.request_id or uuid.uuid4().hex
        details = AnswerDetails(request_id=request_id)
        # Quota first: nothing reaches a provider before it allows the answer. Retrieval that
        # needs no model overlaps with the check; agentic retrieval and LLM decomposition call
        # the model, so they wait for it.
        quota = asyncio.ensure_future(self._check_quota(config.max_tokens))
        if config.provider != "extractive" and (question.mode or config.retrieval_mode) in (
                common_pb2.RETRIEVAL_MODE_AGENTIC, common_pb2.RETRIEVAL_MODE_DECOMPOSED):
            await quota
        # The billing key is ours, one per run: a client reusing its request id gets (and pays
        # for) every answer it is given.
        event_id = f"answer:{uuid.uuid4().hex}"
        tenant = identity.tenant_id()

        # PII never leaves this service: not to retrieval, a provider, logs or traces.
        text = question.text
        if config.pii_masking:
            masked = pii.mask(text)
            text, details.pii_masks = masked.text, masked.masks
        # Traces never carry PII, whatever the tenant chose for its prompts.
        trace.get_current_span().set_attribute("copilot.question", text if config.pii_masking else pii.mask(text).text)
        question = replace(question, text=text)
        top_k = question.top_k or config.top_k

        provider = self._providers.get(config.provider)
        if provider is None:
            provider = self._providers["extractive"]
            details.degrade(f"provider {config.provider!r} is not configured; answered extractively")
        elif provider.name != "extractive" and (why := self._breakers.allow(provider.name, tenant)):
            provider = self._providers["extractive"]
            details.degrade(f"{why}; answered extractively")
        prompt = Prompt(system_prompt=config.system_prompt, question=question.text, passages=[],
                        max_tokens=config.max_tokens, temperature=config.temperature,
                        model=config.model if provider.name == config.provider else "")
        # Every provider call's counts are billed: agentic tool rounds, a failed attempt, the answer.
        spent: list[Generation] = []
        tools = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=False)
        spent.append(tools)
        t0 = time.perf_counter()
        search = asyncio.ensure_future(self._retrieve(question, config, top_k, provider, prompt, tools, details))
        search.add_done_callback(lambda task: setattr(task, "finished_at", time.perf_counter()))
        try:
            await quota
        except BaseException:
            search.cancel()
            raise
        passages = await search
        searched_at = getattr(search, "finished_at", time.perf_counter())
        details.retrieval_s += searched_at - t0 - details.provider_s  # minus agentic model calls
        prompt = replace(prompt, passages=passages)
        result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=True)
        spent.append(result)
        emitted = False
        # The audit trail keeps the answer's digest, not its text.
        digest = hashlib.sha256()
        finished = False
        t0 = time.perf_counter()
        try:
            try:
                with provider_call(provider.name, "stream", prompt.model or provider.model):
                    async for delta in provider.stream(prompt, result):
                        emitted = True
                        digest.update(delta.encode())
                        yield delta
                if provider.name != "extractive":
                    self._breakers.record(provider.name, tenant, ok=True)
            except ProviderFailure as exc:
                self._breakers.record(provider.name, tenant, ok=False)
                log.warning("provider failed", extra={"provider": provider.name, "reason": exc.reason,
                                                      "emitted": emitted})
                if emitted:
                    details.degrade(f"{exc.reason}; the answer was cut short")
                else:
                    details.degrade(f"{exc.reason}; answered extractively")
                    if result.estimated:  # the provider reported nothing: nothing to bill for it
                        spent.remove(result)
                    provider = self._providers["extractive"]
                    prompt = replace(prompt, model="")
                    result = Generation(quotes=[], input_tokens=0, output_tokens=0, estimated=True)
                    spent.append(result)
                    with provider_call(provider.name, "stream", provider.model):
                        async for delta in provider.stream(prompt, result):
                            digest.update(delta.encode())
                            yield delta
            finished = True
        finally:
            details.provider_s += time.perf_counter() - t0
            # Recorded even when the caller goes away mid-stream: what was generated is billed.
            details.provider, details.model = provider.name, prompt.model or provider.model
            details.input_tokens = sum(g.input_tokens for g in spent)
            details.output_tokens = sum(g.output_tokens for g in spent)
            details.estimated = any(g.estimated for g in spent)
            details.usage_pending = not await asyncio.shield(self._record_usage(details, event_id))
            if not finished and self._audit is not None:
                # The caller went away (or the provider broke) mid-answer: the question was still
                # asked and partly answered, so it is audited, with the digest of what was sent.
                details.degrade("the answer did not complete")
                details.latency_s = time.perf_counter() - started
                self._audit_question(question.text, details, digest.hexdigest())
        details.citations = [
            CitedPassage(index=q.number or i, passage=passages[q.passage], quote=q.text)
            for i, q in enumerate(result.quotes, start=1)
        ]
        details.latency_s = time.perf_counter() - started
        audited = self._audit_question(question.text, details, digest.hexdigest()) \
            if self._audit is not None else None
        yield details
        if audited is not None:
            # After the last message, before the call's OK: the answer is never held up, and an
            # OK means its audit event is durable here (the audit store is not waited for).
            await audited

    def _audit_question(self, masked_question: str, details: AnswerDetails, answer_sha256: str) -> Awaitable[bool]:
        """Handed to the audit outbox; the result resolves once the event is durable there."""
        assert self._audit is not None
        latency = duration_pb2.Duration()
        latency.FromNanoseconds(int(details.latency_s * 1e9))
        return self._audit.record(audit_pb2.AUDIT_EVENT_KIND_QUESTION, question=audit_pb2.QuestionAudit(
            question=masked_question, mode_used=details.mode_used, answer_sha256=answer_sha256,  # type: ignore[arg-type]
            citations=[audit_pb2.AuditCitation(document_id=c.passage.document_id, chunk_id=c.passage.chunk_id)
                       for c in details.citations],
            provider=details.provider, model=details.model, degraded=details.degraded,
            degraded_reason=details.degraded_reason, latency=latency, request_id=details.request_id,
            pii_placeholders=[m.placeholder for m in details.pii_masks], input_tokens=details.input_tokens,
            output_tokens=details.output_tokens))

    # --- retrieval modes -----------------------------------------------------------------

    async def _retrieve(self, question: Question, config: TenantConfig, top_k: int, provider: Provider,
                        prompt: Prompt, result: Generation, details: AnswerDetails) -> list[Passage]:
        wanted = question.mode or config.retrieval_mode
        if wanted not in allowed_modes(config):
            details.degrade(f"retrieval mode {MODE_NAMES.get(wanted, wanted)} is not in the tenant's plan; "
                            f"ran {MODE_NAMES.get(config.retrieval_mode)}")
            wanted = config.retrieval_mode
        if wanted == common_pb2.RETRIEVAL_MODE_AGENTIC:
            reason = None
            if not config.agentic_tools:
                reason = "agentic tools are off for this tenant"
            elif not hasattr(provider, "gather"):
                reason = f"provider {provider.name} has no tool calling"
            else:
                try:
                    return await self._agentic(question, top_k, provider, prompt, result, details)  # type: ignore[arg-type]
                except ProviderFailure as exc:
                    self._breakers.record(provider.name, identity.tenant_id(), ok=False)
                    reason = exc.reason
            details.degrade(f"agentic retrieval unavailable ({reason}); ran hybrid")
            wanted = common_pb2.RETRIEVAL_MODE_HYBRID
        if wanted == common_pb2.RETRIEVAL_MODE_DECOMPOSED:
            subs = await self._sub_questions(question, provider, prompt, result, details)
            details.sub_questions = subs
            results = await asyncio.gather(*(self._search(
                replace(question, text=s), top_k, retrieval_pb2.SEARCH_MODE_HYBRID, None) for s in subs))
            details.mode_used = common_pb2.RETRIEVAL_MODE_DECOMPOSED
            return decompose.fuse(results, top_k)
        if wanted == common_pb2.RETRIEVAL_MODE_HYBRID:
            passages = await self._search(question, top_k, retrieval_pb2.SEARCH_MODE_HYBRID, details)
            return passages
        details.mode_used = common_pb2.RETRIEVAL_MODE_BASIC
        # Basic is one lexical search: no query embedding on the answer path.
        return await self._search(question, top_k, retrieval_pb2.SEARCH_MODE_BM25, details)

    async def _sub_questions(self, question: Question, provider: Provider, prompt: Prompt, result: Generation,
                             details: AnswerDetails) -> list[str]:
        """The model decomposes when the tenant has one; the rule-based splitter otherwise
        (and when the model fails)."""
        llm = getattr(provider, "decompose", None)
        if llm is not None:
            t0 = time.perf_counter()
            try:
                with provider_call(provider.name, "decompose", prompt.model or provider.model):
                    subs: list[str] = await llm(prompt, result)
                if subs:
                    return [pii.mask(s).text for s in subs]
            except ProviderFailure as exc:
                self._breakers.record(provider.name, identity.tenant_id(), ok=False)
                details.degrade(f"{exc.reason}; decomposed by rules")
            finally:
                details.provider_s += time.perf_counter() - t0
        return decompose.split(question.text)

    async def _agentic(self, question: Question, top_k: int, provider: Agentic, prompt: Prompt,
                       result: Generation, details: AnswerDetails) -> list[Passage]:
        found: list[list[Passage]] = []

        async def search(query: str) -> list[Passage]:
            hits = await self._search(replace(question, text=pii.mask(query).text), top_k,
                                      retrieval_pb2.SEARCH_MODE_HYBRID, None)
            found.append(hits)
            return hits

        t0 = time.perf_counter()
        with provider_call(provider.name, "tools", prompt.model or getattr(provider, "model", "")):
            queries = await provider.gather(prompt, search, AGENTIC_MAX_STEPS, result)
        details.provider_s += time.perf_counter() - t0
        if not found:  # the model answered without searching: ground it anyway
            found.append(await search(question.text))
        details.sub_questions = queries
        details.mode_used = common_pb2.RETRIEVAL_MODE_AGENTIC
        return decompose.fuse(found, top_k)

    async def _search(self, question: Question, top_k: int, mode: int,
                      details: AnswerDetails | None) -> list[Passage]:
        with telemetry.span("retrieval.search", {"copilot.search_mode": retrieval_pb2.SearchMode.Name(mode)}):
            response = await self._retrieval.Search(retrieval_pb2.SearchRequest(
                query=question.text, top_k=top_k, filters=dict(question.filters), mode=mode),  # type: ignore[arg-type]
                timeout=SEARCH_TIMEOUT_S)
        if details is not None:
            if mode == retrieval_pb2.SEARCH_MODE_HYBRID and response.mode not in (
                    retrieval_pb2.SEARCH_MODE_HYBRID, retrieval_pb2.SEARCH_MODE_UNSPECIFIED):
                details.mode_used = common_pb2.RETRIEVAL_MODE_BASIC
                details.degrade(f"hybrid search unavailable (retrieval ran "
                                f"{retrieval_pb2.SearchMode.Name(response.mode)}); ran basic")
            elif mode == retrieval_pb2.SEARCH_MODE_HYBRID:
                details.mode_used = (common_pb2.RETRIEVAL_MODE_HYBRID
                                     if response.mode == retrieval_pb2.SEARCH_MODE_HYBRID
                                     else common_pb2.RETRIEVAL_MODE_BASIC)
                if response.mode != retrieval_pb2.SEARCH_MODE_HYBRID:
                    details.degrade("hybrid search unavailable; ran basic")
        return [Passage(document_id=h.document_id, chunk_id=h.chunk_id, title=h.title, section=h.section,
                        text=h.text, score=h.score, source=h.source) for h in response.hits]

    # --- quota and usage -----------------------------------------------------------------

    async def _check_quota(self, estimated_tokens: int) -> None:
        with telemetry.span("quota.check", {"copilot.estimated_tokens": estimated_tokens}):
            await self._check_quota_now(estimated_tokens)

    async def _check_quota_now(self, estimated_tokens: int) -> None:
        tenant = identity.tenant_id()
        try:
            response = await self._metering.CheckQuota(
                metering_pb2.CheckQuotaRequest(estimated_tokens=estimated_tokens), timeout=2)
        except grpc.aio.AioRpcError as exc:
            allowed_at = self._last_allowed.get(tenant)
            if exc.code() in RETRYABLE and allowed_at is not None and time.monotonic() - allowed_at < QUOTA_GRACE_S:
                log.warning("metering unreachable; answering on the last quota decision",
                            extra={"code": exc.code().name})
                return
            raise
        if response.allowed:
            self._last_allowed[tenant] = time.monotonic()
            return
        self._last_allowed.pop(tenant, None)
        # A token quota can refuse before it is used up: the estimate would cross it.
        exhausted = [q for q in response.quotas if q.limit and (
            q.used >= q.limit or (q.name == "tokens_per_month" and q.used + estimated_tokens > q.limit))]
        raise ResourceExhausted(
            "quota exhausted: " + ", ".join(f"{q.name} {q.used}/{q.limit}" for q in exhausted),
            [QuotaViolation(subject=f"tenant:{tenant}:{q.name}",
                            description=f"{q.used} of {q.limit} used") for q in exhausted],
            retry_after_s=response.retry_after.seconds + response.retry_after.nanos / 1e9,
        )

    async def deliver(self, tenant_id: str, events: list[metering_pb2.UsageEvent], redelivery: bool = False) -> None:
        """Sends usage events for `tenant_id` (retrying transient failures); raises when
        Metering did not take them. Metering deduplicates every usage event by its id, so
        `redelivery` changes nothing here."""
        # Usage is written by the platform for the caller's tenant: end users hold no write role.
        writer = identity.Identity(tenant_id=tenant_id, subject="service:generation",
                                   roles=frozenset({identity.SERVICE}))
        request = metering_pb2.RecordUsageRequest(events=events)
        # Not bounded by the caller's deadline: the answer was given, so its usage must be
        # written even when the caller's time ran out. Retries reuse the event id.
        with identity.acting_as(writer), detached_deadline():
            for attempt in range(USAGE_ATTEMPTS):
                try:
                    await self._metering.RecordUsage(request, timeout=3)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE or attempt == USAGE_ATTEMPTS - 1:
                        raise
                await asyncio.sleep(0.05 * 2**attempt * random.uniform(0.5, 1.5))

    async def _record_usage(self, details: AnswerDetails, event_id: str) -> bool:
        with telemetry.span("usage.write", {"copilot.usage_event_id": event_id}) as current:
            written = await self._record_usage_now(details, event_id)
            current.set_attribute("copilot.usage_pending", not written)
            return written

    async def _record_usage_now(self, details: AnswerDetails, event_id: str) -> bool:
        caller = identity.current()
        event = metering_pb2.UsageEvent(
            event_id=event_id, kind=metering_pb2.USAGE_KIND_QUERY,
            model=details.model, requests=1, input_tokens=details.input_tokens,
            output_tokens=details.output_tokens, occur_time=timestamp_pb2.Timestamp(seconds=int(time.time())),
            attributes={"user": caller.subject, "provider": details.provider},
        )
        if self._outbox is not None:
            return await self._outbox.record(caller.tenant_id, event)
        try:
            await self.deliver(caller.tenant_id, [event])
            return True
        except grpc.aio.AioRpcError as exc:
            log.error("usage not recorded", extra={"event_id": event_id, "code": exc.code().name})
            return False
