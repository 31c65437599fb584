"""Evaluation: generation, metrics, the evaluate stage and its report."""
