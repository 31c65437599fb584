"""The memory's captions: key -> caption text of every token shard's document."""

from __future__ import annotations

from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table


def memory_captions(root: DataRoot) -> dict[str, str]:
    """Memory key -> caption text ("" when a document has none)."""
    out: dict[str, str] = {}
    for m in list_manifests(root, "tokenize"):
        t = read_table(root, root.artifact("tokenize", m.shard_id, "parquet"), ["key", "caption"])
        out.update(zip(t["key"].to_pylist(), (c or "" for c in t["caption"].to_pylist()), strict=True))
    return out
