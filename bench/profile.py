"""Where the mesh's CPU goes: py-spy (pinned in requirements.lock) sampling each Python process
of the mesh while a load runs, summarised as the top frames per process.

    with Profiler({"generation": pid, ...}, duration_s=10) as profiler:
        ...  # the load
    for line in profiler.report(top=8): print(line)

py-spy runs `--nonblocking` (it reads the processes' memory without pausing them, so the load
is barely disturbed; a sample is now and then inconsistent) at 100 samples/s, idle threads
left out, so a frame's share of samples is its share of the process's on-CPU time. Time in
C (grpcio's core, protobuf's upb, chDB) is charged to the Python frame that called it.
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

    def __init__(self, pids: Mapping[str, int], duration_s: float, binary: str | None = None) -> None:
        self._pids = dict(pids)
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
                 "--rate", str(RATE_HZ), "--nonblocking", "--format", "raw", "--output", str(out)],
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
        """Per process: the top `top` frames by own samples (with their inclusive share), as Markdown."""
        lines: list[str] = []
        for name, profile in self.profiles.items():
            lines.append(f"**{name}** ({profile.samples} samples at {RATE_HZ}/s over {self._duration} s)")
            lines.append("")
            lines.append("| own % | on stack % | frame |")
            lines.append("|---|---|---|")
            for frame, count in profile.own.most_common(top):
                lines.append(f"| {100 * count / profile.samples:.1f} | "
                             f"{100 * profile.inclusive[frame] / profile.samples:.1f} | `{frame}` |")
            lines.append("")
        for name, error in self.errors.items():
            lines.append(f"{name}: py-spy failed: {error}")
        return lines

    def top_inclusive(self, name: str, top: int = 15) -> list[tuple[str, float]]:
        """The frames most often on the stack of process `name`, with their share of its samples."""
        profile = self.profiles[name]
        return [(frame, count / profile.samples) for frame, count in profile.inclusive.most_common(top)]
