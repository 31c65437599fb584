"""Where a document came from: its metadata row (URL, caption, licence and any other column), the
download shard that fetched it and when. Resolved for a few keys at a time, never the data set.
Outputs made from documents (generate / showcase pages) are logged with the keys they used.

A key `FFF-RRRRRRRRR` is row R of metadata file F; the filter manifests record which file has
index F, and which shard covers which rows, so no table of keys is needed.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from storage.fs import DataRoot, open_url
from storage.manifest import Manifest, list_manifests

KEY = re.compile(r"^(\d{3})-(\d{9})$")
LICENSE_COLUMNS = ("LICENSE", "license", "License")


@dataclass
class Provenance:
    """One document's origin."""

    key: str
    metadata_file: str = ""
    metadata_row: int = -1
    url: str = ""
    caption: str = ""
    license: str | None = None  # the metadata's licence column, when it has one (LAION's LICENSE)
    filter_shard: str = ""
    download_shard: str = ""
    fetched_at: float | None = None  # when the download shard that holds it was committed
    row: dict[str, Any] = field(default_factory=dict)  # the whole metadata row

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "row"} | {"metadata": self.row}


def _filter_ranges(root: DataRoot) -> list[tuple[int, int, int, str, Manifest]]:
    """(file index, row start, row stop, file path, manifest) of every filter shard."""
    out = []
    for m in list_manifests(root, "filter"):
        ref = m.inputs[0] if m.inputs else None
        if ref is not None and "file_index" in ref.detail:
            d = ref.detail
            out.append((int(d["file_index"]), int(d["row_start"]), int(d["row_stop"]), ref.path, m))
    return out


def _metadata_row(root: DataRoot, path: str, row: int) -> dict[str, Any]:
    """Row `row` of a metadata parquet file, reading only the row group that holds it."""
    url = path if "://" in path or path.startswith("/") else root.url(root.join(path))
    fs, p = open_url(url)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        offset = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset <= row < offset + n:
                return pf.read_row_group(g).slice(row - offset, 1).to_pylist()[0]
            offset += n
    raise KeyError(f"row {row} is past the end of {path}")


def provenance(root: DataRoot, keys: list[str]) -> dict[str, Provenance]:
    """The origin of each key that the data root knows; unknown keys are left out."""
    ranges = _filter_ranges(root)
    downloads = {m.shard_id: m for m in list_manifests(root, "download")}
    out: dict[str, Provenance] = {}
    for key in dict.fromkeys(keys):
        match = KEY.match(key)
        if not match:
            continue
        f, r = int(match.group(1)), int(match.group(2))
        hit = next((x for x in ranges if x[0] == f and x[1] <= r < x[2]), None)
        if hit is None:
            continue
        _, _, _, path, m = hit
        row = _metadata_row(root, path, r)
        lower = {k.lower(): k for k in row}
        lic = next((row[c] for c in LICENSE_COLUMNS if c in row), None)
        dl = downloads.get(m.shard_id)
        out[key] = Provenance(
            key=key, metadata_file=path, metadata_row=r,
            url=str(row.get(lower.get("url", "url"), "") or ""),
            caption=str(row.get(lower.get("text", lower.get("caption", "caption")), "") or ""),
            license=None if lic is None else str(lic), filter_shard=m.shard_id,
            download_shard=dl.shard_id if dl else "", fetched_at=dl.created_at if dl else None,
            row=row)
    return out


# ---------------------------------------------------------------------------- outputs

USED = "outputs/documents.jsonl"  # which memory documents each generation output used


def fetched(p: Provenance | None) -> str:
    """When the document's download shard was committed (ISO, UTC), or why there is no time."""
    if p is None or p.fetched_at is None:
        return "not downloaded" if p is not None else "—"
    return datetime.datetime.fromtimestamp(p.fetched_at, datetime.UTC).isoformat(timespec="seconds")


SOURCE_HEADER = ["key", "URL", "caption", "fetched", "licence"]


def source_rows(root: DataRoot, keys: list[str]) -> list[list[str]]:
    """One row a key (SOURCE_HEADER): where it came from; '—' where the root has no record of it
    (a user's document, another root's memory)."""
    known = provenance(root, keys)
    out = []
    for k in dict.fromkeys(keys):
        p = known.get(k)
        out.append([k, p.url if p else "—", p.caption if p else "—", fetched(p),
                    (p.license or "—") if p else "—"])
    return out


def record_used(root: DataRoot, kind: str, path: str, keys: list[str]) -> None:
    """Append {kind, path, keys, when} to the data root's output log (atomic replace), so
    `racm3 status` and `racm3 lineage` can flag outputs made from documents removed later."""
    line = json.dumps({"kind": kind, "path": path, "keys": sorted(set(keys)),
                       "when": round(time.time(), 3)}, sort_keys=True).encode() + b"\n"
    full = root.join(USED)
    old = root.fs.cat_file(full) if root.exists(full) else b""
    root.makedirs(root.join(USED.split("/")[0]))
    root.write_bytes_atomic(full, old + line)


def used_outputs(root: DataRoot) -> list[dict[str, Any]]:
    """Every recorded output (the latest record of a path wins)."""
    full = root.join(USED)
    if not root.exists(full):
        return []
    out: dict[str, dict[str, Any]] = {}
    for line in root.fs.cat_file(full).decode("utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out[d["path"]] = d
    return list(out.values())
