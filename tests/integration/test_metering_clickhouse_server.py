"""Contract test of the ClickHouse server path (clickhouse-connect): the same schema and
queries as the embedded chDB path. Runs only when CLICKHOUSE_URL points at a server
(e.g. http://default:@127.0.0.1:8123); Debian's clickhouse-server is too old for it."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from servers.metering.storage.clickhouse import ServerBackend
from servers.metering.storage.log import LocalLog
from servers.metering.usage.clickhouse_store import ClickHouseUsageStore
from servers.metering.usage.domain import UsageEvent, UsageKind, hour_window, month_window

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not os.environ.get("CLICKHOUSE_URL"), reason="CLICKHOUSE_URL is not set")]

NOW = datetime.now(UTC)


async def test_server_path_dedups_replays_and_reads_like_chdb(tmp_path: Path) -> None:
    tenant = f"contract-{uuid.uuid4().hex[:10]}"
    events = [UsageEvent(tenant, f"e{i}", UsageKind.QUERY, "m1", 1, 10, 5, NOW, {"k": "it's"}) for i in range(20)]
    store = ClickHouseUsageStore(ServerBackend(os.environ["CLICKHOUSE_URL"]), LocalLog(tmp_path / "log"))
    await store.open()
    try:
        first = await store.record(events)
        assert (first.recorded, first.duplicates) == (20, 0)
        await store.flush()
        assert (await store.record(events)).duplicates == 20
        rows = [(e.tenant_id, e.event_id, e.kind.value, e.model, e.requests, e.input_tokens, e.output_tokens,
                 e.occur_time, NOW, dict(e.attributes)) for e in events]
        await store.db.insert(rows)  # a replay after a crash
        totals = await store.totals(tenant, month_window(NOW))
        assert (totals.requests, totals.input_tokens, totals.output_tokens, totals.events) == (20, 200, 100, 20)
        assert await store.stored_count(tenant) == 20
        store.forget(tenant)
        quota = await store.quota_usage(tenant, hour_window(NOW), month_window(NOW))
        assert (quota.requests_in_hour, quota.tokens_in_month) == (20, 300)
        assert (await store.interval_totals(month_window(NOW)))[tenant] == (20, 300)
        await store.forget_tenant(tenant, anonymise=False)
        assert await store.stored_count(tenant) == 0
    finally:
        await store.close()
