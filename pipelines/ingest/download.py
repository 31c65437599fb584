"""Stage `download`: img2dataset fetches each URL shard into one image shard (Parquet).

img2dataset's own Resizer, Downloader and Parquet writer run in-process on one URL shard, so one racm3
shard maps to one img2dataset shard and the stage is a plain per-shard function (clip-retrieval's
pattern): no process spawn per shard, and Prefect/Beam decide where shards run.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from storage.fs import DataRoot
from storage.manifest import list_manifests, upstream_ref
from storage.schemas import IMAGE_SHARD, SUCCESS

log = logging.getLogger(__name__)
# img2dataset's Resizer silences C-level output by dup2-ing /dev/null over fds 1 and 2 around each
# image. Two shards resizing at once in one process (Prefect's thread pool) interleave the
# save/restore and leave the process writing to /dev/null for good, so resizes take turns.
_RESIZE_LOCK = threading.Lock()
CARRY = ["racm3_key", "pwatermark", "punsafe", "similarity"]
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")


@dataclass(frozen=True)
class DownloadConfig(StageConfig):
    """How images are fetched and stored (img2dataset options)."""

    EXECUTION_FIELDS = frozenset({"threads", "processes", "timeout"})
    image_size: int = 256  # stored image side after resizing
    resize_mode: str = "center_crop"  # img2dataset resize mode
    min_image_size: int = 256  # reject images whose original shorter side is below this
    encode_quality: int = 95  # JPEG quality of the stored image
    retries: int = 1  # per-URL retries inside img2dataset
    timeout: int = 10  # per-URL timeout in seconds
    threads: int = 16  # download threads per shard
    processes: int = 1  # shards downloaded at once by the local runner / Prefect concurrency hint
    user_agent_token: str = "racm3"  # sent in the User-Agent; sites can opt out by it

    def __post_init__(self) -> None:
        self.check(self.image_size >= 8, "image_size", "must be >= 8")
        self.check(self.resize_mode in RESIZE_MODES, "resize_mode",
                   f"must be one of {', '.join(RESIZE_MODES)}")
        self.check(self.min_image_size >= 0, "min_image_size", "must be >= 0")
        self.check(1 <= self.encode_quality <= 100, "encode_quality", "must be in [1, 100]")
        self.check(self.retries >= 0, "retries", "must be >= 0")
        self.check(self.timeout >= 1, "timeout", "must be >= 1")
        self.check(self.threads >= 1, "threads", "must be >= 1")
        self.check(self.processes >= 1, "processes", "must be >= 1")


def img2dataset_shard(urls: pa.Table, cfg: DownloadConfig, workdir: str) -> pa.Table:
    """Download one URL shard with img2dataset's components; returns img2dataset's output rows."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    out = os.path.join(workdir, "out")
    os.makedirs(out)
    # img2dataset's Reader would write exactly this Arrow file (and print chatter); a URL shard
    # is already one img2dataset shard, so we hand it over directly.
    columns = [*CARRY, "caption", "url"]
    shard_file = os.path.join(workdir, "00000.feather")
    with pa.OSFile(shard_file, "wb") as f, pa.ipc.new_file(f, urls.select(columns).schema) as w:
        w.write_table(urls.select(columns))
    resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                      resize_only_if_bigger=False, encode_quality=cfg.encode_quality,
                      min_image_size=cfg.min_image_size)
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=_SerialResizer(resizer), thread_count=cfg.threads,
        save_caption=True, extract_exif=False, output_folder=out, column_list=columns,
        timeout=cfg.timeout, number_sample_per_shard=max(urls.num_rows, 1), oom_shard_count=5,
        compute_hash="sha256", verify_hash_type=None, encode_format="jpg", retries=cfg.retries,
        user_agent_token=cfg.user_agent_token, disallowed_header_directives=None)
    downloader.download_shard((0, shard_file))
    return pq.read_table(os.path.join(out, "00000.parquet"))


