"""The bare ceiling's server: grpc.aio with grpc.health.v1 only (no interceptors, no
reflection, nothing of the mesh), in a process of its own so its CPU can be read apart.

  python -m bench.bare_health 127.0.0.1:PORT

Prints "serving ADDRESS" once it accepts calls; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY = "serving"


async def serve(address: str) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"bare_health: cannot listen on {address}")
    await server.start()
    print(f"{READY} {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


class BareHealthServer:
    """`with BareHealthServer(address) as server:` runs the server as a child process;
    `server.pid` is its process, for CPU accounting."""

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self._timeout = timeout_s
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def __enter__(self) -> BareHealthServer:
        root = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.bare_health", self.address], cwd=root,
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # blocks until ready or the child exits
        if not line.startswith(READY):
            self.__exit__()
            raise RuntimeError(f"bare health server did not start on {self.address} (exit {self._proc.returncode})")
        self._wait_serving()
        return self

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + self._timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    asyncio.run(serve(sys.argv[1]))
