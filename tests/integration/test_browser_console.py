"""The browser console end to end: Debian's Chromium driven by playwright-core
(tests/browser/console.mjs) against the real mesh. Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from copilot.v1 import retrieval_pb2, retrieval_pb2_grpc
from tests.integration.conftest import RunningMesh, create_tenant

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = ROOT / "tests" / "browser" / "console.mjs"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
QUESTION = "Who must approve a high-risk customer?"
POLICY = """# Customer onboarding policy

## Approvals
Every high-risk customer must be approved by the MLRO before the relationship begins.
A relationship manager may never approve their own customer.

## Records
KYC records are kept for five years after the relationship ends.
"""


def _requirements() -> str | None:
    if not CHROMIUM.exists():
        return "Debian chromium is not installed (scripts/setup.sh installs it as root)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (ROOT / "node_modules" / "playwright-core").exists():
        return "playwright-core is not installed (npm ci)"
    return None


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_console_signs_in_asks_streams_cites_uploads_and_refuses_an_expired_token(
        mesh: RunningMesh, channel: grpc.aio.Channel) -> None:
    missing = _requirements()
    if missing:
        pytest.skip(missing)
    if not (ROOT / "web" / "dist" / "index.html").exists():
        await asyncio.to_thread(subprocess.run, ["node", str(ROOT / "web" / "build.mjs")], check=True, timeout=60)
    tenant = await create_tenant(mesh, channel, prefix="browser")
    await retrieval_pb2_grpc.RetrievalServiceStub(channel).IngestDocuments(
        retrieval_pb2.IngestDocumentsRequest(documents=[retrieval_pb2.Document(
            document_id="onboarding", title="Customer onboarding policy", text=POLICY,
            content_type="text/markdown")]),
        metadata=mesh.auth(tenant, ("member", "admin")), timeout=30)
    edge_url = f"http://{mesh.edge}"
    # The dev sign-in lists the tenant once the edge's tenant table has refreshed.
    deadline = time.monotonic() + 15
    while True:
        status, body = await asyncio.to_thread(_get, f"{edge_url}/dev/tenants")
        if status == 200 and tenant in {t["tenant_id"] for t in json.loads(body)["tenants"]}:
            break
        assert time.monotonic() < deadline, (status, body[:200])
        await asyncio.sleep(0.2)

    env = {**os.environ, "EDGE_URL": edge_url, "TENANT": tenant, "QUESTION": QUESTION, "ARTIFACTS": str(ARTIFACTS),
           "EXPIRED_TOKEN": mesh.token(tenant, ttl_s=-300), "CHROMIUM": str(CHROMIUM)}
    proc = await asyncio.to_thread(subprocess.run, ["node", str(SCRIPT)], env=env, cwd=str(ROOT),
                                   capture_output=True, text=True, timeout=150)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the browser test: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    result = json.loads(lines[-1])
    assert proc.returncode == 0 and result["ok"], result

    assert result["signOutShownSignedOut"] is False
    assert tenant in result["who"] and "admin" in result["who"]
    assert result["usageRows"] >= 3
    # Streamed: the answer's text changed more than once before the citations arrived.
    assert "MLRO" in result["answer"]
    assert result["answerUpdates"] > 1
    assert result["citations"] >= 1 and result["inlineCitations"] >= 1
    assert "Customer onboarding policy" in result["passageTitle"]
    assert "MLRO" in result["passageText"]
    # The exact span the answer rests on is marked in the passage, with where it is in the
    # document; who may read it; and the answer's groundedness verdict.
    assert result["passageMarked"] and all(m in result["passageText"] for m in result["passageMarked"]), result
    assert result["passageSpan"].startswith("Cited span: characters "), result
    assert result["passageAccess"] == "Readable by the whole tenant"
    assert result["verdict"].startswith("Groundedness "), result
    assert "Uploaded" in result["upload"] and "browser-upload.md" in result["upload"]
    # Refused in words, not a code.
    assert "no longer valid" in result["expiredError"] and "16" not in result["expiredError"]
    assert result["pageErrors"] == []
    for name in ("01-sign-in", "02-signed-in", "03-answer", "04-passage", "05-expired"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 1000


async def test_static_console_and_dev_endpoints_through_envoy(mesh: RunningMesh) -> None:
    edge_url = f"http://{mesh.edge}"
    status, body = await asyncio.to_thread(_get, f"{edge_url}/")
    if status == 503:
        pytest.skip("the console is not built (npm run build:web)")
    assert status == 200 and b"Compliance Copilot" in body
    status, body = await asyncio.to_thread(_get, f"{edge_url}/.well-known/jwks.json")
    assert status == 200 and json.loads(body)["keys"][0]["kid"] == mesh.issuer.kid
    status, _ = await asyncio.to_thread(_get, f"{edge_url}/assets/../../etc/passwd")
    assert status == 404
