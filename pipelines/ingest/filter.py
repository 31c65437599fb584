"""Stage `filter`: DuckDB SQL over LAION-style metadata -> URL shards, counting drops by reason.

Drops (paper §4.1 footnote): pwatermark > 0.5, punsafe > 0.5, width or height < 256; also empty
captions and non-http(s) URLs. Rules that must not depend on how the data is stored: invalid UTF-8
(bad_utf8), numbers that do not parse (bad_width, bad_punsafe, ...), NaN or NULL scores
(missing_score, or kept by `filter.missing_scores = "keep"`), each dropped per row with its reason.
A shard reads only its own rows, batch by batch, and DuckDB runs under a memory limit. Shards are fixed ranges of input rows, so changing a threshold
changes the content of exactly the shards whose rows it affects (and only their downloads re-run).
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.config import ConfigError, StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from storage import removals
from storage.fs import DataRoot, file_digest, open_url
from storage.manifest import InputRef, list_manifests, read_manifest
from storage.schemas import URL_SHARD

log = logging.getLogger(__name__)

# Column names across LAION releases, tried in order when the configured name is absent.
ALIASES = {
    "url": ("URL", "url", "image_url"),
    "caption": ("TEXT", "caption", "text", "CAPTION"),
    "width": ("WIDTH", "width"),
    "height": ("HEIGHT", "height"),
    "watermark": ("pwatermark", "PWATERMARK", "watermark"),
    "unsafe": ("punsafe", "PUNSAFE", "NSFW", "nsfw"),
    "similarity": ("similarity", "SIMILARITY", "clip_similarity"),
}
REQUIRED = ("url", "caption")


@dataclass(frozen=True)
class FilterConfig(StageConfig):
    """Which metadata rows go on to download."""

    EXECUTION_FIELDS = frozenset({"duckdb_memory_limit", "duckdb_temp_dir", "duckdb_threads"})

    metadata: str = ""  # metadata parquet file(s) or glob, relative to the data root or absolute/URL; "" = demo data
    shard_size: int = 10000  # input rows per URL shard
    max_pwatermark: float = 0.5  # drop rows with pwatermark above this
    max_punsafe: float = 0.5  # drop rows with punsafe above this (or NSFW == "NSFW" in LAION-400M)
    min_width: int = 256  # drop rows narrower than this
    min_height: int = 256  # drop rows shorter than this
    url_col: str = "URL"  # column names; "" = not present (that check is skipped)
    caption_col: str = "TEXT"
    width_col: str = "WIDTH"
    height_col: str = "HEIGHT"
    watermark_col: str = "pwatermark"
    unsafe_col: str = "punsafe"
    similarity_col: str = "similarity"
    missing_scores: str = "drop"  # NaN/NULL pwatermark or punsafe: "drop" (reason missing_score) or "keep"
    duckdb_memory_limit: str = "1GB"  # DuckDB's memory_limit; larger work spills to the temp dir
    duckdb_temp_dir: str = ""  # DuckDB's temp_directory; "" = <system temp>/racm3-duckdb
    duckdb_threads: int = 2  # DuckDB threads per shard

    def __post_init__(self) -> None:
        self.check(self.shard_size >= 1, "shard_size", "must be >= 1")
        for f in ("max_pwatermark", "max_punsafe"):
            self.check(0.0 <= getattr(self, f) <= 1.0, f, "must be in [0, 1]")
        self.check(self.min_width >= 0, "min_width", "must be >= 0")
        self.check(self.min_height >= 0, "min_height", "must be >= 0")
        self.check(bool(self.url_col), "url_col", "the URL column is required")
        self.check(bool(self.caption_col), "caption_col", "the caption column is required")
        self.check(self.missing_scores in ("drop", "keep"), "missing_scores", 'must be "drop" or "keep"')
        self.check(self.duckdb_threads >= 1, "duckdb_threads", "must be >= 1")


def metadata_files(root: DataRoot, cfg: FilterConfig) -> list[str]:
    """Absolute paths/URLs of the metadata parquet files (sorted, so row keys are stable)."""
    if not cfg.metadata:
        from pipelines.demo.paths import metadata_path

        path = metadata_path(root)
        if not root.exists(path):
            raise ConfigError("filter.metadata", f"no metadata given and no demo data at {path}; "
                              "run `racm3 run demo` or set filter.metadata")
        return [root.url(path)]  # a URL: the root may be an object store
    pattern = cfg.metadata if ("://" in cfg.metadata or cfg.metadata.startswith("/")) \
        else root.url(root.join(cfg.metadata))
    fs, p = open_url(pattern)
    files = sorted(fs.glob(p)) if any(c in p for c in "*?[") else ([p] if fs.exists(p) else [])
    if not files:
        raise ConfigError("filter.metadata", f"no metadata parquet found at {pattern}")
    return [f if "file" in fs.protocol else fs.unstrip_protocol(f) for f in files]


def file_indexes(root: DataRoot, files: list[str]) -> list[tuple[int, str]]:
    """(index, file) pairs where a file keeps the index its shards were made with.

    The index is part of every row key and shard id, so it must not move when metadata files
    are added: known files keep theirs (read from the filter manifests), new files get the next
    free ones in sorted order. A new file therefore adds shards and never renames done ones.
    """
    known: dict[str, int] = {}
    for m in list_manifests(root, "filter"):
        ref = m.inputs[0] if m.inputs else None
        if ref is not None and "file_index" in ref.detail:
            known.setdefault(ref.path, int(ref.detail["file_index"]))
    nxt = max(known.values(), default=-1) + 1
    out = []
    for path in files:
        rel = root.rel(path)
        if rel not in known:
            known[rel], nxt = nxt, nxt + 1
        out.append((known[rel], path))
    return out


def resolve_columns(names: list[str], cfg: FilterConfig, where: str) -> dict[str, str | None]:
    """Map logical columns to the file's columns, by config then by known aliases."""
    wanted = {"url": cfg.url_col, "caption": cfg.caption_col, "width": cfg.width_col,
              "height": cfg.height_col, "watermark": cfg.watermark_col,
              "unsafe": cfg.unsafe_col, "similarity": cfg.similarity_col}
    lower = {n.lower(): n for n in names}
    out: dict[str, str | None] = {}
    for logical, configured in wanted.items():
        if configured == "":
            out[logical] = None
            continue
        candidates = (configured, *ALIASES[logical])
        found = next((c for c in candidates if c in names), None) or next(
            (lower[c.lower()] for c in candidates if c.lower() in lower), None)
        if found is None:
            field = f"filter.{logical}_col" if logical != "watermark" else "filter.watermark_col"
            if logical in REQUIRED or logical in ("width", "height"):
                raise ConfigError(field, f"column {configured!r} not found in {where}; columns "
                                  f"found: {', '.join(names)}. Set {field} to the right name"
                                  + ("" if logical in REQUIRED else ' or "" to skip this check'))
            log.warning("%s: no %s column (tried %s); that filter is skipped", where, logical,
                        ", ".join(candidates))
        out[logical] = found
    return out


