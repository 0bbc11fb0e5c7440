"""Protobuf ↔ domain at the service boundary. Nothing past this module sees a message.

Enum values the domain does not know (UNSPECIFIED, or a number from a newer client)
become None, and the domain's validation reports them as invalid arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from copilot.v1 import common_pb2, metering_pb2, tenant_pb2
from servers.common.errors import InvalidArgument
from servers.metering.tenants.domain import CONFIG_FIELDS, LIMIT_FIELDS, UPDATABLE_PATHS, Tenant, TenantState
from servers.metering.tenants.plans import Plan, RetrievalMode
from servers.metering.usage.domain import UsageEvent, UsageKind, UsageTotals
from servers.metering.usage.ledger import Reservation
from servers.metering.usage.pricing import PriceTable
from servers.metering.usage.quota import QuotaDecision

_PLANS: dict[int, Plan] = {common_pb2.PLAN_FREE: Plan.FREE, common_pb2.PLAN_PRO: Plan.PRO,
          common_pb2.PLAN_ENTERPRISE: Plan.ENTERPRISE}
_STATES = {tenant_pb2.TENANT_STATE_ACTIVE: TenantState.ACTIVE,
           tenant_pb2.TENANT_STATE_SUSPENDED: TenantState.SUSPENDED}
_MODES = {common_pb2.RETRIEVAL_MODE_BASIC: RetrievalMode.BASIC,
          common_pb2.RETRIEVAL_MODE_HYBRID: RetrievalMode.HYBRID,
          common_pb2.RETRIEVAL_MODE_DECOMPOSED: RetrievalMode.DECOMPOSED,
          common_pb2.RETRIEVAL_MODE_AGENTIC: RetrievalMode.AGENTIC}
_UNSUPPORTED = {tenant_pb2.UNSUPPORTED_SENTENCES_FLAG: "flag",
                tenant_pb2.UNSUPPORTED_SENTENCES_REMOVE: "remove",
                tenant_pb2.UNSUPPORTED_SENTENCES_REFUSE: "refuse"}
_KINDS = {metering_pb2.USAGE_KIND_UNSPECIFIED: UsageKind.UNSPECIFIED,
          metering_pb2.USAGE_KIND_QUERY: UsageKind.QUERY,
          metering_pb2.USAGE_KIND_INGEST: UsageKind.INGEST,
          metering_pb2.USAGE_KIND_SEARCH: UsageKind.SEARCH}


def _inverse(mapping: dict[Any, Any]) -> dict[Any, Any]:
    return {v: k for k, v in mapping.items()}


_PLANS_PB, _STATES_PB, _MODES_PB = _inverse(_PLANS), _inverse(_STATES), _inverse(_MODES)
_UNSUPPORTED_PB = _inverse(_UNSUPPORTED)


def plan(value: int) -> Plan | None:
    return _PLANS.get(value)


def plan_pb(value: Plan) -> common_pb2.Plan:
    result: common_pb2.Plan = _PLANS_PB[value]
    return result


# --- Time --------------------------------------------------------------------------------

def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


def moment(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument.field(field, "not a valid timestamp") from exc


def duration(value: duration_pb2.Duration, field: str) -> timedelta:
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument.field(field, "must not be negative")
    return value.ToTimedelta()


# --- Tenants -----------------------------------------------------------------------------

def tenant_pb(tenant: Tenant) -> tenant_pb2.Tenant:
    limits, config = tenant.limits, tenant.config
    return tenant_pb2.Tenant(
        tenant_id=tenant.tenant_id,
        display_name=tenant.display_name,
        plan=plan_pb(tenant.plan),
        state=_STATES_PB[tenant.state],
        limits=tenant_pb2.TenantLimits(
            requests_per_second=limits.requests_per_second,
            requests_per_minute=limits.requests_per_minute,
            requests_per_hour=limits.requests_per_hour,
            tokens_per_month=limits.tokens_per_month,
            max_documents=limits.max_documents,
        ),
        config=tenant_pb2.TenantConfig(
            provider=config.provider,
            model=config.model,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            system_prompt=config.system_prompt,
            retrieval_mode=_MODES_PB[config.retrieval_mode],
            top_k=config.top_k,
            pii_masking=config.pii_masking,
            agentic_tools=config.agentic_tools,
            unsupported_sentences=_UNSUPPORTED_PB.get(config.unsupported_sentences,
                                                      tenant_pb2.UNSUPPORTED_SENTENCES_FLAG),
        ),
        config_version=tenant.config_version,
        create_time=timestamp(tenant.create_time),
        update_time=timestamp(tenant.update_time),
    )


def _leaf(message: tenant_pb2.Tenant, path: str) -> Any:
    if path == "plan":
        return plan(message.plan)
    if path == "state":
        return _STATES.get(message.state)
    if path == "config.retrieval_mode":
        return _MODES.get(message.config.retrieval_mode)
    if path == "config.unsupported_sentences":
        return _UNSUPPORTED.get(message.config.unsupported_sentences)
    value: Any = message
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _expand(path: str) -> list[str]:
    if path == "limits":
        return [f"limits.{name}" for name in LIMIT_FIELDS]
    if path == "config":
        return [f"config.{name}" for name in CONFIG_FIELDS]
    return [path]


def update_changes(message: tenant_pb2.Tenant, paths: Iterable[str]) -> dict[str, Any]:
    """Leaf path → value for every path of the update mask ("limits" and "config" name
    all their fields). Paths the domain does not allow are kept, with no value, so that
    its validation reports them alongside any bad values."""
    changes: dict[str, Any] = {}
    for path in paths:
        for leaf in _expand(path.strip()):
            changes[leaf] = _leaf(message, leaf) if leaf in UPDATABLE_PATHS else None
    return changes


# --- Usage -------------------------------------------------------------------------------

def usage_event(tenant_id: str, index: int, message: metering_pb2.UsageEvent, now: datetime) -> UsageEvent:
    kind = _KINDS.get(message.kind)
    if kind is None:
        raise InvalidArgument.field(f"events[{index}].kind", f"unknown usage kind {message.kind}")
    occurred = moment(message.occur_time, f"events[{index}].occur_time") if message.HasField(
        "occur_time") else now
    return UsageEvent(
        tenant_id=tenant_id,
        event_id=message.event_id,
        kind=kind,
        model=message.model,
        requests=message.requests,
        input_tokens=message.input_tokens,
        output_tokens=message.output_tokens,
        occur_time=occurred,
        attributes=dict(message.attributes),
        reservation_id=message.reservation_id,
    )


def usage_response(totals: UsageTotals, prices: PriceTable | None = None) -> metering_pb2.GetUsageResponse:
    costs = [prices.cost_micros(m) if prices else 0 for m in totals.by_model]
    return metering_pb2.GetUsageResponse(
        tenant_id=totals.tenant_id,
        start_time=timestamp(totals.start),
        end_time=timestamp(totals.end),
        requests=totals.requests,
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        total_tokens=totals.total_tokens,
        events=totals.events,
        by_model=[metering_pb2.ModelUsage(model=m.model, requests=m.requests, input_tokens=m.input_tokens,
                                          output_tokens=m.output_tokens, cost_micros=cost)
                  for m, cost in zip(totals.by_model, costs, strict=True)],
        cost_micros=sum(costs),
        currency=prices.currency if prices else "",
    )


def _quota_statuses(decision: QuotaDecision) -> list[metering_pb2.QuotaStatus]:
    return [metering_pb2.QuotaStatus(name=q.name, limit=q.limit, used=q.used, reset_time=timestamp(q.reset_time))
            for q in decision.quotas]


def reserve_response(decision: QuotaDecision, reservation: Reservation) -> metering_pb2.ReserveQuotaResponse:
    return metering_pb2.ReserveQuotaResponse(
        allowed=decision.allowed, quotas=_quota_statuses(decision), expire_time=timestamp(reservation.expire_time),
        reservation_id=reservation.reservation_id, tokens=reservation.tokens)


def quota_response(decision: QuotaDecision) -> metering_pb2.CheckQuotaResponse:
    response = metering_pb2.CheckQuotaResponse(allowed=decision.allowed, quotas=_quota_statuses(decision))
    if decision.retry_after is not None:
        response.retry_after.FromTimedelta(decision.retry_after)
    return response
