"""What a trained RA-CM3 can do (paper §5): generation, infilling, controlled generation,
few-shot classification, ensembles over retrieved documents and guided decoding."""
