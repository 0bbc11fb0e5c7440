"""Storage engines shared by usage and audit: ClickHouse, the durable log and its flusher, SQLite, the
data directory lock."""
