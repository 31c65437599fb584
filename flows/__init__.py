"""Prefect flows (thin: build config, call the stage, return what ran) and the racm3 CLI."""
