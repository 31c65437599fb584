"""Stage `download`: fetch each URL shard into one image shard (Parquet), one row per URL.

racm3's own fetch path (pipelines/ingest/fetch.py) replaces urllib so that every address is
checked where it is connected to, redirects are followed by us, and byte and time limits hold;
img2dataset's resize (pipelines/ingest/images.py) and its X-Robots-Tag parser are kept. The stage
runs on Beam: one element per URL shard, the downloader built once per worker in DoFn.setup.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.ingest.downloader import (
    FAILURE_STATUSES,
    DownloadLimits,
    ShardDownloader,
    is_transient,
)
from pipelines.ingest.fetch import FetchLimits
from pipelines.ingest.images import ImageResizer
from pipelines.ingest.netpolicy import NetPolicy, split_host_port
from pipelines.ingest.polite import Manners
from pipelines.ingest.shard_source import fill_shard, source_refs
from storage import removals
from storage.fs import DataRoot
from storage.manifest import Manifest, list_manifests, params_hash, read_manifest, upstream_ref
from storage.schemas import IMAGE_SHARD, SUCCESS
from storage.shards import read_table

log = logging.getLogger(__name__)
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
# img2dataset's default opt-out directives (img2dataset.main.download)
OPT_OUT = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass(frozen=True)
class DownloadConfig(StageConfig):
    """How images are fetched, which network they may come from, and how they are stored."""

    EXECUTION_FIELDS = frozenset({"threads", "url_timeout_s", "shard_deadline_s", "retry_statuses"})
    image_size: int = 256  # stored image side after resizing
    resize_mode: str = "center_crop"  # img2dataset resize mode
    min_image_size: int = 256  # reject images whose original shorter side is below this
    encode_quality: int = 95  # JPEG quality of the stored image
    retries: int = 1  # extra tries of a URL after a network error or a 5xx (not after a refusal)
    url_timeout_s: float = 20.0  # wall-clock limit of one URL: connect, redirects and every read
    shard_deadline_s: float = 3600.0  # URLs not finished by then become rows with status "deadline"
    threads: int = 16  # download threads per Beam worker (worker processes: beam.direct_num_workers)
    user_agent_token: str = "racm3"  # sent in the User-Agent; sites can opt out by it
    allow_hosts: tuple[str, ...] = ()  # host or host:port let through the address check
    max_bytes: int = 20_000_000  # a response body over this is refused ("too_large")
    max_redirects: int = 5  # each hop's address is checked again
    max_image_pixels: int = 40_000_000  # width x height from the header; above it: "too_many_pixels"
    max_decode_bytes: int = 160_000_000  # pixels x channels x bytes per sample; above it: "too_costly"
    max_jpeg_scans: int = 32  # a progressive JPEG decodes once per scan (usual: 10); above: "too_costly"
    disallowed_header_directives: tuple[str, ...] = OPT_OUT  # X-Robots-Tag opt-outs; () = ignore
    honour_robots: bool = True  # robots.txt rules for user_agent_token, fetched once per host
    honour_tdmrep: bool = True  # TDMRep: tdm-reservation header and /.well-known/tdmrep.json
    per_host_connections: int = 4  # connections at once to one host (all threads of a worker)
    max_backoff_s: float = 60.0  # longest Retry-After honoured after a 429/503
    # rows of done shards with these statuses are fetched again, every other row kept byte for
    # byte (`racm3 run download --retry-failed` sets the transient ones); () = no retry
    retry_statuses: tuple[str, ...] = ()
    import_from: str = ""  # img2dataset output folder (parquet or webdataset) to take rows from; "" = fetch all
    fetch_missing: bool = True  # with import_from: fetch the URLs it lacks (false: status "missing")
    nsfw_model: str = ""  # image NSFW score where metadata has no punsafe: "open_nsfw" (shipped) or an .onnx path; "" = off
    max_nsfw: float = 0.5  # rows whose image score is above this become status "unsafe"

    def __post_init__(self) -> None:
        self.check(self.image_size >= 8, "image_size", "must be >= 8")
        self.check(self.resize_mode in RESIZE_MODES, "resize_mode",
                   f"must be one of {', '.join(RESIZE_MODES)}")
        self.check(self.min_image_size >= 0, "min_image_size", "must be >= 0")
        self.check(1 <= self.encode_quality <= 100, "encode_quality", "must be in [1, 100]")
        self.check(self.retries >= 0, "retries", "must be >= 0")
        for name in ("url_timeout_s", "shard_deadline_s"):
            self.check(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name,
                       "must be a finite number > 0")
        self.check(self.threads >= 1, "threads", "must be >= 1")
        self.check(self.max_bytes >= 1, "max_bytes", "must be >= 1")
        self.check(self.max_redirects >= 0, "max_redirects", "must be >= 0")
        self.check(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        self.check(self.max_decode_bytes >= 1, "max_decode_bytes", "must be >= 1")
        self.check(self.max_jpeg_scans >= 1, "max_jpeg_scans", "must be >= 1")
        unknown = sorted(set(self.retry_statuses) - set(FAILURE_STATUSES))
        self.check(not unknown, "retry_statuses",
                   f"unknown status {', '.join(unknown)}; one of {', '.join(FAILURE_STATUSES)}")
        self.check(self.per_host_connections >= 1, "per_host_connections", "must be >= 1")
        self.check(0 <= self.max_backoff_s < float("inf"), "max_backoff_s", "must be finite, >= 0")
        self.check(0.0 <= self.max_nsfw <= 1.0, "max_nsfw", "must be in [0, 1]")
        for entry in self.allow_hosts:
            try:
                split_host_port(entry)
            except ValueError:
                self.check(False, "allow_hosts", f"{entry!r} is not host or host:port")


def build_downloader(cfg: DownloadConfig) -> ShardDownloader:
    """The per-worker downloader: policy, limits, resizer and thread pool from the config."""
    return ShardDownloader(
        NetPolicy(tuple(cfg.allow_hosts)),
        FetchLimits(max_bytes=cfg.max_bytes, max_redirects=cfg.max_redirects,
                    user_agent_token=cfg.user_agent_token.strip().lower(),
                    disallowed_directives=frozenset(
                        d.strip().lower() for d in cfg.disallowed_header_directives),
                    honour_tdm_header=cfg.honour_tdmrep),
        ImageResizer(cfg.image_size, cfg.resize_mode, cfg.min_image_size, cfg.encode_quality,
                     cfg.max_image_pixels, cfg.max_decode_bytes, cfg.max_jpeg_scans),
        DownloadLimits(cfg.url_timeout_s, cfg.shard_deadline_s, cfg.retries),
        cfg.threads,
        Manners(cfg.honour_robots, cfg.honour_tdmrep, cfg.per_host_connections,
                cfg.max_backoff_s, cfg.user_agent_token.strip().lower()))


def previous_rows(ctx: ShardContext, urls: pa.Table) -> tuple[pa.Table | None, pa.Table]:
    """The shard's committed rows to keep as they are, and the URL rows to fetch (again).

    Rows are kept only when the URL shard still holds the same key and URL (else fetched anew).
    """
    cfg: DownloadConfig = ctx.cfg
    prev = read_manifest(ctx.root, ctx.spec.stage, ctx.spec.shard_id)
    if prev is None or not prev.outputs or prev.params_hash != params_hash(cfg.params()):
        return None, urls
    # a changed URL shard (rows removed or added upstream) reuses what was fetched; the same
    # URL shard runs again only by --force (fetch everything) or a retry (fetch the failures)
    same_input = prev.inputs[:1] == list(ctx.spec.inputs[:1])
    if same_input and not cfg.retry_statuses:
        return None, urls
    old = read_table(ctx.root, ctx.root.url(ctx.root.join(next(iter(prev.outputs)))))
    pairs = set(zip(urls["key"].to_pylist(), urls["url"].to_pylist(), strict=True))
    keep = [(k, u) in pairs and not is_transient(s, e, cfg.retry_statuses)
            for k, u, s, e in zip(old["key"].to_pylist(), old["url"].to_pylist(),
                                  old["status"].to_pylist(), old["error_message"].to_pylist(),
                                  strict=True)]
    kept = old.filter(pa.array(keep, pa.bool_()))
    kept_keys = pa.array(kept["key"].to_pylist(), pa.string())
    again = urls.filter(pc.invert(pc.is_in(urls["key"], value_set=kept_keys)))
    log.info("download %s: retrying %d rows, keeping %d", ctx.spec.shard_id, again.num_rows,
             kept.num_rows)
    return kept.cast(IMAGE_SHARD), again


def drop_removed_images(table: pa.Table, rs: removals.RemovalSet) -> tuple[pa.Table, dict[str, int]]:
    """Images whose bytes hash to a removed sha256 are not stored (nor are removed keys/URLs)."""
    if not rs or not table.num_rows:
        return table, {}
    keep = [not rs.row_removed(k, u, h) for k, u, h in zip(
        table["key"].to_pylist(), table["url"].to_pylist(), table["sha256"].to_pylist(), strict=True)]
    n = keep.count(False)
    return table.filter(pa.array(keep, pa.bool_())), ({"removed": n} if n else {})


def status_counts(table: pa.Table) -> dict[str, int]:
    """Failed rows grouped by status and the kind of error (not its details)."""
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
    return msg.split(":")[0][:60]


class DownloadStage(Stage):
    name = "download"
    version = "2"  # own fetch path: network policy, byte/time caps, pixel cap, opt-outs
    config = DownloadConfig
    engine = "beam"
    description = "fetch images under a network policy into Parquet image shards"

    def plan(self, root: DataRoot, cfg: DownloadConfig) -> list[ShardSpec]:
        extra = source_refs(root, cfg)
        return [ShardSpec(self.name, m.shard_id, (upstream_ref(root, "filter", m.shard_id), *extra))
                for m in list_manifests(root, "filter")]

    def load(self, cfg: DownloadConfig) -> ShardDownloader:
        return build_downloader(cfg)

    def wants_rerun(self, cfg: DownloadConfig, manifest: Manifest) -> bool:
        """With `retry_statuses`, a done shard whose rows failed that way runs again."""
        if not cfg.retry_statuses:
            return False
        parts = (reason.partition(": ") for reason in manifest.dropped)
        return any(is_transient(status, msg, cfg.retry_statuses) for status, _, msg in parts)

    def run_shard(self, ctx: ShardContext, resources: object) -> ShardResult:
        urls = ctx.read_input(0)
        n_urls = urls.num_rows
        own = not isinstance(resources, ShardDownloader)
        downloader = build_downloader(ctx.cfg) if own else resources
        assert isinstance(downloader, ShardDownloader)
        try:
            kept, urls = previous_rows(ctx, urls)
            table, counts = fill_shard(ctx, urls, downloader)
            if kept is not None:
                table = pa.concat_tables([kept, table]).sort_by("key")
                counts = counts | {"reused": kept.num_rows}
        finally:
            if own:
                downloader.close()
        table, removed = drop_removed_images(table, removals.removal_set(ctx.root))
        ctx.write_table(table)
        ok = int(pc.sum(pc.equal(table["status"], SUCCESS)).as_py() or 0)
        return ShardResult(rows_in=n_urls, rows_out=table.num_rows,
                           dropped={**status_counts(table), **removed},
                           metrics={"success": ok, "failed": table.num_rows - ok, **counts})
