"""The answer pipeline: tenant config → quota → PII masking → retrieval in the tenant's mode →
provider (with circuit breakers and graceful degradation) → citations → usage (outbox).

One async generator serves both the unary and the streaming RPC: it yields text deltas
and, last, the answer's details.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from opentelemetry import trace

from servers.common import identity
from servers.generation import decompose, pii
from servers.generation.clients import MeteringClient, QuestionAuditor, RetrievalClient, UsageRecorder
from servers.generation.grounding import CitedPassage, Grounding, UnsupportedPolicy, apply_policy, ground
from servers.generation.llm import ProviderFailure, SearchFn, provider_call
from servers.generation.models import (
    AnsweredQuestion,
    AuditCitation,
    QuotaDecision,
    RetrievalMode,
    SearchMode,
    TenantConfig,
    Usage,
    allowed_modes,
)
from servers.generation.providers import Generation, Passage, Prompt, Provider
from servers.generation.resilience import Breakers
from servers.generation.tenant_config import TenantConfigCache

log = logging.getLogger("copilot.generation")

AGENTIC_MAX_STEPS = 3


@runtime_checkable
class Agentic(Protocol):
    name: str

    async def gather(self, prompt: Prompt, search: SearchFn, max_steps: int, result: Generation) -> list[str]: ...


@dataclass(frozen=True)
class Question:
    text: str
    top_k: int
    # None: the tenant's own mode.
    mode: RetrievalMode | None
    filters: Mapping[str, str]
    request_id: str
    # The edge's id of this client call (Envoy's x-request-id, never a client's): every
    # attempt of one call (a retry after a replica died) is admitted and billed once.
    call_id: str = ""


@dataclass
class AnswerDetails:
    request_id: str
    citations: list[CitedPassage] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = True
    latency_s: float = 0.0
    mode_used: RetrievalMode = RetrievalMode.BASIC
    degraded: bool = False
    degraded_reason: str = ""
    provider: str = ""
    model: str = ""
    pii_masks: list[pii.Mask] = field(default_factory=list)
    sub_questions: list[str] = field(default_factory=list)
    usage_pending: bool = False
    retrieval_s: float = 0.0
    provider_s: float = 0.0
    # Documents the asker may not read that retrieval withheld, summed over the answer's
    # searches (the audit's count; never shown to the asker).
    withheld_documents: int = 0
    # The citations' spans and every sentence's verdict (grounding.py).
    grounding: Grounding = field(default_factory=Grounding)

    def degrade(self, reason: str) -> None:
        self.degraded = True
        self.degraded_reason = "; ".join(filter(None, [self.degraded_reason, reason]))


class Pipeline:
    """Everything it talks to is built first and handed in; `audit` is None only where the
    audit trail is off (the benchmark's comparison)."""

    def __init__(self, retrieval: RetrievalClient, metering: MeteringClient, usage: UsageRecorder,
                 configs: TenantConfigCache, providers: Mapping[str, Provider], breakers: Breakers | None = None,
                 audit: QuestionAuditor | None = None) -> None:
        self._retrieval = retrieval
        self._metering = metering
        self._usage = usage
        self._configs = configs
        self._providers = providers
        self._breakers = breakers or Breakers()
        self._audit = audit
        for name in providers:
            if name != "extractive":
                self._breakers.track(name)

    async def run(self, question: Question) -> AsyncIterator[str | AnswerDetails]:
        started = time.perf_counter()
        # Read once: the caller is handed on explicitly from here (its usage is written for it
        # after the answer, and by the outbox after a restart, outside this call's context).
        caller = identity.current()
        tenant = caller.tenant_id
        config = await self._configs.get()
        request_id = question.request_id or uuid.uuid4().hex
        details = AnswerDetails(request_id=request_id)
        # Quota first: nothing reaches a provider before it allows the answer. Retrieval that
        # needs no model overlaps with the check; agentic retrieval and LLM decomposition call
        # the model, so they wait for it.
        # The billing key is ours: the edge's id of this client call when there is one (its
        # retries are billed once), else one per run. Never the client's request id: a client
        # reusing it gets (and pays for) every answer it is given.
        event_id = f"answer:{question.call_id or uuid.uuid4().hex}"
        # Admission holds the answer's token bound until its usage settles it; an answer that
        # ends before recording usage (refused, failed, cancelled) releases it.
        admission = _Admission(event_id, asyncio.ensure_future(self._metering.reserve(event_id, config.max_tokens)))
        try:
            async for item in self._answer(question, caller, config, details, admission, started):
                yield item
        finally:
            if not admission.settling:
                await asyncio.shield(self._release(tenant, admission))

    async def _release(self, tenant: str, admission: _Admission) -> None:
        if not admission.reserve.done():
            admission.reserve.cancel()
        elif not admission.reserve.cancelled() and admission.reserve.exception() is not None:
            return  # refused or failed: nothing is held
        await self._metering.release(tenant, admission.reservation_id)

    async def _answer(self, question: Question, caller: identity.Identity, config: TenantConfig,
                      details: AnswerDetails, admission: _Admission,
                      started: float) -> AsyncIterator[str | AnswerDetails]:
        tenant, event_id, quota = caller.tenant_id, admission.reservation_id, admission.reserve
        if config.provider != "extractive" and (question.mode or config.retrieval_mode) in (
                RetrievalMode.AGENTIC, RetrievalMode.DECOMPOSED):
            await quota

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
        # A tenant that removes unsupported sentences or refuses such answers is sent the
        # answer only once it has been checked; every other answer streams as it comes.
        hold = config.unsupported_sentences is not UnsupportedPolicy.FLAG
        parts: list[str] = []
        t0 = time.perf_counter()
        try:
            try:
                with provider_call(provider.name, "stream", prompt.model or provider.model):
                    async for delta in provider.stream(prompt, result):
                        emitted = True
                        parts.append(delta)
                        if not hold:
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
                            parts.append(delta)
                            if not hold:
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
            # The usage settles the admission's hold (metering swaps one for the other).
            admission.settling = True
            details.usage_pending = not await asyncio.shield(self._usage.record(Usage(
                event_id=event_id, tenant_id=tenant, user=caller.subject, provider=details.provider,
                model=details.model, input_tokens=details.input_tokens, output_tokens=details.output_tokens,
                occurred_at_s=int(time.time()), reservation_id=admission.reservation_id)))
            if not finished and self._audit is not None:
                # The caller went away (or the provider broke) mid-answer: the question was still
                # asked and partly answered, so it is audited, with the digest of what was sent.
                details.degrade("the answer did not complete")
                details.latency_s = time.perf_counter() - started
                self._audit_question(question.text, details, digest.hexdigest())
        answer = "".join(parts)
        details.citations, details.grounding = ground(answer, result.quotes, passages, origin=result.quotes_origin)
        if hold:
            answer = apply_policy(answer, details.grounding, config.unsupported_sentences)
            digest.update(answer.encode())
            if answer:
                yield answer
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
        return self._audit.record(AnsweredQuestion(
            request_id=details.request_id, question=masked_question, answer_sha256=answer_sha256,
            mode_used=details.mode_used,
            citations=[AuditCitation(document_id=c.passage.document_id, chunk_id=c.passage.chunk_id)
                       for c in details.citations],
            provider=details.provider, model=details.model, degraded=details.degraded,
            degraded_reason=details.degraded_reason, latency_s=details.latency_s,
            pii_placeholders=[m.placeholder for m in details.pii_masks], input_tokens=details.input_tokens,
            output_tokens=details.output_tokens, withheld_documents=details.withheld_documents))

    # --- retrieval modes -----------------------------------------------------------------

    async def _retrieve(self, question: Question, config: TenantConfig, top_k: int, provider: Provider,
                        prompt: Prompt, result: Generation, details: AnswerDetails) -> list[Passage]:
        wanted = question.mode or config.retrieval_mode
        if wanted not in allowed_modes(config):
            details.degrade(f"retrieval mode {wanted} is not in the tenant's plan; ran {config.retrieval_mode}")
            wanted = config.retrieval_mode
        if wanted == RetrievalMode.AGENTIC:
            reason = None
            if not config.agentic_tools:
                reason = "agentic tools are off for this tenant"
            elif not isinstance(provider, Agentic):
                reason = f"provider {provider.name} has no tool calling"
            else:
                try:
                    return await self._agentic(question, top_k, provider, prompt, result, details)
                except ProviderFailure as exc:
                    self._breakers.record(provider.name, identity.tenant_id(), ok=False)
                    reason = exc.reason
            details.degrade(f"agentic retrieval unavailable ({reason}); ran hybrid")
            wanted = RetrievalMode.HYBRID
        if wanted == RetrievalMode.DECOMPOSED:
            subs = await self._sub_questions(question, provider, prompt, result, details)
            details.sub_questions = subs
            results = await asyncio.gather(*(self._search(
                replace(question, text=s), top_k, SearchMode.HYBRID, details, sets_mode=False) for s in subs))
            details.mode_used = RetrievalMode.DECOMPOSED
            return decompose.fuse(results, top_k)
        if wanted == RetrievalMode.HYBRID:
            passages = await self._search(question, top_k, SearchMode.HYBRID, details)
            return passages
        details.mode_used = RetrievalMode.BASIC
        # Basic is one lexical search: no query embedding on the answer path.
        return await self._search(question, top_k, SearchMode.BM25, details)

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
                                      SearchMode.HYBRID, details, sets_mode=False)
            found.append(hits)
            return hits

        t0 = time.perf_counter()
        with provider_call(provider.name, "tools", prompt.model or getattr(provider, "model", "")):
            queries = await provider.gather(prompt, search, AGENTIC_MAX_STEPS, result)
        details.provider_s += time.perf_counter() - t0
        if not found:  # the model answered without searching: ground it anyway
            found.append(await search(question.text))
        details.sub_questions = queries
        details.mode_used = RetrievalMode.AGENTIC
        return decompose.fuse(found, top_k)

    async def _search(self, question: Question, top_k: int, mode: SearchMode,
                      details: AnswerDetails, *, sets_mode: bool = True) -> list[Passage]:
        """One search as the asker (its identity, groups included, goes with the call, so
        retrieval returns only what the asker may read); `sets_mode`: this search decides
        which mode the answer reports."""
        found = await self._retrieval.search(question.text, top_k, question.filters, mode)
        details.withheld_documents += found.withheld
        if sets_mode and mode == SearchMode.HYBRID:
            if found.mode is not None and found.mode != SearchMode.HYBRID:
                details.mode_used = RetrievalMode.BASIC
                details.degrade(f"hybrid search unavailable (retrieval ran {found.mode}); ran basic")
            elif found.mode == SearchMode.HYBRID:
                details.mode_used = RetrievalMode.HYBRID
            else:
                details.mode_used = RetrievalMode.BASIC
                details.degrade("hybrid search unavailable; ran basic")
        return found.passages


@dataclass
class _Admission:
    """One answer's quota reservation: its id (also the usage event's) and the reserve call."""

    reservation_id: str
    reserve: asyncio.Future[QuotaDecision]
    # Set once the answer's usage, which settles the hold, is handed to the recorder.
    settling: bool = False
