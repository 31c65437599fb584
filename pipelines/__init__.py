"""Pipeline stages: one module per stage, each a pure function over shards."""
