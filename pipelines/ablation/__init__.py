"""Ablations as library code: the variants (data), running them on any data root, their table."""
