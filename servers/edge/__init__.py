"""Envoy's companions: the rate limit service, aggregated health and reflection, the
Envoy config renderer and the dev token issuer."""
