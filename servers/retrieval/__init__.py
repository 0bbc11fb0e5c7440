"""Retrieval service: tenant-isolated document ingest, chunking and search."""
