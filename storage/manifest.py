"""Manifests and fingerprints: a shard is done iff its manifest carries the current fingerprint."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import posixpath
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage.fs import DataRoot

MANIFEST_VERSION = 1
log = logging.getLogger("racm3")
# Stage names and shard ids become path parts and SQL view names: plain names only.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class BadManifest(ValueError):
    """A manifest file that is not a manifest of the shard its location names."""


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


def safe_name(name: object) -> bool:
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None and ".." not in name


def confined(rel: object) -> bool:
    """A relative path that stays inside the data root (no absolute path, URL or `..`)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "://" in rel or "\\" in rel:
        return False
    norm = posixpath.normpath(rel)
    return norm == rel and norm != ".." and not norm.startswith("../")


def parse_manifest(data: bytes, stage: str, shard_id: str) -> Manifest:
    """The manifest in `data`, found at `<stage>/<shard_id>.manifest.json`; BadManifest when the
    bytes are not a manifest of that very shard (manifests in a shared root are untrusted data)."""
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadManifest(f"not UTF-8 JSON: {e}") from e
    if not isinstance(d, dict):
        raise BadManifest(f"a JSON {type(d).__name__}, not an object")
    if d.get("stage") != stage or d.get("shard_id") != shard_id:
        raise BadManifest(f"names {d.get('stage')!r}/{d.get('shard_id')!r}, not its location")
    outputs = d.get("outputs")
    if not isinstance(outputs, dict) or not all(confined(k) for k in outputs):
        raise BadManifest("an output path leaves the data root")
    try:
        return Manifest.from_dict(d)
    except (TypeError, KeyError, ValueError) as e:
        raise BadManifest(f"malformed: {e}") from e


def _load(root: DataRoot, path: str, stage: str, shard_id: str) -> Manifest | None:
    """The manifest at `path`, or None (logged) when it is missing or not a valid manifest."""
    try:
        with root.fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        if not (safe_name(stage) and safe_name(shard_id)):
            raise BadManifest("stage or shard id is not a plain name")
        return parse_manifest(data, stage, shard_id)
    except BadManifest as e:
        log.warning("skipping manifest %s: %s (the shard counts as missing)", root.rel(path), e)
        return None


def read_manifest(root: DataRoot, stage: str, shard_id: str) -> Manifest | None:
    """The shard's manifest, or None when it has none or a corrupt one (then it is recomputed)."""
    return _load(root, root.manifest_path(stage, shard_id), stage, shard_id)


def write_manifest(root: DataRoot, m: Manifest) -> str:
    path = root.manifest_path(m.stage, m.shard_id)
    root.write_bytes_atomic(path, m.to_json().encode())
    return path


def list_manifests(root: DataRoot, stage: str | None = None) -> list[Manifest]:
    """Every valid manifest (of `stage`); corrupt or misplaced ones are logged and skipped."""
    pattern = f"{stage or '*'}/*.manifest.json"
    out = []
    for p in root.glob(pattern):
        folder, name = root.rel(p).rsplit("/", 1)
        m = _load(root, p, folder, name.removesuffix(".manifest.json"))
        if m is not None:
            out.append(m)
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