def _q(col: str) -> str:
    return '"' + col.replace('"', '""') + '"'


TEXT_COLS = ("url", "caption")
INT_COLS = ("width", "height")
SCORE_COLS = ("watermark", "unsafe", "similarity")
OUT_NAME = {"watermark": "pwatermark", "unsafe": "punsafe"}  # URL_SHARD column of a logical one


def _parsed(logical: str, present: bool, text_nsfw: bool) -> str:
    """SQL of one numeric column as its number, NULL when absent or unparsable (see `bad_*`)."""
    if not present:
        return "CAST(NULL AS DOUBLE)"
    c = _q(logical)
    if logical in INT_COLS:  # "300", 300.0 and 300 alike; NaN, inf and "abc" do not parse
        return f"TRY_CAST(TRY_CAST({c} AS DOUBLE) AS BIGINT)"
    if text_nsfw:  # LAION-400M's NSFW tags; a number in the same column still counts as a score
        return (f"CASE upper(trim(CAST({c} AS VARCHAR))) WHEN 'NSFW' THEN 1.0 WHEN 'UNSURE' "
                f"THEN 0.5 WHEN 'UNLIKELY' THEN 0.0 ELSE TRY_CAST({c} AS DOUBLE) END")
    return f"TRY_CAST({c} AS DOUBLE)"


