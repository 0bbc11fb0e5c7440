"""CPU, memory and open files of processes, read from /proc (Linux), for the benchmarks'
per-call CPU accounting and the soak's samples."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    rss_kb: int
    fds: int
    cpu_s: float


def sample_process(pid: int) -> ProcSample | None:
    try:
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the command (which may hold spaces), utime and stime are 14th and 15th.
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        return ProcSample(rss_kb=rss, fds=fds, cpu_s=cpu)
    except (OSError, IndexError, ValueError):
        return None


def snapshot(pids: Mapping[str, int]) -> dict[str, ProcSample]:
    found = {name: sample_process(pid) for name, pid in pids.items()}
    return {name: s for name, s in found.items() if s is not None}


def cpu_used_s(before: Mapping[str, ProcSample], after: Mapping[str, ProcSample]) -> float:
    """CPU seconds the processes in both snapshots used between them, summed."""
    return sum(after[name].cpu_s - before[name].cpu_s for name in after if name in before)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"
