"""Stage `filter`: DuckDB SQL over LAION-style metadata -> URL shards, counting drops by reason.

Drops (paper §4.1 footnote): pwatermark > 0.5, punsafe > 0.5, width or height < 256; also empty
captions and non-http(s) URLs. Shards are fixed ranges of input rows, so changing a threshold
changes the content of exactly the shards whose rows it affects (and only their downloads re-run).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.config import ConfigError, StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from storage.fs import DataRoot, file_digest, open_url
from storage.manifest import InputRef, read_manifest
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

    def __post_init__(self) -> None:
        self.check(self.shard_size >= 1, "shard_size", "must be >= 1")
        for f in ("max_pwatermark", "max_punsafe"):
            self.check(0.0 <= getattr(self, f) <= 1.0, f, "must be in [0, 1]")
        self.check(self.min_width >= 0, "min_width", "must be >= 0")
        self.check(self.min_height >= 0, "min_height", "must be >= 0")
        self.check(bool(self.url_col), "url_col", "the URL column is required")
        self.check(bool(self.caption_col), "caption_col", "the caption column is required")


def metadata_files(root: DataRoot, cfg: FilterConfig) -> list[str]:
    """Absolute paths/URLs of the metadata parquet files (sorted, so row keys are stable)."""
    if not cfg.metadata:
        from pipelines.demo.paths import metadata_path

        path = metadata_path(root)
        if not root.exists(path):
            raise ConfigError("filter.metadata", f"no metadata given and no demo data at {path}; "
                              "run `racm3 run demo` or set filter.metadata")
        return [path]
    pattern = cfg.metadata if ("://" in cfg.metadata or cfg.metadata.startswith("/")) \
        else root.join(cfg.metadata)
    fs, p = open_url(pattern)
    files = sorted(fs.glob(p)) if any(c in p for c in "*?[") else ([p] if fs.exists(p) else [])
    if not files:
        raise ConfigError("filter.metadata", f"no metadata parquet found at {pattern}")
    return [f if fs is root.fs or "file" in fs.protocol else fs.unstrip_protocol(f) for f in files]


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


def _q(col: str | None) -> str:
    assert col is not None, "required column resolved"
    return '"' + col.replace('"', '""') + '"'


def select_sql(cols: dict[str, str | None], unsafe_is_text: bool) -> str:  # noqa: D401
    """One row per input row with its drop reason (NULL = kept); the first failing rule wins."""
    def col(name: str, cast: str) -> str:
        c = cols[name]
        return f"TRY_CAST({_q(c)} AS {cast})" if c else f"CAST(NULL AS {cast})"

    unsafe = (f"CASE WHEN upper(CAST({_q(cols['unsafe'])} AS VARCHAR)) = 'NSFW' THEN 1.0 ELSE 0.0 END"
              if unsafe_is_text else col("unsafe", "FLOAT"))
    return f"""
    WITH src AS (
      SELECT file_row_number AS row, CAST({_q(cols['url'])} AS VARCHAR) AS url,
             CAST({_q(cols['caption'])} AS VARCHAR) AS caption,
             {col('width', 'BIGINT')} AS width, {col('height', 'BIGINT')} AS height,
             {col('watermark', 'FLOAT')} AS pwatermark, {unsafe} AS punsafe,
             {col('similarity', 'FLOAT')} AS similarity
      FROM read_parquet($path, file_row_number = true)
      WHERE file_row_number >= $start AND file_row_number < $stop
    )
    SELECT *, CASE
        WHEN url IS NULL OR NOT regexp_matches(lower(trim(url)), '^https?://') THEN 'bad_url'
        WHEN caption IS NULL OR trim(caption) = '' THEN 'empty_caption'
        WHEN pwatermark > $max_pwatermark THEN 'watermark'
        WHEN punsafe > $max_punsafe THEN 'unsafe'
        WHEN width < $min_width OR height < $min_height THEN 'too_small'
      END AS reason
    FROM src ORDER BY row
    """


def filter_rows(path: str, file_idx: int, start: int, stop: int, cfg: FilterConfig,
                fs_register: object | None = None) -> tuple[pa.Table, dict[str, int], int]:
    """Filter rows [start, stop) of one metadata file; returns (kept rows, drops by reason, rows in)."""
    con = duckdb.connect()
    if fs_register is not None:
        con.register_filesystem(fs_register)
    names = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet($p)", {"p": path}).fetchall()]
    cols = resolve_columns(names, cfg, path)
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet($p))",
                             {"p": path}).fetchall())
    unsafe_is_text = bool(cols["unsafe"]) and types.get(cols["unsafe"], "") == "VARCHAR"
    params = {"path": path, "start": start, "stop": stop, "max_pwatermark": cfg.max_pwatermark,
              "max_punsafe": cfg.max_punsafe, "min_width": cfg.min_width,
              "min_height": cfg.min_height}
    rel = con.sql(select_sql(cols, unsafe_is_text), params=params).to_arrow_table()
    reasons = rel["reason"].to_pylist()
    dropped: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            dropped[r] = dropped.get(r, 0) + 1
    kept = rel.filter(pa.compute.is_null(rel["reason"]))
    keys = pa.array([f"{file_idx:03d}-{r:09d}" for r in kept["row"].to_pylist()], pa.string())
    table = pa.table({"key": keys, **{n: kept[n] for n in URL_SHARD.names if n != "key"}})
    return table.cast(URL_SHARD), dropped, rel.num_rows


class FilterStage(Stage):
    name = "filter"
    version = "1"
    config = FilterConfig
    description = "drop watermarked, unsafe, small, captionless and non-http rows (DuckDB)"

    def plan(self, root: DataRoot, cfg: FilterConfig) -> list[ShardSpec]:
        specs = []
        for file_idx, path in enumerate(metadata_files(root, cfg)):
            ref = self._input_ref(root, path)
            fs, p = open_url(path)
            with fs.open(p, "rb") as f:
                n_rows = pq.ParquetFile(f).metadata.num_rows
            for chunk, start in enumerate(range(0, max(n_rows, 1), cfg.shard_size)):
                stop = min(start + cfg.shard_size, n_rows)
                detail = {"file_index": file_idx, "row_start": start, "row_stop": stop}
                sid = f"{file_idx:03d}-{chunk:05d}"
                specs.append(ShardSpec(self.name, sid, (InputRef(ref.path, ref.digest, ref.stage,
                                                                 ref.shard_id, detail),)))
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
        fs, _ = open_url(path)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        table, dropped, n_in = filter_rows(path, d["file_index"], d["row_start"], d["row_stop"],
                                           ctx.cfg, None if local else fs)
        ctx.write_table(table)
        log.info("filter %s: %d -> %d rows", posixpath.basename(ctx.spec.shard_id), n_in, table.num_rows)
        return ShardResult(rows_in=n_in, rows_out=table.num_rows, dropped=dropped)
