"""`copilot eval-answers`: precision/recall of the groundedness scorer's "unsupported" flag on a
labelled set built from ObliQA dev (docs/groundedness.md).

The scorer is the generation service's own; the CLI never imports a service's internals, so the
measurement runs as that service's module in a child process (same interpreter, same tree)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from servers.common.settings import Settings

MODULE = "servers.generation.grounding_eval"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "obliqa-dev"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("eval-answers", help="precision/recall of the 'unsupported sentence' flag (ObliQA dev)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="ObliQA dev in BEIR layout")
    parser.add_argument("--passages", type=int, default=1500, help="answer passages to build the set from")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    argv = ["--data", args.data, "--passages", str(args.passages), *(["--json"] if args.json else [])]
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", MODULE, *argv,
                                                   cwd=str(ROOT))
    return await process.wait()
