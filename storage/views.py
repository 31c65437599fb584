"""DuckDB over the data root: one view per stage (its committed Parquet shards) plus `manifests`."""

from __future__ import annotations

import json
import logging

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import DataRoot
from storage.manifest import list_manifests

log = logging.getLogger("racm3")

MANIFEST_COLUMNS = ("stage", "shard_id", "stage_version", "fingerprint", "params_hash",
                    "code_version", "rows_in", "rows_out", "output_digest", "flow_run_id",
                    "created_at")


def shard_files(root: DataRoot, check: bool = False) -> dict[str, list[str]]:
    """stage -> URLs of its Parquet shards that have a manifest (a shard without one does not
    exist). With `check`, a shard whose Parquet footer cannot be read is left out, with a warning."""
    out: dict[str, list[str]] = {}
    for m in list_manifests(root):
        for rel in m.outputs:
            if rel.endswith(".parquet") and rel.count("/") == 1:
                if check and not readable(root, root.join(rel)):
                    continue
                out.setdefault(m.stage, []).append(root.url(root.join(rel)))
    return {k: sorted(v) for k, v in out.items()}


def readable(root: DataRoot, path: str) -> bool:
    """The footer reads (a truncated or missing shard fails here, cheaply: one small read)."""
    try:
        with root.fs.open(path, "rb") as f:
            pq.read_metadata(f)
        return True
    except (OSError, pa.ArrowException) as e:
        log.warning("skipping unreadable shard %s (%s); `racm3 verify` marks it for recompute",
                    root.rel(path), str(e).splitlines()[0][:120])
        return False


def manifests_table(root: DataRoot) -> pa.Table:
    rows = []
    for m in list_manifests(root):
        d = {c: getattr(m, c) for c in MANIFEST_COLUMNS}
        d.update(dropped=json.dumps(m.dropped, sort_keys=True),
                 metrics=json.dumps(m.metrics, sort_keys=True, default=str),
                 inputs=json.dumps([i.path for i in m.inputs]),
                 outputs=json.dumps(sorted(m.outputs)),
                 seconds=float(m.timings.get("total_s", 0.0)))
        rows.append(d)
    schema = pa.schema([("stage", pa.string()), ("shard_id", pa.string()),
                        ("stage_version", pa.string()), ("fingerprint", pa.string()),
                        ("params_hash", pa.string()), ("code_version", pa.string()),
                        ("rows_in", pa.int64()), ("rows_out", pa.int64()),
                        ("output_digest", pa.string()), ("flow_run_id", pa.string()),
                        ("created_at", pa.float64()), ("dropped", pa.string()),
                        ("metrics", pa.string()), ("inputs", pa.string()),
                        ("outputs", pa.string()), ("seconds", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def connect(root: DataRoot) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a view per stage and `manifests`; reads files in place."""
    con = duckdb.connect()
    if not root.is_local:
        con.register_filesystem(root.fs)
    for stage, files in shard_files(root, check=True).items():
        # No SQL text is built from the data root: the view name and the file list go to DuckDB
        # as values (the manifest loader has also checked that the stage is a plain name).
        rel = con.read_parquet(files, union_by_name=True, filename=True)
        rel.create_view(stage)
    con.register("manifests_arrow", manifests_table(root))
    con.execute("CREATE VIEW manifests AS SELECT * FROM manifests_arrow")
    return con


def views(root: DataRoot) -> list[str]:
    return ["manifests", *shard_files(root)]
