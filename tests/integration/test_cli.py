"""The `copilot` CLI against the running mesh, as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import RunningMesh, new_tenant_id

pytestmark = pytest.mark.integration


def _copilot(mesh: RunningMesh, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COPILOT_EDGE": mesh.edge, "COPILOT_DATA_DIR": str(mesh.settings.data_dir),
           "COPILOT_JWT_ISSUER": mesh.settings.jwt_issuer, "COPILOT_JWT_AUDIENCE": mesh.settings.jwt_audience}
    return subprocess.run([sys.executable, "-m", "copilot_cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=60)


async def test_cli_end_to_end(mesh: RunningMesh, tmp_path: Path) -> None:
    tenant = new_tenant_id("cli")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "retention.md").write_text(
        "# Record retention\n\n## 4. Periods\n\n4.1 Customer due diligence records are kept for five years "
        "after the end of the business relationship.\n\n4.2 Call recordings are kept for one year.\n")
    (docs / "corpus.jsonl").write_text(json.dumps(
        {"_id": "beir-1", "title": "Gifts", "text": "Gifts above 100 EUR must be declared to Compliance."}) + "\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = _copilot(mesh, *args)
        assert result.returncode == 0, result.stderr
        return result

    created = await asyncio.to_thread(run, "tenants", "create", tenant, "--plan", "pro")
    assert tenant in created.stdout
    listed = await asyncio.to_thread(run, "tenants", "list")
    assert tenant in listed.stdout
    ingested = await asyncio.to_thread(run, "ingest", "--tenant", tenant, str(docs))
    assert "2 created" in ingested.stdout
    again = await asyncio.to_thread(run, "ingest", "--tenant", tenant, str(docs))
    assert "2 unchanged" in again.stdout

    answer = await asyncio.to_thread(run, "ask", "--tenant", tenant, "How long are due diligence records kept?")
    assert "five years" in answer.stdout and "[1]" in answer.stdout
    assert "Sources:" in answer.stdout and "retention.md" in answer.stdout

    usage = json.loads((await asyncio.to_thread(run, "usage", "--tenant", tenant, "--json")).stdout)
    assert usage["requests"] == 1 and usage["tokens"] > 0

    masked = await asyncio.to_thread(run, "ask", "--tenant", tenant,
                                     "Write to jane.doe@example.com: how long are call recordings kept?")
    assert "masked before retrieval and the model: [EMAIL_1]" in masked.stdout
    assert "jane.doe@example.com" not in masked.stdout

    token = (await asyncio.to_thread(run, "token", "--tenant", tenant, "--user", "bob", "--roles", "member")).stdout
    assert token.count(".") == 2


async def test_cli_bad_input_is_one_clear_line(mesh: RunningMesh, tmp_path: Path) -> None:
    cases = [
        (["ingest", "--tenant", "whoever", str(tmp_path / "missing.md")], "no such file"),
        (["ask", "--tenant", "whoever", "--token", "not-a-jwt", "hello"], "UNAUTHENTICATED"),
        (["tenants", "create", "Bad_Id!", "--plan", "free"], "INVALID_ARGUMENT"),
    ]
    for args, expected in cases:
        result = await asyncio.to_thread(_copilot, mesh, *args)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
