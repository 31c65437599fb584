"""Generated embedding shards for the index benchmarks: written through the shard contract as the
embed stage would (its schema, its encoder metrics), without importing torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard
from storage.fs import DataRoot


class _Fixed(Stage):
    name, version = "embed", "bench"

    def __init__(self, table: pa.Table, model: str):
        self.table, self.model = table, model

    def run_shard(self, ctx: Any, resources: Any) -> ShardResult:
        ctx.write_table(self.table)
        dim = self.table.schema.field("doc_emb").type.list_size
        return ShardResult(self.table.num_rows, self.table.num_rows, metrics={
            "encoder": "bench@0", "model": self.model, "checkpoint": "none", "dim": dim})


def write_embed_shard(root: DataRoot, shard_id: str, keys: list[str], x: np.ndarray,
                      model: str = "bench") -> None:
    """One `embed/<shard_id>` shard whose doc_emb rows are `x` (N, D) float32 (text/image zero)."""
    n, d = x.shape
    vec = pa.list_(pa.float32(), d)
    schema = pa.schema([("key", pa.string()), ("sha256", pa.string()), ("text_emb", vec),
                        ("image_emb", vec), ("doc_emb", vec)])
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), d)
    zero = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * d, np.float32)), d)
    t = pa.Table.from_arrays([pa.array(keys), pa.array([""] * n), zero, zero, col], schema=schema)
    execute_shard(_Fixed(t, model), root, None, ShardSpec("embed", shard_id, ()))
