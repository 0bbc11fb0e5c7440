"""The CLI's section of the settings model (servers/common/settings.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from servers.common.settings import parse, setting, validate


@dataclass(frozen=True, slots=True)
class CliConfig:
    edge: str = setting("localhost:8080", env="COPILOT_EDGE",
                        doc="The edge the CLI calls (host:port); `copilot up` listens on COPILOT_EDGE_PORT.")

    def __post_init__(self) -> None:
        validate(self)


@functools.cache
def cli_config() -> CliConfig:
    """Read once per process."""
    return parse(CliConfig)
