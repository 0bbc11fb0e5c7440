"""Usage events: their domain, validation, quotas, prices, the stores that keep them and MeteringService."""
