"""A durable local outbox: events for Metering (usage, audit) that must arrive exactly once
(`Outbox`, the public API)."""

from servers.common.outbox.dispatcher import Outbox

__all__ = ["Outbox"]
