"""Download one URL shard into image-shard rows: threads fetch, check and resize; every URL is a row.

Built once per worker (Stage.load / DoFn.setup) and shared by the shards that worker runs. Each URL
runs fetch -> header check -> decode/resize -> hash in one pool thread, so resizing spreads over
the threads (OpenCV and hashlib release the GIL) instead of one loop per shard as in img2dataset.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.ingest.fetch import FetchLimits, Refused, fetch, get_small
from pipelines.ingest.images import ImageResizer
from pipelines.ingest.netpolicy import NetPolicy
from pipelines.ingest.polite import BACKOFF_STATUSES, Manners, Politeness, retry_after_s
from storage.schemas import IMAGE_SHARD, SUCCESS

log = logging.getLogger(__name__)
CARRY = ("key", "url", "caption", "pwatermark", "punsafe", "similarity")
# Failures worth another try: the network hiccupped. Refusals and 4xx answers would only repeat.
RETRYABLE = ("failed_to_download",)
# Row statuses that a later run may fetch again (`racm3 run download --retry-failed`): the cause
# may have passed. Refusals (address, opt-out, size, pixels) are final unless named explicitly.
TRANSIENT = ("failed_to_download", "timeout", "deadline", "rate_limited", "robots_unreachable",
             "truncated")
FINAL = ("refused_address", "refused_url", "opted_out", "opted_out_robots", "opted_out_tdm",
         "too_large", "too_many_pixels", "too_many_redirects", "failed_to_resize")
FAILURE_STATUSES = TRANSIENT + FINAL


def is_transient(status: str, error_message: str | None, retry: tuple[str, ...]) -> bool:
    """Whether a row with this status is fetched again by a retry naming `retry` statuses."""
    if status not in retry:
        return False
    # a 4xx answer (404, 410, 403) repeats; 429 is the server asking us to come back later
    msg = error_message or ""
    return not (status == "failed_to_download" and msg.startswith("HTTP Error 4")
                and not msg.startswith("HTTP Error 429"))


@dataclass(frozen=True)
class DownloadLimits:
    """Time limits of a shard (monotonic seconds)."""

    url_timeout_s: float = 10.0
    shard_deadline_s: float = 3600.0
    retries: int = 1


class ShardDownloader:
    """Fetches URL shards with a thread pool under one network policy and one resizer."""

    def __init__(self, policy: NetPolicy, fetch_limits: FetchLimits, resizer: ImageResizer,
                 limits: DownloadLimits, threads: int, manners: Manners | None = None):
        self.policy, self.fetch_limits, self.resizer = policy, fetch_limits, resizer
        self.limits, self.threads = limits, threads
        self.polite = Politeness(manners or Manners(robots=False, tdmrep=False, per_host=threads),
                                 lambda url, deadline, cap: get_small(
                                     url, policy, fetch_limits, deadline, cap))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="racm3-dl")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def download(self, urls: pa.Table) -> pa.Table:
        """One IMAGE_SHARD row per row of `urls`, sorted by key."""
        rows = urls.select(list(CARRY)).to_pylist()
        shard_deadline = time.monotonic() + self.limits.shard_deadline_s
        out = list(self.pool.map(lambda r: self.one(r, shard_deadline), rows))
        return pa.Table.from_pylist(out, schema=IMAGE_SHARD).sort_by("key")

    def one(self, row: dict[str, Any], shard_deadline: float) -> dict[str, Any]:
        """Fetch, check and resize one URL; never raises (a failure is a row)."""
        out = {**row, "status": SUCCESS, "error_message": None, "jpg": None, "width": None,
               "height": None, "original_width": None, "original_height": None, "sha256": None}
        try:
            data = self._fetch(row["url"], shard_deadline)
            jpg, w, h, ow, oh = self.resizer(data)
            out.update(jpg=jpg, width=w, height=h, original_width=ow, original_height=oh,
                       sha256=hashlib.sha256(data).hexdigest())
        except Refused as e:
            out.update(status=e.status, error_message=str(e))
        except Exception as e:  # noqa: BLE001 - an unforeseen failure is still one row, not a shard
            log.exception("download of %s failed unexpectedly", row["url"])
            out.update(status="failed_to_download", error_message=f"{type(e).__name__}: {e}")
        return out

    def _fetch(self, url: str, shard_deadline: float) -> bytes:
        err: Refused | None = None
        for attempt in range(self.limits.retries + 1):
            now = time.monotonic()
            if now >= shard_deadline:
                raise Refused("deadline", "deadline: the shard deadline passed before this URL")
            deadline = min(now + self.limits.url_timeout_s, shard_deadline)
            try:
                if (why := self.polite.refusal(url, deadline)) is not None:
                    raise why
                with self.polite.turn(url, deadline):
                    return fetch(url, self.policy, self.fetch_limits, deadline)
            except Refused as e:
                if e.status == "timeout" and deadline == shard_deadline:
                    raise Refused("deadline", f"deadline: the shard deadline cut this URL ({e})") from e
                if e.http_status in BACKOFF_STATUSES:  # the host asked us to slow down
                    self.polite.backoff(url, retry_after_s(e.retry_after), attempt)
                elif e.status not in RETRYABLE or str(e).startswith("HTTP Error 4"):
                    raise
                err = e
        assert err is not None
        if err.http_status == 429:
            raise Refused("rate_limited", f"rate_limited: {err} after {self.limits.retries + 1} tries")
        raise err
