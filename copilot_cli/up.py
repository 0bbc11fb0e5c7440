"""`copilot up`: the embedded mesh in the foreground until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

from copilot_cli import demo
from copilot_cli.supervisor import Mesh, MeshError
from servers.common.settings import Settings


def up(settings: Settings, demo_data: bool = True) -> int:
    mesh = Mesh(settings)
    stop = threading.Event()
    print(f"starting the mesh (state in {settings.data_dir}, logs in {mesh.log_dir}) ...", flush=True)
    try:
        issuer = mesh.start()
        if demo_data:
            seeded = asyncio.run(demo.seed(mesh.edge_address, issuer))
            for tenant, counts in seeded.items():
                summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                print(f"  demo tenant {tenant}: {summary}")
    except MeshError as exc:
        print(f"copilot up: {exc}", file=sys.stderr)
        mesh.stop()
        return 1
    except BaseException:
        # Whatever failed after the processes started, none of them outlives this command.
        mesh.stop()
        raise
    # From here Ctrl-C asks for a clean stop (during start-up it interrupts, and stops what started).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    edge = mesh.edge_address
    print(f"""
Compliance Copilot Mesh is up: Envoy on {edge} (admin on {settings.host}:{settings.envoy_admin_port}).
Browser console: http://{edge}/ (dev sign-in: pick a demo tenant)
Try:
  copilot ask --tenant globex-bank "Who must approve a high-risk customer?"
  copilot usage --tenant globex-bank --json
  grpcurl -plaintext -H "authorization: Bearer $(copilot token --tenant globex-bank --user me)" \\
      -d '{{"query": "sanctions screening"}}' {edge} copilot.v1.RetrievalService/Search
Ctrl-C stops everything.""", flush=True)
    code = 0
    while not stop.wait(0.5):
        dead = [name for name, proc in mesh.processes.items() if proc.poll() is not None]
        if dead:
            for name in dead:
                print(f"copilot up: {name} exited unexpectedly:\n{mesh.tail(name)}", file=sys.stderr)
            code = 1
            break
    print("stopping ...", flush=True)
    mesh.stop()
    print("stopped.")
    return code
