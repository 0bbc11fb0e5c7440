"""Two real retrieval processes (`python -m servers.retrieval`, started as the supervisor
starts replicas: replica 0 and 1 of COPILOT_REPLICAS=2) over ONE data directory: whatever
one writes, the other answers with on its next call (docs/retrieval-replicas.md).

Metering is a stand-in here (its tenant registry, as retrieval asks it), so the test needs
no Envoy, Redis or other service; everything is on loopback, every wait bounded."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.v1 import retrieval_pb2 as pb
from copilot.v1 import retrieval_pb2_grpc as pb_grpc
from copilot.v1 import tenant_pb2_grpc
from copilot_cli.supervisor import settings_env, settings_on_free_ports
from servers.common.channels import PEER_HEALTH_NAMES
from servers.common.interceptors import IdentityServerInterceptor
from servers.common.settings import Settings, environment
from tests.unit.test_retrieval_service import Registry, document, who

pytestmark = pytest.mark.integration

TENANT = "tenant-procs"
ADMIN, MEMBER = who(TENANT, "admin"), who(TENANT)
ONBOARDING = who(TENANT, "service", user="service:metering")
MODES = (pb.SEARCH_MODE_BM25, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID)
START_TIMEOUT_S = 90


def _wait_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-2000:]
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=PEER_HEALTH_NAMES["retrieval"]),
                                    timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"retrieval at {address} not serving after {START_TIMEOUT_S} s:\n{log.read_text()[-2000:]}")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_on_free_ports(replace(Settings.from_env(), replicas=2, audit_enabled=False), tmp_path / "data")


@pytest.fixture
async def registry(settings: Settings) -> AsyncIterator[Registry]:
    """Metering replica 0's tenant registry (replica 1 is not running: the peer channel skips it)."""
    known = Registry({TENANT})
    server = grpc.aio.server(interceptors=[IdentityServerInterceptor(access_log=False)])
    tenant_pb2_grpc.add_TenantServiceServicer_to_server(known, server)
    checks = health_aio.HealthServicer()
    await checks.set(PEER_HEALTH_NAMES["metering"], health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    assert server.add_insecure_port(settings.address("metering", 0)) != 0
    await server.start()
    yield known
    await server.stop(None)


@pytest.fixture
def replicas(settings: Settings, registry: Registry, tmp_path: Path) -> Iterator[list[str]]:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(2):
            env = environment(settings_env(replace(settings, replica=index)), {"COPILOT_EMBEDDER": "hash"})
            log = tmp_path / f"retrieval-{index}.log"
            with log.open("wb") as out:
                processes.append(subprocess.Popen([sys.executable, "-m", "servers.retrieval"], env=env,
                                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        for index, process in enumerate(processes):
            _wait_serving(settings.address("retrieval", index), process, tmp_path / f"retrieval-{index}.log")
        yield [settings.address("retrieval", index) for index in range(2)]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def test_two_retrieval_processes_over_one_directory_answer_as_one(
        replicas: list[str], settings: Settings, registry: Registry) -> None:
    async with grpc.aio.insecure_channel(replicas[0]) as first, grpc.aio.insecure_channel(replicas[1]) as second:
        a, b = pb_grpc.RetrievalServiceStub(first), pb_grpc.RetrievalServiceStub(second)

        async def tops(stub: pb_grpc.RetrievalServiceAsyncStub, query: str) -> list[str]:
            """The best hit per mode (dense ranks every chunk: only the first one says much)."""
            found = []
            for mode in MODES:
                response = await stub.Search(pb.SearchRequest(query=query, mode=mode), metadata=MEMBER, timeout=10)
                found.append(response.hits[0].document_id if response.hits else "")
            return found

        async def ingest(stub: pb_grpc.RetrievalServiceAsyncStub, doc_id: str, text: str) -> None:
            await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[document(doc_id, text)]),
                                       metadata=ADMIN, timeout=30)

        await a.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=ONBOARDING, timeout=10)
        await ingest(a, "gifts", "Gifts above fifty euros must be declared to compliance.")
        assert await tops(b, "declare gifts") == ["gifts"] * 3
        # Warmed on A (results, defaults, in-memory indexes), then written by B.
        assert "whistle" not in await tops(a, "whistleblowing hotline")
        await ingest(b, "whistle", "Staff report concerns through the whistleblowing hotline.")
        assert await tops(a, "whistleblowing hotline") == ["whistle"] * 3

        # Search settings put through A apply on B's next search.
        await a.ConfigureSearch(pb.ConfigureSearchRequest(default_mode=pb.SEARCH_MODE_BM25, default_top_k=1),
                                metadata=ADMIN, timeout=10)
        response = await b.Search(pb.SearchRequest(query="gifts hotline"), metadata=MEMBER, timeout=10)
        assert response.mode == pb.SEARCH_MODE_BM25 and len(response.hits) == 1

        # Deleted through B: gone from A.
        await b.DeleteDocuments(pb.DeleteDocumentsRequest(document_ids=["whistle"]), metadata=ADMIN, timeout=10)
        assert "whistle" not in await tops(a, "whistleblowing hotline")

        # Erased through A: B (which holds the file open) answers nothing; re-provisioned
        # through B, both start from an empty index and its own search settings.
        await a.EraseTenant(pb.EraseTenantRequest(), metadata=ONBOARDING, timeout=10)
        assert await tops(b, "declare gifts") == [""] * 3
        await b.ProvisionTenant(pb.ProvisionTenantRequest(), metadata=ONBOARDING, timeout=10)
        for stub in (a, b):
            assert await tops(stub, "declare gifts") == [""] * 3
            read = await stub.ConfigureSearch(pb.ConfigureSearchRequest(), metadata=MEMBER, timeout=10)
            assert read.settings.default_top_k == 0
        await ingest(a, "fresh", "Gifts are no longer accepted at all.")
        assert await tops(b, "gifts") == ["fresh"] * 3
        tenant_files = sorted(p.name for p in (settings.data_dir / "retrieval" / "tenants").glob(f"{TENANT}*"))
        assert tenant_files and all(name.startswith(f"{TENANT}.sqlite") for name in tenant_files)
