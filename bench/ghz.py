"""ghz (https://ghz.sh), the gRPC load tool, driven from the benchmarks and tests.

Users install ghz themselves; on this project's machines it sits beside the repository at
`<repo>/../shared/tools/ghz` (so a CI clone with a copy of shared/ beside it finds it
too), else it is taken from PATH. Every run asks for ghz's JSON report and keeps the
figures the benchmarks print: calls, calls/s, p50/p99 and the errors by message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bare_health import BareHealthServer
from bench.procs import cpu_used_s, snapshot

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench" / "ghz"
SHARED_GHZ = ROOT.parent / "shared" / "tools" / "ghz"
HEALTH_PROTO = CONFIGS / "health.proto"
HEALTH_CHECK = "grpc.health.v1.Health.Check"
# ghz's own margin beyond the run's duration: connecting, reflection, draining in-flight calls.
SLACK_S = 60.0


def find_ghz() -> str | None:
    """The ghz binary to use, or None when there is none."""
    if SHARED_GHZ.is_file() and SHARED_GHZ.stat().st_mode & 0o111:
        return str(SHARED_GHZ)
    return shutil.which("ghz")


def absent_reason() -> str:
    return (f"ghz not found (neither {SHARED_GHZ} nor ghz on PATH); install it from https://ghz.sh "
            "to run bench/ghz/")


class GhzError(RuntimeError):
    """ghz exited non-zero (bad config, unreachable host, unresolvable method...)."""


@dataclass(frozen=True)
class GhzResult:
    count: int  # every call ghz made, errors included
    errors: dict[str, int]  # ghz's errorDistribution: message -> calls
    statuses: dict[str, int]  # statusCodeDistribution: "OK", "Unavailable", ...
    rps: float  # all calls per second over the run (ghz's figure)
    p50_ms: float
    p99_ms: float
    total_s: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> int:
        return self.statuses.get("OK", self.count - self.error_count)

    @property
    def ok_rps(self) -> float:
        return self.ok / self.total_s if self.total_s > 0 else 0.0

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> GhzResult:
        lat = {int(d["percentage"]): d["latency"] / 1e6 for d in report.get("latencyDistribution") or ()}
        nan = float("nan")
        return cls(count=int(report.get("count", 0)), errors=dict(report.get("errorDistribution") or {}),
                   statuses=dict(report.get("statusCodeDistribution") or {}), rps=float(report.get("rps", 0.0)),
                   p50_ms=lat.get(50, nan), p99_ms=lat.get(99, nan), total_s=float(report.get("total", 0)) / 1e9)


def run(args: Sequence[str], *, duration_s: float, cwd: Path | None = None, ghz: str | None = None) -> GhzResult:
    """Runs ghz with `args` (a target host, a call, load options or --config) and its JSON
    report. In-flight calls at the end of a timed run are waited for, not counted as errors
    (ghz's default "close" cancels them). Raises GhzError when ghz fails."""
    binary = ghz or find_ghz()
    if binary is None:
        raise GhzError(absent_reason())
    argv = [binary, "--format", "json", "--duration-stop", "wait", *args]
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=duration_s + SLACK_S)
    except subprocess.TimeoutExpired as exc:
        raise GhzError(f"ghz did not finish within {duration_s + SLACK_S:.0f} s: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        raise GhzError(f"ghz exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}")
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise GhzError(f"ghz printed no JSON report: {proc.stdout[:300]!r} {proc.stderr[-300:]!r}") from exc
    return GhzResult.from_report(report)


def metadata(pairs: Sequence[tuple[str, str]]) -> str:
    """gRPC metadata as ghz's -m takes it (a JSON object)."""
    return json.dumps(dict(pairs))


def health_args(target: str, concurrency: int, *, proto: bool) -> list[str]:
    """grpc.health.v1 Check of the overall status ("") at `target`, closed loop. `proto`:
    from bench/ghz/health.proto, for servers without (usable) reflection such as the bare one."""
    schema = ["--proto", str(HEALTH_PROTO)] if proto else []
    return [*schema, "--insecure", "--call", HEALTH_CHECK, "-d", '{"service": ""}', "-c", str(concurrency), target]


@dataclass(frozen=True)
class Measured:
    label: str
    result: GhzResult
    cpu_ms_per_call: float  # summed over the processes watched, per call ghz made
    # The same, process by process (name -> CPU ms per call).
    cpu_ms_by_process: Mapping[str, float] = field(default_factory=dict)

    def ratio(self, ceiling: Measured) -> float:
        """Calls/s as a fraction of the ceiling's (H)."""
        return self.result.ok_rps / ceiling.result.ok_rps if ceiling.result.ok_rps else float("nan")

    def cpu_worth(self, ceiling: Measured) -> float:
        """CPU per call in bare calls' worth (CPU per call / CPU per bare call)."""
        return self.cpu_ms_per_call / ceiling.cpu_ms_per_call if ceiling.cpu_ms_per_call > 0 else float("nan")


def measure(label: str, args: Sequence[str], pids: Mapping[str, int], *, duration_s: float, warmup_s: float,
            cwd: Path | None = None) -> Measured:
    """A warm-up run (connections, reflection, caches; not reported), then the measured run
    of `duration_s`, with the CPU the processes `pids` used over it per call."""
    if warmup_s > 0:
        run([*args, "-z", f"{warmup_s:g}s"], duration_s=warmup_s, cwd=cwd)
    before = snapshot(pids)
    result = run([*args, "-z", f"{duration_s:g}s"], duration_s=duration_s, cwd=cwd)
    after = snapshot(pids)
    per_call = cpu_used_s(before, after) * 1000 / result.count if result.count else float("nan")
    by_process = {name: (after[name].cpu_s - before[name].cpu_s) * 1000 / result.count
                  for name in after if name in before} if result.count else {}
    return Measured(label, result, per_call, by_process)


def bare_ceiling(address: str, concurrency: int, *, duration_s: float, warmup_s: float) -> Measured:
    """H: grpc.health.v1 Check against a grpc.aio server with nothing else (no interceptors,
    no reflection), started here in its own process on `address`."""
    with BareHealthServer(address) as server:
        return measure("bare grpc.aio server, grpc.health.v1 only (H)", health_args(address, concurrency, proto=True),
                       {"bare": server.pid}, duration_s=duration_s, warmup_s=warmup_s)
