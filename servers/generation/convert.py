"""Protobuf enum numbers ↔ the generation service's domain enums, for the modules at its
edges only: the gRPC layer (service.py), the clients (clients.py) and the tenant watch
(tenant_config.py)."""

from __future__ import annotations

from copilot.v1 import common_pb2, generation_pb2, retrieval_pb2, tenant_pb2
from servers.common.text import Location, TextEdit
from servers.generation.grounding import UnsupportedPolicy
from servers.generation.models import Plan, RetrievalMode, SearchMode
from servers.generation.providers import SpanOrigin

_MODES: dict[RetrievalMode, common_pb2.RetrievalMode] = {
    RetrievalMode.BASIC: common_pb2.RETRIEVAL_MODE_BASIC,
    RetrievalMode.HYBRID: common_pb2.RETRIEVAL_MODE_HYBRID,
    RetrievalMode.DECOMPOSED: common_pb2.RETRIEVAL_MODE_DECOMPOSED,
    RetrievalMode.AGENTIC: common_pb2.RETRIEVAL_MODE_AGENTIC,
}
_MODES_IN: dict[int, RetrievalMode] = {number: mode for mode, number in _MODES.items()}

_PLANS_IN: dict[int, Plan] = {
    common_pb2.PLAN_FREE: Plan.FREE,
    common_pb2.PLAN_PRO: Plan.PRO,
    common_pb2.PLAN_ENTERPRISE: Plan.ENTERPRISE,
}

_SEARCH: dict[SearchMode, retrieval_pb2.SearchMode] = {
    SearchMode.BM25: retrieval_pb2.SEARCH_MODE_BM25,
    SearchMode.DENSE: retrieval_pb2.SEARCH_MODE_DENSE,
    SearchMode.HYBRID: retrieval_pb2.SEARCH_MODE_HYBRID,
}
_SEARCH_IN: dict[int, SearchMode] = {number: mode for mode, number in _SEARCH.items()}


def mode_from_proto(number: int) -> RetrievalMode | None:
    """None for RETRIEVAL_MODE_UNSPECIFIED (and a number this build does not know)."""
    return _MODES_IN.get(number)


def mode_to_proto(mode: RetrievalMode) -> common_pb2.RetrievalMode:
    return _MODES[mode]


def plan_from_proto(number: int) -> Plan | None:
    """None for PLAN_UNSPECIFIED (and a number this build does not know)."""
    return _PLANS_IN.get(number)


def search_mode_to_proto(mode: SearchMode) -> retrieval_pb2.SearchMode:
    return _SEARCH[mode]


def search_mode_from_proto(number: int) -> SearchMode | None:
    """None for SEARCH_MODE_UNSPECIFIED."""
    return _SEARCH_IN.get(number)


_POLICIES: dict[UnsupportedPolicy, tenant_pb2.UnsupportedSentences] = {
    UnsupportedPolicy.FLAG: tenant_pb2.UNSUPPORTED_SENTENCES_FLAG,
    UnsupportedPolicy.REMOVE: tenant_pb2.UNSUPPORTED_SENTENCES_REMOVE,
    UnsupportedPolicy.REFUSE: tenant_pb2.UNSUPPORTED_SENTENCES_REFUSE,
}
_POLICIES_IN: dict[int, UnsupportedPolicy] = {number: policy for policy, number in _POLICIES.items()}

_ORIGINS: dict[SpanOrigin, generation_pb2.SpanOrigin] = {
    SpanOrigin.EXTRACTED: generation_pb2.SPAN_ORIGIN_EXTRACTED,
    SpanOrigin.QUOTED: generation_pb2.SPAN_ORIGIN_QUOTED,
    SpanOrigin.INFERRED: generation_pb2.SPAN_ORIGIN_INFERRED,
}


def policy_from_proto(number: int) -> UnsupportedPolicy:
    """FLAG for UNSUPPORTED_SENTENCES_UNSPECIFIED (and a number this build does not know)."""
    return _POLICIES_IN.get(number, UnsupportedPolicy.FLAG)


def policy_to_proto(policy: UnsupportedPolicy) -> tenant_pb2.UnsupportedSentences:
    return _POLICIES[policy]


def origin_to_proto(origin: SpanOrigin) -> generation_pb2.SpanOrigin:
    return _ORIGINS[origin]


def location_from_proto(hit: retrieval_pb2.SearchHit) -> Location | None:
    """None for a hit indexed before retrieval kept offsets."""
    if not hit.HasField("location"):
        return None
    loc = hit.location
    return Location(loc.start, loc.end, tuple(TextEdit(e.at, e.length, e.original) for e in loc.edits))