class _SerialResizer:
    """img2dataset's Resizer behind a process-wide lock (see _RESIZE_LOCK)."""

    def __init__(self, resizer: object):
        self.resizer = resizer

    def __call__(self, *args: object, **kwargs: object) -> object:
        with _RESIZE_LOCK:
            return self.resizer(*args, **kwargs)  # type: ignore[operator]


def to_image_shard(raw: pa.Table, urls: pa.Table) -> pa.Table:
    """img2dataset rows -> racm3 image shard rows, one per input URL, sorted by key."""
    by_key = {k: i for i, k in enumerate(raw["racm3_key"].to_pylist())}
    missing = [k for k in urls["key"].to_pylist() if k not in by_key]
    cols = {
        "key": raw["racm3_key"], "url": raw["url"], "caption": raw["caption" if "caption" in raw.column_names else "txt"], "status": raw["status"],
        "error_message": raw["error_message"], "jpg": raw["jpg"], "width": raw["width"],
        "height": raw["height"], "original_width": raw["original_width"],
        "original_height": raw["original_height"], "sha256": raw["sha256"],
        "pwatermark": raw["pwatermark"], "punsafe": raw["punsafe"], "similarity": raw["similarity"],
    }
    table = pa.table(cols).cast(IMAGE_SHARD)
    if missing:  # img2dataset never dropped a row in our tests; if it ever does, keep a record
        lost = urls.filter(pc.is_in(urls["key"], pa.array(missing)))
        table = pa.concat_tables([table, failed_rows(lost, "missing_from_img2dataset")])
    return table.sort_by("key")


def failed_rows(urls: pa.Table, message: str) -> pa.Table:
    n = urls.num_rows
    nulls = {c: pa.nulls(n, IMAGE_SHARD.field(c).type) for c in IMAGE_SHARD.names}
    nulls.update(key=urls["key"], url=urls["url"], caption=urls["caption"],
                 status=pa.array(["failed_to_download"] * n), error_message=pa.array([message] * n),
                 pwatermark=urls["pwatermark"], punsafe=urls["punsafe"],
                 similarity=urls["similarity"])
    return pa.table(nulls).cast(IMAGE_SHARD)


def status_counts(table: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s, e in zip(table["status"].to_pylist(), table["error_message"].to_pylist(), strict=True):
        if s != SUCCESS:
            reason = f"{s}: {_short(e)}"
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _short(msg: str | None) -> str:
    """Group error messages by their kind, not their details (URLs, byte counts)."""
    if not msg:
        return "unknown"
    msg = msg.split(" for url")[0].split(":")[0] if "HTTP Error" not in msg else msg.split(":")[0]
    return msg[:60]


class DownloadStage(Stage):
    name = "download"
    version = "1"
    config = DownloadConfig
    description = "fetch images with img2dataset into Parquet image shards"

    def plan(self, root: DataRoot, cfg: DownloadConfig) -> list[ShardSpec]:
        return [ShardSpec(self.name, m.shard_id, (upstream_ref(root, "filter", m.shard_id),))
                for m in list_manifests(root, "filter")]

    def run_shard(self, ctx: ShardContext, resources: object) -> ShardResult:
        urls = ctx.read_input(0)
        if urls.num_rows == 0:
            table = IMAGE_SHARD.empty_table()
        else:
            urls_in = urls.append_column("racm3_key", urls["key"])
            with tempfile.TemporaryDirectory(prefix="racm3-dl-") as work:
                table = to_image_shard(img2dataset_shard(urls_in, ctx.cfg, work), urls)
        ctx.write_table(table)
        ok = int(pc.sum(pc.equal(table["status"], SUCCESS)).as_py() or 0)
        dropped = status_counts(table)
        return ShardResult(rows_in=urls.num_rows, rows_out=table.num_rows, dropped=dropped,
                           metrics={"success": ok, "failed": table.num_rows - ok})
