"""Envoy's rate limit service (envoy.service.ratelimit.v3): per-tenant request limits.

Envoy calls ShouldRateLimit on every request that carries a verified tenant, so the
admitted path is kept to a dict lookup for the tenant's limits, a synchronous counter
update (in-process limiter) and a prebuilt response. Only a refusal builds a response:
per-descriptor statuses (from which Envoy renders the x-ratelimit-* headers), a
`retry-after` header, and a grpc-status-details-bin carrying RetryInfo and QuotaFailure
so gRPC clients read the delay the same way as from any other RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from urllib.parse import quote

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc.aio import ServicerContext

from servers.common import metrics
from servers.common.errors import ERROR_DOMAIN
from servers.edge.config import FREE_PLAN_RPM, FREE_PLAN_RPS, UNKNOWN, TenantLimits, limits_of
from servers.edge.limiter import HOUR, UNIT_NAMES, Decision, InProcessLimiter, Limiter, Limits

log = logging.getLogger("copilot.edge.ratelimit")

DOMAIN = "copilot"
TENANT_KEY = "tenant_id"
# Envoy marks a tenant's reads of its own usage, quota and record (envoy_config.INSPECTION_RPCS)
# with this entry. They are not counted against the tenant's hourly request quota, which a
# tenant that exhausted it must still be able to read about; they are rate limited on a
# counter of their own, by the tenant's per-second and per-minute limits, so they cannot
# be used to flood the mesh either.
KIND_KEY = "kind"
INSPECT = "inspect"
SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name

Response = rls_pb2.RateLimitResponse
OK = Response.OK
OVER_LIMIT = Response.OVER_LIMIT

# The limiter key of a tenant's self-inspection calls ("/" is not in a tenant id).
INSPECT_SUFFIX = "/inspect"


def inspection_limits(limits: Limits) -> Limits:
    """The tenant's limits without the hour window (its quota). A tenant whose record
    limits only the hour gets generous shorter windows instead: never unlimited."""
    short = tuple(w for w in limits if w.unit != HOUR)
    return short or FREE_INSPECTION_LIMITS


# Shared by every admitted call: never mutated, so reusing it is safe.
_ALLOW = Response(overall_code=OK)
_CHECKED_OK = metrics.RATELIMIT_CHECKS.labels("OK")
_CHECKED_OVER = metrics.RATELIMIT_CHECKS.labels("OVER_LIMIT")
_ERROR_LOG_EVERY_S = 10.0
# Ten times the free plan's per-second and per-minute limits.
FREE_INSPECTION_LIMITS: Limits = limits_of(FREE_PLAN_RPS * 10, FREE_PLAN_RPM * 10, 0)


def over_limit_message(tenant_id: str, decision: Decision) -> str:
    window = decision.window
    unit = UNIT_NAMES.get(window.unit, "window") if window else "window"
    limit = window.limit if window else 0
    return f"tenant {tenant_id} is over its limit of {limit} requests per {unit}"


def _grpc_message(text: str) -> str:
    # gRPC percent-encodes grpc-message outside printable ASCII, and '%' itself.
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _status_details(tenant_id: str, decision: Decision, retry_after_s: int) -> str:
    message = over_limit_message(tenant_id, decision)
    window = decision.window
    unit = UNIT_NAMES.get(window.unit, "window") if window else "window"
    details = (
        error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain=ERROR_DOMAIN,
                                    metadata={"tenant_id": tenant_id, "unit": unit}),
        error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=f"tenant:{tenant_id}", description=message)]),
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after_s)),
    )
    packed = []
    for detail in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=packed)
    return base64.b64encode(status.SerializeToString()).decode("ascii")


def over_limit_response(tenant_id: str, decision: Decision, n_descriptors: int,
                        index: int) -> rls_pb2.RateLimitResponse:
    window = decision.window
    retry_after = max(1, math.ceil(decision.reset_s))
    statuses = [Response.DescriptorStatus(code=OK) for _ in range(n_descriptors)]
    status = statuses[index]
    status.code = OVER_LIMIT
    if window is not None:
        status.current_limit.name = f"{tenant_id}/{UNIT_NAMES.get(window.unit, 'window')}"
        status.current_limit.requests_per_unit = window.limit
        status.current_limit.unit = window.unit
    status.limit_remaining = 0
    status.duration_until_reset.seconds = retry_after
    return Response(
        overall_code=OVER_LIMIT,
        statuses=statuses,
        response_headers_to_add=[
            base_pb2.HeaderValue(key="retry-after", value=str(retry_after)),
            # Envoy's reply has no grpc-message of its own; the details' message must
            # match it for grpcio-status (rpc_status.from_call) to accept them.
            base_pb2.HeaderValue(key="grpc-message", value=_grpc_message(over_limit_message(tenant_id, decision))),
            base_pb2.HeaderValue(key="grpc-status-details-bin",
                                 value=_status_details(tenant_id, decision, retry_after)),
        ],
    )


# Envoy's local reply mapper turns a refusal carrying this header into PERMISSION_DENIED
# (see envoy/envoy.yaml.tmpl); the header itself is removed before it reaches the client.
DENIED_HEADER = "x-copilot-denied"


_DENIED_MESSAGES = {
    UNKNOWN: "tenant {} does not exist (a platform operator creates tenants: `copilot tenants create`)",
}


def denied_message(tenant_id: str, why: str) -> str:
    return _DENIED_MESSAGES.get(why, "tenant {} is " + why).format(tenant_id)


def denied_response(tenant_id: str, why: str, n_descriptors: int, index: int) -> rls_pb2.RateLimitResponse:
    """The answer for a suspended, deleted or unknown tenant: refused outright, not rate limited."""
    message = denied_message(tenant_id, why)
    reason = f"TENANT_{why.upper()}"
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={"tenant_id": tenant_id}))
    status = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=message, details=[info])
    statuses = [Response.DescriptorStatus(code=OK) for _ in range(n_descriptors)]
    statuses[index].code = OVER_LIMIT
    return Response(
        overall_code=OVER_LIMIT,
        statuses=statuses,
        response_headers_to_add=[
            base_pb2.HeaderValue(key=DENIED_HEADER, value=why),
            base_pb2.HeaderValue(key="grpc-message", value=_grpc_message(message)),
            base_pb2.HeaderValue(key="grpc-status-details-bin",
                                 value=base64.b64encode(status.SerializeToString()).decode("ascii")),
        ],
    )


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limits: TenantLimits, limiter: Limiter, *, fail_open: bool,
                 domain: str = DOMAIN) -> None:
        self._limits = limits
        self._limiter = limiter
        # The in-process limiter answers without awaiting; Redis has to.
        self._hit_now = limiter.hit_now if isinstance(limiter, InProcessLimiter) else None
        self._fail_open = fail_open
        self._domain = domain
        self._last_error_log = 0.0

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest,
        context: ServicerContext[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse],
    ) -> rls_pb2.RateLimitResponse:
        response = await self._check(request, context)
        (_CHECKED_OK if response.overall_code == OK else _CHECKED_OVER).inc()
        return response

    async def _check(
        self, request: rls_pb2.RateLimitRequest,
        context: ServicerContext[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse],
    ) -> rls_pb2.RateLimitResponse:
        if request.domain != self._domain:
            return _ALLOW
        hits = request.hits_addend or 1
        descriptors = request.descriptors
        for index, descriptor in enumerate(descriptors):
            tenant_id = None
            inspect = False
            for entry in descriptor.entries:
                if entry.key == TENANT_KEY:
                    tenant_id = entry.value
                elif entry.key == KIND_KEY:
                    inspect = entry.value == INSPECT
            if not tenant_id:
                # No verified tenant (e.g. a token without the claim): nothing to count
                # against; the services refuse such calls themselves.
                continue
            refused = self._limits.refused.get(tenant_id)
            if refused is not None:
                return denied_response(tenant_id, refused, len(descriptors), index)
            limits = self._limits.known(tenant_id)
            if limits is None:
                try:
                    refused = await self._limits.confirm(tenant_id)
                except Exception as exc:  # the tenant service unreachable: the failure mode decides
                    return await self._on_error(exc, context)
                if refused is not None:
                    return denied_response(tenant_id, refused, len(descriptors), index)
                limits = self._limits.get(tenant_id)
            key = tenant_id
            if inspect:
                key, limits = tenant_id + INSPECT_SUFFIX, inspection_limits(limits)
            try:
                if self._hit_now is not None:
                    decision = self._hit_now(key, limits, hits)
                else:
                    decision = await self._limiter.hit(key, limits, hits)
            except Exception as exc:  # LimiterError or a bug: either way the failure mode decides
                return await self._on_error(exc, context)
            if decision.over_limit:
                return over_limit_response(tenant_id, decision, len(descriptors), index)
        return _ALLOW

    async def _on_error(
        self, exc: Exception, context: ServicerContext[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse],
    ) -> rls_pb2.RateLimitResponse:
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning("rate limiter failed", extra={"error": str(exc), "fail_open": self._fail_open})
        if self._fail_open:
            return _ALLOW
        # Envoy's failure_mode_deny (set from the same setting) turns this into UNAVAILABLE.
        await context.abort(grpc.StatusCode.UNAVAILABLE, "rate limiter unavailable")
        raise AssertionError("unreachable")  # abort raises
