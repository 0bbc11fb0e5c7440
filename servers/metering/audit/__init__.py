"""The audit trail: its hash chain, its store (durable log, then ClickHouse) and AuditService."""
