"""Usage events: the domain (an event, its validation, totals, the quota windows).

The idempotency key is (tenant_id, event_id): the same id from two tenants is two events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from servers.common.errors import FieldViolation, InvalidArgument

MAX_BATCH = 1000
MAX_EVENT_ID = 128
MAX_MODEL = 128
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY = 64
MAX_ATTRIBUTE_VALUE = 1024
# Far beyond any real event, and small enough that summing a month of them cannot
# overflow SQLite's (or ClickHouse's) 64-bit integers.
MAX_QUANTITY = 10**12
EARLIEST = datetime(2020, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(days=1)
# Violations reported per rejected batch; a client sending 1,000 bad events needs the
# first few to fix its bug, not a megabyte of status details.
MAX_VIOLATIONS = 20


class UsageKind(StrEnum):
    UNSPECIFIED = "unspecified"
    QUERY = "query"
    INGEST = "ingest"
    SEARCH = "search"


@dataclass(frozen=True)
class UsageEvent:
    tenant_id: str
    event_id: str
    kind: UsageKind
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    occur_time: datetime
    attributes: Mapping[str, str] = field(default_factory=dict)
    # The quota reservation this usage settles (servers/metering/usage/admission.py); "" for none.
    reservation_id: str = ""

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class RecordResult:
    recorded: int
    duplicates: int


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    events: int


@dataclass(frozen=True)
class UsageTotals:
    tenant_id: str
    start: datetime
    end: datetime
    by_model: tuple[ModelUsage, ...]

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.by_model)

    @property
    def input_tokens(self) -> int:
        return sum(m.input_tokens for m in self.by_model)

    @property
    def output_tokens(self) -> int:
        return sum(m.output_tokens for m in self.by_model)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def events(self) -> int:
        return sum(m.events for m in self.by_model)


@dataclass(frozen=True)
class Window:
    """A half-open interval [start, end)."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class QuotaUsage:
    requests_in_hour: int
    tokens_in_month: int


def validate_batch(events: Sequence[UsageEvent], now: datetime) -> None:
    """Raises INVALID_ARGUMENT (with every violation, up to a cap) unless the whole batch is
    acceptable, so that a bad event rejects the batch before anything is written."""
    if not events:
        raise InvalidArgument.field("events", "send at least one event")
    if len(events) > MAX_BATCH:
        raise InvalidArgument.field("events", f"at most {MAX_BATCH} events per request, got {len(events)}")
    violations: list[FieldViolation] = []
    latest = now + MAX_FUTURE
    for i, event in enumerate(events):
        def bad(name: str, why: str, i: int = i) -> None:
            violations.append(FieldViolation(f"events[{i}].{name}", why))

        if not 1 <= len(event.event_id) <= MAX_EVENT_ID:
            bad("event_id", f"required, 1..{MAX_EVENT_ID} characters")
        if len(event.reservation_id) > MAX_EVENT_ID:
            bad("reservation_id", f"at most {MAX_EVENT_ID} characters")
        if len(event.model) > MAX_MODEL:
            bad("model", f"at most {MAX_MODEL} characters")
        for name in ("requests", "input_tokens", "output_tokens"):
            value = getattr(event, name)
            if not 0 <= value <= MAX_QUANTITY:
                bad(name, f"must be between 0 and {MAX_QUANTITY}")
        if event.occur_time < EARLIEST:
            bad("occur_time", "before 2020-01-01")
        elif event.occur_time > latest:
            bad("occur_time", "more than one day in the future")
        if len(event.attributes) > MAX_ATTRIBUTES:
            bad("attributes", f"at most {MAX_ATTRIBUTES} entries")
        elif any(not 0 < len(k) <= MAX_ATTRIBUTE_KEY or len(v) > MAX_ATTRIBUTE_VALUE
                 for k, v in event.attributes.items()):
            bad("attributes", f"keys 1..{MAX_ATTRIBUTE_KEY} characters, values at most "
                              f"{MAX_ATTRIBUTE_VALUE}")
    if violations:
        shown = violations[:MAX_VIOLATIONS]
        more = len(violations) - len(shown)
        message = "invalid usage events, none recorded: " + "; ".join(
            f"{v.field}: {v.description}" for v in shown) + (f" (and {more} more)" if more else "")
        raise InvalidArgument(message, shown)


def month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(moment: datetime) -> datetime:
    start = month_start(moment)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
        month=start.month + 1)


def hour_window(now: datetime) -> Window:
    start = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return Window(start, start + timedelta(hours=1))


def month_window(now: datetime) -> Window:
    return Window(month_start(now), next_month(now))