def classify_sql(present: dict[str, bool], text_nsfw: bool, drop_missing: bool) -> str:
    """One row per input row with its drop reason (NULL = kept); the first failing rule wins.

    NaN and NULL scores meet one explicit rule (`missing_score`) before any comparison, so the
    outcome never depends on how a comparison with NaN is folded over row-group statistics.
    """
    parsed = {c: _parsed(c, present[c], text_nsfw and c == "unsafe") for c in (*INT_COLS, *SCORE_COLS)}
    bad = " ".join(f"WHEN {_q(c)} IS NOT NULL AND p_{c} IS NULL THEN 'bad_{OUT_NAME.get(c, c)}'"
                   for c in (*INT_COLS, *SCORE_COLS) if present[c])
    scored = [c for c in ("watermark", "unsafe") if present[c]]
    missing = " OR ".join(f"p_{c} IS NULL OR isnan(p_{c})" for c in scored) or "false"
    def above(c: str, limit: str) -> str:
        return f"(p_{c} > {limit} AND NOT isnan(p_{c}))"
    return f"""
    WITH src AS (
      SELECT *, CAST(url AS VARCHAR) AS url_s, CAST(caption AS VARCHAR) AS caption_s,
             {', '.join(f'{parsed[c]} AS p_{c}' for c in parsed)}
      FROM raw
    )
    SELECT row, url_s AS url, caption_s AS caption, p_width AS width, p_height AS height,
           CASE WHEN isnan(p_watermark) THEN NULL ELSE p_watermark END AS pwatermark,
           CASE WHEN isnan(p_unsafe) THEN NULL ELSE p_unsafe END AS punsafe,
           CASE WHEN isnan(p_similarity) THEN NULL ELSE p_similarity END AS similarity,
           ({missing}) AS missing_score,
      CASE
        WHEN bad_utf8 THEN 'bad_utf8'
        WHEN url_s IS NULL OR NOT regexp_matches(lower(trim(url_s)), '^https?://') THEN 'bad_url'
        WHEN caption_s IS NULL OR trim(caption_s) = '' THEN 'empty_caption'
        {bad}
        WHEN {'true' if drop_missing else 'false'} AND ({missing}) THEN 'missing_score'
        WHEN {above('watermark', '$max_pwatermark')} THEN 'watermark'
        WHEN {above('unsafe', '$max_punsafe')} THEN 'unsafe'
        WHEN p_width < $min_width OR p_height < $min_height THEN 'too_small'
      END AS reason
    FROM src
    """


