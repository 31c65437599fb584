"""An existing img2dataset download as the download stage's source (`download.import_from`).

img2dataset writes, per shard `NNNNN`: `NNNNN.parquet` (parquet output: every row, with the image
bytes in a `jpg`/`png`/`webp` column; webdataset output: the metadata of every row beside
`NNNNN.tar`, whose members are `<key>.<ext>`), and `NNNNN_stats.json` once the shard is complete.
Rows are matched to a URL shard by URL; an imported success goes through the same checks as
fetched bytes (byte cap, header pixel cap, decode, min size: `ImageResizer`), an imported failure
keeps its status and error, and URLs the import lacks are left to the caller (fetch or `missing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.config import ConfigError
from pipelines.ingest.fetch import Refused
from pipelines.ingest.images import ImageResizer, header_size
from storage.schemas import SUCCESS

log = logging.getLogger(__name__)
FIELD = "download.import_from"
IMAGE_COLS = ("jpg", "png", "webp")  # img2dataset's encode_format values: the image column's name
# column -> accepted Arrow type predicate; what every img2dataset shard parquet carries
REQUIRED = {"url": pa.types.is_string, "key": pa.types.is_string, "status": pa.types.is_string,
            "error_message": pa.types.is_string}
OPTIONAL = {"sha256": pa.types.is_string, "original_width": pa.types.is_integer,
            "original_height": pa.types.is_integer, **{c: pa.types.is_binary for c in IMAGE_COLS}}
MISSING = "missing"  # status of a URL the import lacks when `download.fetch_missing = false`


@dataclass(frozen=True)
class ImportShard:
    """One img2dataset shard: its row parquet, its tar (webdataset output) and its stats."""

    parquet: str
    tar: str | None
    image_col: str | None  # the parquet's image column (parquet output), else None
    stats: dict[str, Any] | None


@dataclass(frozen=True)
class ImportSource:
    """A checked img2dataset output folder."""

    folder: str
    shards: tuple[ImportShard, ...]
    digest: str  # names, sizes and stats of its files (not every byte: downloads are terabytes)


def _fs(folder: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(folder)


def check_columns(schema: pa.Schema, where: str) -> str | None:
    """The image column's name (None for a webdataset sidecar); a foreign column: ConfigError."""
    for col, ok in {**REQUIRED, **OPTIONAL}.items():
        typ = schema.field(col).type if col in schema.names else None
        if typ is not None and not (ok(typ) or pa.types.is_null(typ)):  # all-null: harmless
            raise ConfigError(FIELD, f"{where}: column {col!r} is {typ}, not "
                              "what img2dataset writes; is this an img2dataset output folder?")
    for col in REQUIRED:
        if col not in schema.names:
            raise ConfigError(FIELD, f"{where}: no column {col!r} (columns: {', '.join(schema.names)})"
                              "; not an img2dataset output shard (url, key, status, error_message)")
    images = [c for c in IMAGE_COLS if c in schema.names]
    return images[0] if images else None


def scan(folder: str) -> ImportSource:
    """Every shard of the folder, its columns checked; no shard at all is an error too."""
    fs, base = _fs(folder)
    if not fs.isdir(base):
        raise ConfigError(FIELD, f"{folder} is not a folder (img2dataset's output_folder)")
    names = sorted(posixpath.basename(p) for p in fs.ls(base, detail=False))
    shards, h = [], hashlib.sha256()
    for name in (n for n in names if n.endswith(".parquet")):
        shard = _shard(fs, base, name, names)
        shards.append(shard)
        for p in (shard.parquet, shard.tar):
            if p:
                h.update(f"{posixpath.basename(p)}:{fs.size(p)}\n".encode())
        h.update(json.dumps(shard.stats, sort_keys=True).encode())
    if not shards:
        raise ConfigError(FIELD, f"no img2dataset shard (NNNNN.parquet) in {folder}")
    return ImportSource(folder, tuple(shards), "sha256:" + h.hexdigest())


def _shard(fs: fsspec.AbstractFileSystem, base: str, name: str, names: list[str]) -> ImportShard:
    """One shard's files, as URLs (the folder may be on an object store), its columns checked."""
    stem = name.removesuffix(".parquet")
    def url(n: str) -> str:
        p = posixpath.join(base, n)
        return p if "file" in fs.protocol else fs.unstrip_protocol(p)
    with fs.open(posixpath.join(base, name), "rb") as f:
        pf = pq.ParquetFile(f)
        image_col, n_rows = check_columns(pf.schema_arrow, url(name)), pf.metadata.num_rows
    tar = url(f"{stem}.tar") if f"{stem}.tar" in names else None
    if image_col is None and tar is None:
        raise ConfigError(FIELD, f"{url(name)}: no image column ({', '.join(IMAGE_COLS)}) and no "
                          f"{stem}.tar beside it; only parquet and webdataset outputs import")
    stats = _stats(fs, posixpath.join(base, f"{stem}_stats.json"), names)
    if stats and stats.get("count", n_rows) != n_rows:
        log.warning("%s: %d rows, its _stats.json counts %d", url(name), n_rows, stats["count"])
    return ImportShard(url(name), tar, image_col, stats)


def _stats(fs: fsspec.AbstractFileSystem, path: str, names: list[str]) -> dict[str, Any] | None:
    """img2dataset's per-shard stats, where present (absent: the shard may not have finished)."""
    if posixpath.basename(path) not in names:
        log.warning("%s missing: that img2dataset shard may be incomplete; its rows are used", path)
        return None
    with fs.open(path, "r") as f:
        try:
            stats = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(FIELD, f"{path} is not JSON: {e}") from e
    return {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")
            if k in stats}


