"""Where the mesh's CPU goes: py-spy (pinned in requirements.lock) sampling each Python process
of the mesh while a load runs, summarised as the top frames per process.

    with Profiler({"generation": pid, ...}, duration_s=10) as profiler:
        ...  # the load
    for line in profiler.report(top=8): print(line)

py-spy runs `--nonblocking` (it reads the processes' memory without pausing them, so the load
is barely disturbed; a sample is now and then inconsistent) at 100 samples/s, idle threads
left out, so a frame's share of samples is its share of the process's on-CPU time. Time in
C (grpcio's core, protobuf's upb, chDB) is charged to the Python frame that called it, or,
with `native=True`, shown as C frames (py-spy then pauses each process for every sample, and
takes threads blocked in futex or epoll_wait for busy, so waits dominate those tables).

Each process gets two tables: the frames on CPU ("own", where the time is spent) and the
frames most often on the stack ("on stack": what the time is spent for), the latter without
the event loop's and the threads' own entry points, which are on every stack.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

RATE_HZ = 100
# Entry points on (nearly) every stack: they say nothing about where the time goes.
ROOTS = ("run (threading.py)", "_bootstrap (threading.py)", "_bootstrap_inner (threading.py)",
         "_run (asyncio/events.py)", "_run_once (asyncio/base_events.py)", "run_forever (asyncio/base_events.py)",
         "run_until_complete (asyncio/base_events.py)", "_worker (futures/thread.py)", "run (asyncio/runners.py)",
         "run (futures/thread.py)", "run (common/lifecycle.py)", "<module> (", "_run_module_as_main (",
         "_run_code (", "main (")


def find_py_spy() -> str | None:
    """py-spy beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame(text: str) -> str:
    """`function (path/to/module.py:123)` → `function (module.py)`: lines of one function add up."""
    name, _, where = text.rpartition(" (")
    if not name:
        return text
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    # Enough of the path to tell servers/common/telemetry.py from opentelemetry/.../telemetry.py.
    return f"{name} ({'/'.join(parts[-2:])})"


@dataclass
class ProcessProfile:
    name: str
    samples: int = 0
    # Leaf frames (the function on CPU, C time included) and inclusive frames (on the stack).
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)

    def add_raw(self, text: str) -> None:
        """py-spy's raw (collapsed) output: `frame;frame;...;leaf count` per line."""
        for line in text.splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_frame(f) for f in stack.split(";") if f]
            if not frames:
                continue
            self.samples += count
            self.own[frames[-1]] += count
            for frame in set(frames):
                self.inclusive[frame] += count


class Profiler:
    """py-spy on each of `pids` for `duration_s` from entering; `report` once it has exited."""

    def __init__(self, pids: Mapping[str, int], duration_s: float, binary: str | None = None,
                 native: bool = False) -> None:
        self._pids = dict(pids)
        self._native = native
        self._duration = max(1, round(duration_s))
        self._binary = binary or find_py_spy()
        self._tmp = tempfile.TemporaryDirectory(prefix="copilot-pyspy-")
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.profiles: dict[str, ProcessProfile] = {}
        self.errors: dict[str, str] = {}

    def __enter__(self) -> Profiler:
        if self._binary is None:
            raise RuntimeError("py-spy not found: pip install the py-spy pinned in requirements.lock")
        for name, pid in self._pids.items():
            out = Path(self._tmp.name) / f"{name}.txt"
            self._procs[name] = subprocess.Popen(
                [self._binary, "record", "--pid", str(pid), "--duration", str(self._duration),
                 "--rate", str(RATE_HZ), "--native" if self._native else "--nonblocking",
                 "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            for name, proc in self._procs.items():
                try:
                    _, stderr = proc.communicate(timeout=self._duration + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, stderr = proc.communicate()
                out = Path(self._tmp.name) / f"{name}.txt"
                if proc.returncode != 0 or not out.exists():
                    self.errors[name] = stderr.decode(errors="replace").strip()[-300:]
                    continue
                profile = ProcessProfile(name)
                profile.add_raw(out.read_text(errors="replace"))
                self.profiles[name] = profile
        finally:
            self._tmp.cleanup()

    def report(self, top: int = 8) -> list[str]:
        """Per process, as Markdown: the top `top` frames on CPU, and the top frames on the stack
        (entry points left out), each with its share of the process's samples."""
        lines: list[str] = []
        for name, profile in self.profiles.items():
            if not profile.samples:
                continue
            # Samples of all its threads: a thread py-spy takes for busy (e.g. one blocked in C)
            # adds samples too, so this is no measure of the process's CPU, only of its parts.
            lines.append(f"**{name}**: {profile.samples} samples (all threads) at {RATE_HZ}/s over {self._duration} s")
            lines.append("")
            on_stack = [(f, c) for f, c in profile.inclusive.most_common() if not f.startswith(ROOTS)][:top]
            lines.append("| own % | frame on CPU | | on stack % | frame on the stack |")
            lines.append("|---|---|---|---|---|")
            own = profile.own.most_common(top)
            for i in range(max(len(own), len(on_stack))):
                left = (f"{100 * own[i][1] / profile.samples:.1f}", f"`{own[i][0]}`") if i < len(own) else ("", "")
                right = ((f"{100 * on_stack[i][1] / profile.samples:.1f}", f"`{on_stack[i][0]}`")
                         if i < len(on_stack) else ("", ""))
                lines.append(f"| {left[0]} | {left[1]} | | {right[0]} | {right[1]} |")
            lines.append("")
        for name, error in self.errors.items():
            lines.append(f"{name}: py-spy failed: {error}")
        return lines

