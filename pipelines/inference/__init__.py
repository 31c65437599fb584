"""The inference layer under evaluation and generation: loading, sampling, scoring."""
