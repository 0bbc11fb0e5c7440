"""Domain types of the generation service, free of protobuf.

The gRPC layer (service.py), the clients of other services (clients.py) and the tenant watch
(tenant_config.py) convert to and from these (tables in convert.py); the pipeline, the
providers and the rest only ever see them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from servers.generation.grounding import UnsupportedPolicy
from servers.generation.providers import Passage


class RetrievalMode(enum.StrEnum):
    """How an answer finds its passages (a tenant's setting, a request's override)."""

    BASIC = "basic"
    HYBRID = "hybrid"
    DECOMPOSED = "decomposed"
    AGENTIC = "agentic"


class Plan(enum.StrEnum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class SearchMode(enum.StrEnum):
    """One search of the retrieval service: what the pipeline asks for and what ran."""

    BM25 = "bm25"
    DENSE = "dense"
    HYBRID = "hybrid"


@dataclass(frozen=True, slots=True)
class SearchResult:
    passages: list[Passage]
    # None when retrieval did not say which mode ran.
    mode: SearchMode | None
    # Documents the caller may not read that would have ranked among these (for the audit).
    withheld: int = 0


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    name: str
    used: int
    # 0: unlimited.
    limit: int


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    allowed: bool
    quotas: Sequence[QuotaStatus] = ()
    # Allowed on an earlier decision because Metering could not be reached (nothing held).
    stale: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """What one answer is billed: one request and the tokens every provider call reported."""

    event_id: str
    # Explicit, not read from the context: the outbox keeps it with the event and delivers
    # it for this tenant even after a restart, outside any request.
    tenant_id: str
    user: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    occurred_at_s: int
    # The admission this usage settles (its hold is replaced by these counts); "" for none.
    reservation_id: str = ""


@dataclass(frozen=True, slots=True)
class AuditCitation:
    document_id: str
    chunk_id: str


@dataclass(frozen=True, slots=True)
class AnsweredQuestion:
    """The audit trail's record of a question: the masked question and the answer's digest,
    never the answer's text."""

    request_id: str
    question: str
    answer_sha256: str
    mode_used: RetrievalMode
    citations: Sequence[AuditCitation]
    provider: str
    model: str
    degraded: bool
    degraded_reason: str
    latency_s: float
    pii_placeholders: Sequence[str]
    input_tokens: int
    output_tokens: int
    # Summed over the answer's searches (docs/access-control.md).
    withheld_documents: int = 0


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant's answer settings, system defaults filled in (tenant_config.py)."""

    tenant_id: str
    version: int
    suspended: bool
    provider: str
    model: str
    temperature: float
    max_tokens: int
    system_prompt: str
    retrieval_mode: RetrievalMode
    top_k: int
    pii_masking: bool = True
    agentic_tools: bool = False
    plan: Plan = Plan.FREE
    # What an answer does with sentences its citations do not support (docs/groundedness.md).
    unsupported_sentences: UnsupportedPolicy = UnsupportedPolicy.FLAG


# Retrieval modes each plan may ask for per request (and run at all).
PLAN_MODES: dict[Plan, frozenset[RetrievalMode]] = {
    Plan.FREE: frozenset({RetrievalMode.BASIC, RetrievalMode.HYBRID}),
    Plan.PRO: frozenset({RetrievalMode.BASIC, RetrievalMode.HYBRID, RetrievalMode.DECOMPOSED}),
    Plan.ENTERPRISE: frozenset(RetrievalMode),
}


def allowed_modes(config: TenantConfig) -> frozenset[RetrievalMode]:
    """The plan's modes, plus whatever mode the tenant itself was configured with."""
    return PLAN_MODES[config.plan] | {config.retrieval_mode}
