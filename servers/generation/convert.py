"""Protobuf enum numbers ↔ the generation service's domain enums, for the modules at its
edges only: the gRPC layer (service.py), the clients (clients.py) and the tenant watch
(tenant_config.py)."""

from __future__ import annotations

from copilot.v1 import common_pb2, retrieval_pb2
from servers.generation.models import Plan, RetrievalMode, SearchMode

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
