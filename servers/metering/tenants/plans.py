"""Plans a tenant can be on, and the limits and configuration each one starts with.

A tenant's own limits and config are copied from its plan at creation (and its limits
again whenever the plan changes), then may be narrowed or tuned per tenant, so changing
a plan's defaults here never silently changes an existing tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class Plan(StrEnum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class RetrievalMode(StrEnum):
    BASIC = "basic"
    HYBRID = "hybrid"
    DECOMPOSED = "decomposed"
    AGENTIC = "agentic"


# Providers the generation service knows; "extractive" needs no model server or key.
PROVIDERS = frozenset({"extractive", "openai", "anthropic"})


@dataclass(frozen=True)
class Limits:
    requests_per_second: int
    requests_per_minute: int
    requests_per_hour: int
    tokens_per_month: int
    max_documents: int


@dataclass(frozen=True)
class TenantConfig:
    provider: str
    model: str
    temperature: float
    max_tokens: int
    system_prompt: str
    retrieval_mode: RetrievalMode
    top_k: int
    pii_masking: bool
    agentic_tools: bool
    # What an answer does with a sentence its citations do not support: flag it (in the
    # answer's details), remove it, or refuse the answer (docs/groundedness.md). Flag by
    # default: nothing is withheld from a tenant that did not ask for it.
    unsupported_sentences: str = "flag"


# The values of TenantConfig.unsupported_sentences.
UNSUPPORTED_SENTENCES = ("flag", "remove", "refuse")


@dataclass(frozen=True)
class PlanDefaults:
    plan: Plan
    limits: Limits
    config: TenantConfig


DEFAULT_SYSTEM_PROMPT = (
    "You are a compliance assistant. Answer only from the provided passages of the company's "
    "regulatory and policy documents, cite every claim with its passage number, and say plainly "
    "when the passages do not answer the question."
)

_BASE_CONFIG = TenantConfig(
    provider="extractive",
    model="extractive-v1",
    temperature=0.0,
    max_tokens=512,
    system_prompt=DEFAULT_SYSTEM_PROMPT,
    retrieval_mode=RetrievalMode.BASIC,
    top_k=5,
    pii_masking=True,
    agentic_tools=False,
)

PLANS: dict[Plan, PlanDefaults] = {
    # Small on purpose: tests and demos can exceed every free limit in seconds.
    Plan.FREE: PlanDefaults(
        plan=Plan.FREE,
        limits=Limits(requests_per_second=5, requests_per_minute=100, requests_per_hour=1_000,
                      tokens_per_month=200_000, max_documents=100),
        config=_BASE_CONFIG,
    ),
    Plan.PRO: PlanDefaults(
        plan=Plan.PRO,
        limits=Limits(requests_per_second=50, requests_per_minute=2_000, requests_per_hour=50_000,
                      tokens_per_month=20_000_000, max_documents=10_000),
        config=replace(_BASE_CONFIG, max_tokens=1024, top_k=8, retrieval_mode=RetrievalMode.HYBRID),
    ),
    Plan.ENTERPRISE: PlanDefaults(
        plan=Plan.ENTERPRISE,
        limits=Limits(requests_per_second=500, requests_per_minute=20_000, requests_per_hour=1_000_000,
                      tokens_per_month=1_000_000_000, max_documents=1_000_000),
        # Agentic retrieval needs a tool-calling model; with the extractive provider the
        # generation service would only ever degrade, so the plan starts on hybrid.
        config=replace(_BASE_CONFIG, max_tokens=2048, top_k=10, retrieval_mode=RetrievalMode.HYBRID),
    ),
}


def defaults(plan: Plan) -> PlanDefaults:
    return PLANS[plan]
