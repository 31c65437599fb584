"""Ingest stages: metadata filtering and image download."""
