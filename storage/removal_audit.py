"""What a removal has not reached yet: shards that still hold removed documents (for `verify`) and
artifacts made before the latest removal (checkpoints, evaluations; for `status`), and outputs whose
recorded documents include a removed one (evaluations, generation pages; `status`, `lineage`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from storage.fs import DataRoot
from storage.manifest import Manifest, list_manifests
from storage.provenance import used_outputs
from storage.removals import RemovalSet, load, removal_set

# columns that name a document: scalar key/url/sha256, or a list of neighbour keys
KEY_COLUMNS = ("key", "neighbor_keys")
# artifacts that carry what they were made from past the shards (weights, pages): flagged
MADE_FROM_DOCUMENTS = ("train", "evaluate", "evaluate-part", "pack", "index")


@dataclass(frozen=True)
class Leftover:
    stage: str
    shard_id: str
    documents: int  # rows (or neighbour entries) naming a removed document


def _columns(root: DataRoot, path: str) -> list[str]:
    with root.fs.open(path, "rb") as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def _hits(rs: RemovalSet, row: dict) -> int:
    n = 0
    key, url, sha = row.get("key"), row.get("url"), row.get("sha256")
    if (key and key in rs.keys) or (url and rs.url_removed(url)) or (sha and sha in rs.sha256):
        n += 1
    return n + sum(1 for k in row.get("neighbor_keys") or () if k in rs.keys)


def _shard_rows(root: DataRoot, m: Manifest) -> Iterator[dict]:
    for rel in m.outputs:
        path = root.join(rel)
        if not rel.endswith(".parquet") or not root.exists(path):
            continue
        cols = [c for c in (*KEY_COLUMNS, "url", "sha256") if c in _columns(root, path)]
        if cols:
            with root.fs.open(path, "rb") as f:
                yield from pq.read_table(f, columns=cols).to_pylist()


def leftovers(root: DataRoot, rs: RemovalSet | None = None) -> list[Leftover]:
    """Shards that still name a removed document (by key, URL, domain, sha256 or as a neighbour).

    Keys resolved from URL, domain and sha256 entries are matched too, so an embedding shard
    (which has keys only) is caught for a URL removal. Reads one shard at a time.
    """
    rs = rs or removal_set(root)
    if not rs:
        return []
    rs = _with_resolved_keys(root, rs)
    out = []
    for m in sorted(list_manifests(root), key=lambda m: (m.stage, m.shard_id)):
        n = sum(_hits(rs, row) for row in _shard_rows(root, m))
        if n:
            out.append(Leftover(m.stage, m.shard_id, n))
    return out


def _with_resolved_keys(root: DataRoot, rs: RemovalSet) -> RemovalSet:
    """`rs` plus the keys that its URL, domain and sha256 entries match in filter/download."""
    keys = set(rs.keys)
    for stage in ("filter", "download"):
        for m in list_manifests(root, stage):
            for row in _shard_rows(root, m):
                url = row.get("url") or ""
                if rs.url_removed(url) or (row.get("sha256") in rs.sha256):
                    keys.add(row["key"])
    return RemovalSet(keys, rs.urls, rs.domains, rs.sha256, rs.digest)


def made_before_removal(root: DataRoot) -> dict[str, list[str]]:
    """{stage: shard ids} of artifacts made before a removal that was recorded after them."""
    entries = load(root)
    if not entries:
        return {}
    latest = max(e.when for e in entries)
    out: dict[str, list[str]] = {}
    for stage in MADE_FROM_DOCUMENTS:
        for m in list_manifests(root, stage):
            if m.created_at < latest:
                out.setdefault(stage, []).append(m.shard_id)
    return out



def evaluation_documents(root: DataRoot) -> dict[str, set[str]]:
    """{"evaluate-part/<id>": the context keys its images were given, "evaluate/<id>": those of
    the parts it reduced}, from the per-image records the parts wrote."""
    parts: dict[str, set[str]] = {}
    for m in list_manifests(root, "evaluate-part"):
        keys: set[str] = set()
        for rel in (r for r in m.outputs if r.endswith(".json") and root.exists(root.join(r))):
            for image in json.loads(root.fs.cat_file(root.join(rel))).get("images", []):
                for used in (image.get("context") or {}).values():
                    keys.update(used)
        parts[m.shard_id] = keys
    out = {f"evaluate-part/{sid}": keys for sid, keys in parts.items()}
    for m in list_manifests(root, "evaluate"):
        out[f"evaluate/{m.shard_id}"] = set().union(
            *(parts.get(i.shard_id, set()) for i in m.inputs if i.stage == "evaluate-part"))
    return out


def outputs_using_removed(root: DataRoot) -> dict[str, list[str]]:
    """{output: removed keys it used} for evaluations (evaluate/<id>, evaluate-part/<id>) and
    logged generation outputs (generate:<page>, showcase:<file>) whose recorded documents
    include a removed one (by key, or by a URL, domain or sha256 entry that matches its row)."""
    removed = removed_keys(root)
    if not removed:
        return {}
    used = evaluation_documents(root)
    used |= {f"{d['kind']}:{d['path']}": set(d["keys"]) for d in used_outputs(root)}
    return {label: sorted(keys & removed) for label, keys in sorted(used.items()) if keys & removed}


def removed_keys(root: DataRoot) -> set[str]:
    """Every removed document's key: listed keys and those its URL, domain and sha256 entries
    match in filter/download."""
    rs = removal_set(root)
    return _with_resolved_keys(root, rs).keys if rs else set()