def valid_utf8(col: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(the column as strings with invalid UTF-8 values nulled, a mask of those rows).

    Parquet readers differ here (DuckDB fails the whole file, pyarrow passes the bytes on), so
    the check is ours: the fast whole-column validation first, per value only when it fails.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
            or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        return arr, pa.array([False] * n)  # numbers etc.: the SQL casts them
    binary = arr.view(pa.large_binary() if "large" in str(arr.type) else pa.binary())
    try:
        as_text = binary.view(pa.large_string() if "large" in str(arr.type) else pa.string())
        as_text.validate(full=True)
        return as_text, pa.array([False] * n)
    except pa.ArrowInvalid:
        pass
    values, bad = [], []
    for v in binary.to_pylist():
        try:
            values.append(None if v is None else v.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            values.append(None)
            bad.append(True)
    return pa.array(values, pa.string()), pa.array(bad)


def read_rows(fs: Any, path: str, cols: dict[str, str | None], start: int, stop: int,
              batch_rows: int = 65536) -> pa.Table:
    """Rows [start, stop) of the file's needed columns, streamed batch by batch (never the file)."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        names = {logical: c for logical, c in cols.items() if c is not None}
        batches, pos = [], first or 0
        if groups:
            for b in pf.iter_batches(batch_size=batch_rows, row_groups=groups,
                                     columns=list(dict.fromkeys(names.values()))):
                lo, hi = max(start - pos, 0), min(stop - pos, b.num_rows)
                if hi > lo:
                    batches.append(b.slice(lo, hi - lo))
                pos += b.num_rows
    table = pa.Table.from_batches(batches) if batches else None
    n = table.num_rows if table is not None else 0
    out: dict[str, Any] = {"row": pa.array(range(start, start + n), pa.int64())}
    bad = pa.array([False] * n)
    for logical in (*TEXT_COLS, *INT_COLS, *SCORE_COLS):
        c = names.get(logical)
        if c is None or table is None:
            out[logical] = pa.nulls(n, pa.string() if logical in TEXT_COLS else pa.float64())
            continue
        if logical in TEXT_COLS:
            out[logical], mask = valid_utf8(table[c])
            bad = pa.compute.or_(bad, mask)
        else:
            out[logical] = table[c]
    out["bad_utf8"] = bad
    return pa.table(out)


def connect_duckdb(cfg: FilterConfig) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection bounded by `filter.duckdb_memory_limit`, spilling to the temp dir."""
    temp = cfg.duckdb_temp_dir or os.path.join(tempfile.gettempdir(), "racm3-duckdb")
    os.makedirs(temp, exist_ok=True)
    return duckdb.connect(config={"memory_limit": cfg.duckdb_memory_limit,
                                  "temp_directory": temp, "threads": cfg.duckdb_threads})


def filter_rows(path: str, file_idx: int, start: int, stop: int, cfg: FilterConfig,
                cols: dict[str, str | None]) -> tuple[pa.Table, dict[str, int], int, int]:
    """Filter rows [start, stop) of one metadata file.

    Returns (kept rows, drops by reason, rows in, kept rows with a missing score).
    """
    fs, p = open_url(path)
    raw = read_rows(fs, p, cols, start, stop)
    present = {c: cols[c] is not None for c in (*INT_COLS, *SCORE_COLS)}
    text_nsfw = present["unsafe"] and (pa.types.is_string(raw["unsafe"].type)
                                       or pa.types.is_large_string(raw["unsafe"].type))
    params = {"max_pwatermark": cfg.max_pwatermark, "max_punsafe": cfg.max_punsafe,
              "min_width": cfg.min_width, "min_height": cfg.min_height}
    con = connect_duckdb(cfg)
    try:
        con.register("raw", raw)
        sql = classify_sql(present, text_nsfw, cfg.missing_scores == "drop")
        con.execute(f"CREATE TEMP TABLE classified AS {sql}", params).fetchall()
        dropped = dict(con.execute("SELECT reason, count(*) FROM classified WHERE reason IS NOT "
                                   "NULL GROUP BY reason ORDER BY reason").fetchall())
        [(kept_missing,)] = con.execute("SELECT count(*) FROM classified WHERE reason IS NULL "
                                        "AND missing_score").fetchall()
        kept = con.sql(
            "SELECT printf('%03d-%09d', $f, row) AS key, url, caption, width, height, pwatermark, "
            "punsafe, similarity FROM classified WHERE reason IS NULL ORDER BY row",
            params={"f": file_idx}).to_arrow_table()
    finally:
        con.close()
    return kept.cast(URL_SHARD), dropped, raw.num_rows, int(kept_missing)


def drop_removed(table: pa.Table, rs: removals.RemovalSet, dropped: dict[str, int]) -> pa.Table:
    """Rows taken out on request (key, URL or domain), counted under the reason "removed"."""
    if not rs or not table.num_rows:
        return table
    keep = [not rs.row_removed(k, u) for k, u in zip(table["key"].to_pylist(),
                                                      table["url"].to_pylist(), strict=True)]
    n = keep.count(False)
    if n:
        dropped["removed"] = dropped.get("removed", 0) + n
    return table.filter(pa.array(keep, pa.bool_()))


def file_columns(path: str) -> list[str]:
    fs, p = open_url(path)
    with fs.open(p, "rb") as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


class FilterStage(Stage):
    name = "filter"
    version = "1"
    config = FilterConfig
    description = "drop watermarked, unsafe, small, captionless and non-http rows (DuckDB)"

    def plan(self, root: DataRoot, cfg: FilterConfig) -> list[ShardSpec]:
        specs = []
        # the removal list is an input of every shard: a removal recomputes filter, and the
        # shards whose rows it drops change digest, so exactly their descendants follow
        rs = removals.removal_set(root)
        removals_ref = (InputRef(removals.PATH, "sha256:" + rs.digest),) if rs.digest else ()
        for file_idx, path in file_indexes(root, metadata_files(root, cfg)):
            resolve_columns(file_columns(path), cfg, path)  # a missing column: ConfigError (exit 2) now
            ref = self._input_ref(root, path)
            fs, p = open_url(path)
            with fs.open(p, "rb") as f:
                n_rows = pq.ParquetFile(f).metadata.num_rows
            for chunk, start in enumerate(range(0, max(n_rows, 1), cfg.shard_size)):
                stop = min(start + cfg.shard_size, n_rows)
                detail = {"file_index": file_idx, "row_start": start, "row_stop": stop}
                sid = f"{file_idx:03d}-{chunk:05d}"
                specs.append(ShardSpec(self.name, sid, (InputRef(ref.path, ref.digest, ref.stage,
                                                                 ref.shard_id, detail),
                                                        *removals_ref)))
        return specs

    def _input_ref(self, root: DataRoot, path: str) -> InputRef:
        rel = root.rel(path)
        if rel.startswith("demo/"):
            m = read_manifest(root, "demo", "laion")
            if m is not None and rel in m.outputs:
                return InputRef(rel, m.outputs[rel], "demo", "laion")
        fs, p = open_url(path)
        return InputRef(rel, file_digest(fs, p))

    def run_shard(self, ctx: ShardContext, resources: object) -> ShardResult:
        d = ctx.spec.inputs[0].detail
        path = ctx.input_path(0)
        cols = resolve_columns(file_columns(path), ctx.cfg, path)
        table, dropped, n_in, kept_missing = filter_rows(path, d["file_index"], d["row_start"],
                                                         d["row_stop"], ctx.cfg, cols)
        table = drop_removed(table, removals.removal_set(ctx.root), dropped)
        ctx.write_table(table)
        log.info("filter %s: %d -> %d rows", posixpath.basename(ctx.spec.shard_id), n_in, table.num_rows)
        return ShardResult(rows_in=n_in, rows_out=table.num_rows, dropped=dropped,
                           metrics={"kept_missing_score": kept_missing})
