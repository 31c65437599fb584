"""Parquet shard IO: written to a temporary name and renamed into place; read through fsspec."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import DataRoot

ROW_GROUP_SIZE = 1024


def write_table_tmp(root: DataRoot, final_path: str, table: pa.Table) -> str:
    """Write `table` next to `final_path` under a temp name; the caller commits it."""
    root.makedirs(final_path.rsplit("/", 1)[0])
    tmp = root.tmp_name(final_path)
    with root.fs.open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    return tmp


def write_table(root: DataRoot, path: str, table: pa.Table) -> None:
    """Atomic Parquet write (temp name, then rename)."""
    root.commit(write_table_tmp(root, path, table), path)


def read_table(root: DataRoot, path: str, columns: list[str] | None = None) -> pa.Table:
    with root.fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def shard_path(root: DataRoot, stage: str, shard_id: str) -> str:
    return root.artifact(stage, shard_id, "parquet")
