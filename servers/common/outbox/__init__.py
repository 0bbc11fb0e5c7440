"""A durable local outbox: events for Metering (usage, audit) that must arrive exactly once.

`journal` keeps the events on disk (fsync'd files, read back after a restart); `dispatcher`
delivers them (`Outbox`, the public API, unchanged for its users).
"""

from servers.common.outbox.dispatcher import Outbox

__all__ = ["Outbox"]
