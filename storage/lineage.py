"""Lineage: walk from any artifact (shard, checkpoint, metrics file) back to the metadata rows."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from storage.fs import DataRoot
from storage.manifest import Manifest, list_manifests, read_manifest


@dataclass
class Node:
    """One artifact in the ancestry tree."""

    label: str
    manifest: Manifest | None
    detail: dict = field(default_factory=dict)
    parents: list[Node] = field(default_factory=list)


def owner(root: DataRoot, path: str) -> Manifest | None:
    """The manifest that lists `path` (relative to the root) among its outputs."""
    rel = root.rel(path) if path.startswith("/") or "://" in path else path.strip("/")
    stage, _, name = rel.partition("/")
    for m in list_manifests(root, stage):
        if rel in m.outputs or any(rel.startswith(o + "/") for o in m.outputs):
            return m
        if name.split(".")[0] == m.shard_id and name.endswith(".manifest.json"):
            return m
    return None


def walk(root: DataRoot, path: str, max_depth: int = 20) -> Node:
    m = owner(root, path)
    node = Node(path, m)
    if m is not None and max_depth > 0:
        for ref in m.inputs:
            if ref.stage and ref.shard_id:
                parent = read_manifest(root, ref.stage, ref.shard_id)
                label = ref.path
                if parent and parent.outputs and ref.path not in parent.outputs:
                    label = next(iter(parent.outputs))
                child = walk(root, label, max_depth - 1)
                child.detail = ref.detail
                node.parents.append(child)
            else:
                node.parents.append(Node(ref.path, None, ref.detail))
    return node


def render(node: Node, depth: int = 0, seen: set[str] | None = None) -> list[str]:
    """A tree, one artifact a line: path, stage/shard, rows and digest, the row range read.
    An artifact reached again (a shard read by several stages) is shown once, then marked."""
    seen = set() if seen is None else seen
    prefix = "  " * (depth - 1) + "└ " if depth else ""
    if node.label in seen and node.parents:
        return [f"{prefix}{node.label} (ancestry shown above)"]
    seen.add(node.label)
    m = node.manifest
    bits = [node.label]
    if m is not None:
        bits.append(f"[{m.stage}/{m.shard_id} v{m.stage_version} rows {m.rows_in}->{m.rows_out} "
                    f"{m.output_digest[:19]}]")
    elif not node.parents:
        bits.append("[external input]")
    if node.detail:
        bits.append("reads " + ", ".join(f"{k}={v}" for k, v in node.detail.items()))
    lines = [prefix + " ".join(bits)]
    for p in node.parents:
        lines += render(p, depth + 1, seen)
    return lines


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))
