"""Removal on request, applied: which documents an entry matches now, and re-running the stages
that drop them (filter by key, URL and domain; download by image sha256)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.removals import Removal

log = logging.getLogger(__name__)


def _rows(root: DataRoot, stage: str, columns: list[str]) -> Iterator[dict]:
    """The rows of a stage's shards, one shard in memory at a time."""
    for m in list_manifests(root, stage):
        for p in m.outputs:
            if p.endswith(".parquet"):
                with root.fs.open(root.join(p), "rb") as f:
                    names = pq.ParquetFile(f).schema_arrow.names
                with root.fs.open(root.join(p), "rb") as f:
                    yield from pq.read_table(f, columns=[c for c in columns if c in names]).to_pylist()


def match_removals(root: DataRoot, entries: list[Removal]) -> dict[tuple[str, str], int]:
    """For each (kind, value): how many documents of the filter/download shards it matches now.

    Read one shard at a time: memory is bounded by a shard, not by the data set.
    """
    found = {(e.kind, e.value): 0 for e in entries}
    by_kind: dict[str, set[str]] = {}
    for e in entries:
        by_kind.setdefault(e.kind, set()).add(e.value)
    for row in _rows(root, "filter", ["key", "url"]):
        host = (urlsplit(row["url"]).hostname or "").lower()
        if row["key"] in by_kind.get("key", ()):
            found[("key", row["key"])] += 1
        if row["url"] in by_kind.get("url", ()):
            found[("url", row["url"])] += 1
        for d in by_kind.get("domain", ()):
            if host == d or host.endswith("." + d):
                found[("domain", d)] += 1
    for row in _rows(root, "download", ["sha256"]):
        if row.get("sha256") in by_kind.get("sha256", ()):
            found[("sha256", row["sha256"])] += 1
    return found


def keys_of_sha256(root: DataRoot, digests: set[str]) -> dict[str, str]:
    """{key: sha256} of downloaded documents whose bytes hash to one of `digests`."""
    if not digests:
        return {}
    return {r["key"]: r["sha256"] for r in _rows(root, "download", ["key", "sha256"])
            if r.get("sha256") in digests}


def apply_removals(root: DataRoot, preset: str, config_file: str | None,
                   overrides: list[str]) -> bool:
    """Re-run filter and download now (download reuses what it fetched: nothing is fetched)."""
    cfgs = load_config(preset, config_file, overrides)
    for stage in ("filter", "download"):
        if not list_manifests(root, stage):
            continue
        report = run_stage(stage, root, cfgs)
        log.info("%s after removal: %d shards re-run, %d unchanged", stage, len(report.ran),
                 len(report.skipped))
        if not report.ok:
            return False
    return True
