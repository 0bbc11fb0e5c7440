"""Metered billing: usage reported to Stripe, and its reconciliation."""
