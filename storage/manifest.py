"""Manifests and fingerprints: a shard is done iff its manifest carries the current fingerprint."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage.fs import DataRoot

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class InputRef:
    """One input of a shard: where it is and the digest of its content."""

    path: str  # relative to the data root when inside it, else an absolute path or URL
    digest: str  # "sha256:..." of the content (an upstream shard's output digest)
    stage: str = ""  # producing stage, "" for external files (metadata, COCO json)
    shard_id: str = ""  # producing shard, "" for external files
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. the row range read from it


@dataclass
class Manifest:
    """What a stage wrote for one shard, and from what. Written last, after the outputs."""

    stage: str
    shard_id: str
    stage_version: str
    params_hash: str
    fingerprint: str
    code_version: str
    inputs: list[InputRef]
    outputs: dict[str, str]  # output name (relative path) -> digest
    output_digest: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    flow_run_id: str | None = None
    created_at: float = field(default_factory=time.time)
    manifest_version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["inputs"] = [InputRef(**i) for i in d.get("inputs", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:16]


def fingerprint(stage_version: str, phash: str, inputs: list[InputRef]) -> str:
    """Stage version + parameter hash + input digests (order-independent by path)."""
    parts = [stage_version, phash] + sorted(f"{i.path}={i.digest}" for i in inputs)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def combined_digest(outputs: dict[str, str]) -> str:
    h = hashlib.sha256(canonical_json(outputs).encode())
    return "sha256:" + h.hexdigest()


def read_manifest(root: DataRoot, stage: str, shard_id: str) -> Manifest | None:
    """The shard's manifest, or None when it has none (then the shard does not exist)."""
    path = root.manifest_path(stage, shard_id)
    if not root.exists(path):
        return None
    try:
        with root.fs.open(path, "r") as f:
            return Manifest.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError, KeyError):
        return None  # a corrupt manifest means the shard must be recomputed


def write_manifest(root: DataRoot, m: Manifest) -> str:
    path = root.manifest_path(m.stage, m.shard_id)
    root.write_bytes_atomic(path, m.to_json().encode())
    return path


def list_manifests(root: DataRoot, stage: str | None = None) -> list[Manifest]:
    pattern = f"{stage or '*'}/*.manifest.json"
    out = []
    for p in root.glob(pattern):
        with root.fs.open(p, "r") as f:
            try:
                out.append(Manifest.from_dict(json.load(f)))
            except (json.JSONDecodeError, TypeError):
                continue
    return out


def upstream_ref(root: DataRoot, stage: str, shard_id: str, **detail: Any) -> InputRef:
    """An input pointing at an upstream shard, keyed by that shard's output digest."""
    m = read_manifest(root, stage, shard_id)
    if m is None:
        raise FileNotFoundError(
            f"upstream shard {stage}/{shard_id} has no manifest: run `racm3 run {stage}` first"
        )
    path = next(iter(m.outputs), f"{stage}/{shard_id}")
    return InputRef(path=path, digest=m.output_digest, stage=stage, shard_id=shard_id, detail=detail)


@functools.cache
def code_version() -> str:
    """git sha of the checkout when there is one (with +dirty), else the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"git:{sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"racm3=={version('racm3')}"
        except PackageNotFoundError:
            return "unknown"
