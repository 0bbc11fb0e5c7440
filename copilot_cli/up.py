"""`copilot up`: the embedded mesh in the foreground until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from dataclasses import replace

from copilot_cli import demo
from copilot_cli.supervisor import Interrupted, Mesh, MeshError
from servers.common.settings import Settings

READY_FILE = "ready"


def up(settings: Settings, demo_data: bool = True) -> int:
    if settings.ready_file is None:
        settings = replace(settings, ready_file=settings.data_dir / READY_FILE)
    mesh = Mesh(settings)
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, _frame: object) -> None:
        # Installed before anything starts: during start-up a signal interrupts it (and the
        # handlers below stop whatever had started); afterwards it asks for a clean stop.
        if starting:
            mesh.interrupt(signum)
            raise Interrupted(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"starting the mesh (state in {settings.data_dir}, logs in {mesh.log_dir}) ...", flush=True)
    try:
        issuer = mesh.start(mark_ready=False)
        if demo_data:
            print("provisioning the demo tenants and their documents ...", flush=True)
            seeded = asyncio.run(demo.seed(mesh.edge_address, issuer))
            for tenant, counts in seeded.items():
                summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                print(f"  demo tenant {tenant}: {summary}")
        # A signal raised inside a gRPC call may have been swallowed as a cancelled call.
        mesh.check_interrupted()
        # Health ("" at the edge, `copilot status`) says SERVING from here on, not before.
        mesh.mark_ready()
        starting = False
    except MeshError as exc:
        starting = False  # a signal from here on must not interrupt the stop below
        print(f"copilot up: {exc}", file=sys.stderr)
        mesh.stop()
        return 1
    except Interrupted as exc:
        starting = False
        print(f"copilot up: {signal.Signals(exc.signum).name} while starting; stopping what started", file=sys.stderr)
        mesh.stop()
        return 128 + exc.signum
    except BaseException:
        starting = False
        # Whatever failed after the processes started, none of them outlives this command.
        mesh.stop()
        raise
    edge = mesh.edge_address
    print(f"""
Compliance Copilot Mesh is ready: Envoy on {edge} (admin on {settings.host}:{settings.envoy_admin_port}).
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
