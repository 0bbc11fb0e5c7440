"""Every shipped ghz config (bench/ghz/*.json) runs against the test mesh, through the edge,
by server reflection (no --proto), for a couple of seconds at a small rate: ghz must exit 0
and its JSON report must show calls and no error, so the configs cannot rot. Skipped when
ghz is not installed (bench/ghz.py says where it looks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from bench import ghz
from bench.answer import corpus
from copilot.v1 import common_pb2
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration

CONFIGS = sorted(ghz.CONFIGS.glob("*.json"))
# Small enough for the test mesh and the tenant's plan, bounded in time and count.
DURATION_S = 2.0
RATE = 20
CONCURRENCY = 4


@pytest.fixture(scope="module")
def ghz_binary() -> str:
    found = ghz.find_ghz()
    if found is None:
        pytest.skip(ghz.absent_reason())
    return found


def test_every_config_is_found_and_resolves_its_method_by_reflection() -> None:
    names = {p.name for p in CONFIGS}
    assert {"answer.json", "health.json", "search.json", "usage.json"} <= names, names
    for config in CONFIGS:
        shipped = json.loads(config.read_text())
        assert "proto" not in shipped and "protoset" not in shipped, f"{config.name}: the edge has reflection"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
async def test_a_shipped_config_runs_without_errors_through_the_edge(
        config: Path, ghz_binary: str, mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    tenant = await create_tenant(mesh, channel, plan=common_pb2.PLAN_ENTERPRISE, prefix="ghz",
                                 documents=corpus(1, 4, owner="ghz"))
    # The shipped file as a user runs it (from its folder), with only the target, the token
    # and the load's size given on the command line.
    args = ["--config", config.name, "-m", ghz.metadata(mesh.auth(tenant)), "--rps", str(RATE),
            "-c", str(CONCURRENCY), "-z", f"{DURATION_S:g}s", mesh.edge]
    result = await asyncio.to_thread(ghz.run, args, duration_s=DURATION_S, cwd=ghz.CONFIGS, ghz=ghz_binary)
    assert result.count >= RATE, result  # about RATE * DURATION_S calls, at least a second's worth
    assert result.errors == {} and set(result.statuses) == {"OK"}, result
