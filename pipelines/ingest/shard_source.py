"""What fills a download shard: the fetch, or an img2dataset import with the fetch (or `missing`)
for the URLs it lacks; then the image NSFW score where the metadata had none."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.stage import ShardContext
from pipelines.ingest import img2dataset_import as i2d
from pipelines.ingest import nsfw
from pipelines.ingest.downloader import CARRY, ShardDownloader
from storage.fs import DataRoot
from storage.manifest import InputRef
from storage.schemas import IMAGE_SHARD

IMPORT = "img2dataset"  # InputRef.detail["source"] of the import input


def import_folder(root: DataRoot, folder: str) -> str:
    """`download.import_from` as a URL/absolute path (relative ones are under the data root)."""
    return folder if "://" in folder or folder.startswith("/") else root.url(root.join(folder))


def source_refs(root: DataRoot, cfg: Any) -> tuple[InputRef, ...]:
    """Inputs of every download shard besides its URL shard: the import, the NSFW model."""
    refs = (import_ref(root, cfg.import_from),) if cfg.import_from else ()
    return refs + ((nsfw.model_ref(root, cfg.nsfw_model),) if cfg.nsfw_model else ())


def import_ref(root: DataRoot, folder: str) -> InputRef:
    """The import as an input of every download shard: checked now (a foreign folder fails the
    plan, so nothing is written), identified by its files' names, sizes and stats."""
    source = i2d.scan(import_folder(root, folder))
    return InputRef(folder, source.digest, detail={"source": IMPORT})


def fill_shard(ctx: ShardContext, urls: pa.Table,
               downloader: ShardDownloader) -> tuple[pa.Table, dict[str, Any]]:
    """(the IMAGE_SHARD table of the URL shard, counts for the manifest's metrics)."""
    cfg = ctx.cfg
    if not urls.num_rows:
        return IMAGE_SHARD.empty_table(), {}
    if cfg.import_from:
        table, counts = imported(ctx, urls, downloader)
    else:
        table, counts = downloader.download(urls), {}
    if cfg.nsfw_model:
        table, n = nsfw.score_table(table, nsfw.model_path(ctx.root, cfg.nsfw_model), cfg.max_nsfw)
        counts = counts | {"nsfw_scored": n}
    return table, counts


def imported(ctx: ShardContext, urls: pa.Table,
             downloader: ShardDownloader) -> tuple[pa.Table, dict[str, Any]]:
    """Rows from the import; the URLs it lacks fetched, or recorded as `missing`."""
    cfg = ctx.cfg
    source = i2d.scan(import_folder(ctx.root, cfg.import_from))
    rows = urls.select(list(CARRY)).to_pylist()
    done, lacking = i2d.import_rows(source, rows, downloader.resizer, cfg.max_bytes)
    if lacking and cfg.fetch_missing:
        want = pa.array([r["url"] for r in lacking], pa.string())
        done += downloader.download(urls.filter(pc.is_in(urls["url"], value_set=want))).to_pylist()
    elif lacking:
        done += i2d.missing_rows(lacking, cfg.import_from)
    table = pa.Table.from_pylist(done, schema=IMAGE_SHARD).sort_by("key")
    n = len(rows) - len(lacking)
    return table, {"imported": n, "fetched": len(lacking) if cfg.fetch_missing else 0,
                   "missing": 0 if cfg.fetch_missing else len(lacking)}
