"""The embedded demo: generated data, its local server, and the tiny fitted models."""
