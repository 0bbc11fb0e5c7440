"""Plumbing shared by every server: settings, identity, errors, interceptors, health,
reflection, telemetry, logging and the server lifecycle."""