def _rows(shard: ImportShard, urls: pa.Array) -> list[dict[str, Any]]:
    """The shard's rows whose URL is among `urls`, with their row number (images not read)."""
    fs, path = _fs(shard.parquet)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in (*REQUIRED, "sha256", "original_width", "original_height")
                if c in pf.schema_arrow.names]
        t = pf.read(columns=cols)
    t = t.append_column("row", pa.array(range(t.num_rows), pa.int64()))
    return t.filter(pc.is_in(t["url"], value_set=urls)).to_pylist()


def match(source: ImportSource, urls: list[str]) -> dict[str, tuple[ImportShard, dict[str, Any]]]:
    """URL -> (shard, row) for the URLs the import holds; a success wins over a failure."""
    want = pa.array(sorted(set(urls)), pa.string())
    found: dict[str, tuple[ImportShard, dict[str, Any]]] = {}
    for shard in source.shards:
        for row in _rows(shard, want):
            old = found.get(row["url"])
            if old is None or (old[1]["status"] != SUCCESS and row["status"] == SUCCESS):
                found[row["url"]] = (shard, row)
    return found


def parquet_images(shard: ImportShard, rows: list[int]) -> dict[int, bytes | None]:
    """Row number -> image bytes, reading only the row groups that hold the rows."""
    fs, path = _fs(shard.parquet)
    out: dict[int, bytes | None] = {}
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            wanted = [r for r in rows if start <= r < start + n]
            if wanted:
                col = pf.read_row_group(g, columns=[shard.image_col])[0]
                out.update({r: col[r - start].as_py() for r in wanted})
            start += n
    return out


def tar_images(shard: ImportShard, keys: set[str], max_bytes: int) -> dict[str, bytes | Refused]:
    """img2dataset key -> the bytes of its `<key>.<ext>` member (regular files only; one over
    `max_bytes` is refused unread, as a fetched body would be)."""
    assert shard.tar is not None
    fs, path = _fs(shard.tar)
    out: dict[str, bytes | Refused] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            stem, _, ext = m.name.rpartition(".")
            if stem not in keys or ext not in IMAGE_COLS or not m.isfile():
                continue
            if m.size > max_bytes:
                out[stem] = Refused("too_large", f"too_large: {m.size} bytes > {max_bytes} (import)")
                continue
            data = tar.extractfile(m)
            out[stem] = data.read() if data is not None else Refused(
                "failed_to_resize", "not an image: unreadable tar member")
    return out


def checked(data: bytes | Refused | None, resizer: ImageResizer, max_bytes: int,
            row: dict[str, Any]) -> dict[str, Any]:
    """An imported image as fetched bytes: size cap, header pixel cap, decode, min size, resize.

    A JPEG the resize leaves at its size is kept as it is: img2dataset run with racm3's size and
    mode stored what racm3 would store, and encoding it again would only lose quality.
    """
    if isinstance(data, Refused):
        raise data
    if data is None:
        raise Refused("failed_to_resize", "not an image: success row without image bytes (import)")
    if len(data) > max_bytes:
        raise Refused("too_large", f"too_large: {len(data)} bytes > {max_bytes} (import)")
    jpg, w, h, ow, oh = resizer(data)
    if (w, h) == (ow, oh) and data[:2] == b"\xff\xd8" and header_size(data) == (w, h):
        jpg = data
    return {"jpg": jpg, "width": w, "height": h,
            "original_width": row.get("original_width") or ow,
            "original_height": row.get("original_height") or oh,
            "sha256": row.get("sha256") or hashlib.sha256(data).hexdigest()}


EMPTY = {"jpg": None, "width": None, "height": None, "original_width": None,
         "original_height": None, "sha256": None}


def images_of(matched: dict[str, tuple[ImportShard, dict[str, Any]]],
              max_bytes: int) -> dict[str, bytes | Refused | None]:
    """URL -> image bytes of every matched success, each shard's file read once."""
    by_shard: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    shards = {}
    for url, (shard, row) in matched.items():
        if row["status"] == SUCCESS:
            by_shard.setdefault(shard.parquet, []).append((url, row))
            shards[shard.parquet] = shard
    out: dict[str, bytes | Refused | None] = {}
    for key, items in by_shard.items():
        shard = shards[key]
        if shard.image_col is not None:
            data = parquet_images(shard, [r["row"] for _, r in items])
            out.update({url: data.get(r["row"]) for url, r in items})
        else:
            members = tar_images(shard, {r["key"] for _, r in items}, max_bytes)
            out.update({url: members.get(r["key"]) for url, r in items})
    return out


def import_rows(source: ImportSource, rows: list[dict[str, Any]], resizer: ImageResizer,
                max_bytes: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(IMAGE_SHARD rows for the URL-shard rows the import holds, the rows it lacks)."""
    matched = match(source, [r["url"] for r in rows])
    images = images_of(matched, max_bytes)
    done, lacking = [], []
    for r in rows:
        if r["url"] not in matched:
            lacking.append(r)
            continue
        _, hit = matched[r["url"]]
        out = {**r, **EMPTY, "status": hit["status"], "error_message": hit["error_message"]}
        if hit["status"] == SUCCESS:
            try:
                out.update(checked(images.get(r["url"]), resizer, max_bytes, hit))
            except Refused as e:
                out.update(status=e.status, error_message=str(e))
            except Exception as e:  # noqa: BLE001 - a hostile image is one row, not a shard
                log.exception("imported image of %s failed unexpectedly", r["url"])
                out.update(status="failed_to_resize", error_message=f"{type(e).__name__}: {e}")
        done.append(out)
    return done, lacking


def missing_rows(rows: list[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    """`download.fetch_missing = false`: URLs the import lacks, recorded, not fetched."""
    return [{**r, **EMPTY, "status": MISSING,
             "error_message": f"missing: not in the img2dataset output {folder}"} for r in rows]
