"""`copilot billing` / `copilot usage` periods, and `copilot tenants update --set` parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from copilot.v1 import common_pb2
from copilot_cli.billing import period
from copilot_cli.client import CliError
from copilot_cli.tenants import _changes

NOW = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)


def test_periods() -> None:
    assert period(None, NOW) == (datetime(2026, 11, 1, tzinfo=UTC), NOW)
    assert period("2026-10", NOW) == (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    assert period("2026-12", NOW)[1] == datetime(2027, 1, 1, tzinfo=UTC)
    assert period("2026-11-26", NOW) == (datetime(2026, 11, 26, tzinfo=UTC), datetime(2026, 11, 27, tzinfo=UTC))
    assert period("2026-11", NOW)[1] == NOW  # the current month ends now
    start, end = period("2026-11-01T00:00:00/2026-11-02T12:00:00+00:00", NOW)
    assert (start, end) == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, 12, tzinfo=UTC))
    for bad in ("yesterday", "2026-13", "2026-11-02/2026-11-01"):
        with pytest.raises(CliError):
            period(bad, NOW)


def test_update_fields() -> None:
    tenant, paths = _changes(["plan=enterprise", "config.top_k=8", "config.pii_masking=false",
                              "config.retrieval_mode=hybrid", "limits.requests_per_hour=10"])
    assert paths == ["plan", "config.top_k", "config.pii_masking", "config.retrieval_mode",
                     "limits.requests_per_hour"]
    assert tenant.plan == common_pb2.PLAN_ENTERPRISE and tenant.config.top_k == 8
    assert tenant.config.retrieval_mode == common_pb2.RETRIEVAL_MODE_HYBRID and tenant.limits.requests_per_hour == 10
    for bad in ([], ["nope=1"], ["config.top_k=many"], ["plan=platinum"], ["config.top_k"]):
        with pytest.raises(CliError):
            _changes(bad)
