"""Re-hash committed shards against their manifests; a mismatch makes the shard stale.

A corrupt shard's manifest is renamed to `<shard>.manifest.json.corrupt` (kept as the record of
what was wrong): without a manifest the shard counts as missing, so the next run recomputes it,
and downstream shards follow whenever the recomputed output's digest differs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from storage.fs import DataRoot, file_digest
from storage.manifest import Manifest, list_manifests

log = logging.getLogger("racm3")
CORRUPT = ".corrupt"


@dataclass(frozen=True)
class Finding:
    stage: str
    shard_id: str
    problems: tuple[str, ...]  # "<output>: missing" / "<output>: digest mismatch"


def check(root: DataRoot, m: Manifest) -> list[str]:
    problems = []
    for rel, digest in sorted(m.outputs.items()):
        path = root.join(rel)
        if not root.exists(path):
            problems.append(f"{rel}: missing")
            continue
        try:
            actual = file_digest(root.fs, path)
        except OSError as e:
            problems.append(f"{rel}: unreadable ({e})")
            continue
        if actual != digest:
            problems.append(f"{rel}: digest mismatch")
    return problems


def corrupt_path(root: DataRoot, stage: str, shard_id: str) -> str:
    return root.manifest_path(stage, shard_id) + CORRUPT


def mark_corrupt(root: DataRoot, m: Manifest, problems: list[str]) -> None:
    """Move the manifest aside with the findings: the shard is no longer done."""
    record = {"problems": problems, "manifest": json.loads(m.to_json())}
    root.write_bytes_atomic(corrupt_path(root, m.stage, m.shard_id),
                            json.dumps(record, indent=1, sort_keys=True).encode())
    root.fs.rm(root.manifest_path(m.stage, m.shard_id))


def verify(root: DataRoot, stage: str | None = None) -> tuple[int, list[Finding]]:
    """(shards checked, findings); every finding's shard is marked stale."""
    findings, checked = [], 0
    for m in sorted(list_manifests(root, stage), key=lambda m: (m.stage, m.shard_id)):
        checked += 1
        problems = check(root, m)
        if problems:
            log.warning("%s/%s is corrupt: %s", m.stage, m.shard_id, "; ".join(problems))
            mark_corrupt(root, m, problems)
            findings.append(Finding(m.stage, m.shard_id, tuple(problems)))
    return checked, findings


def corrupt_shards(root: DataRoot, stage: str) -> list[str]:
    """Shard ids marked corrupt by `verify` and not recomputed since."""
    suffix = ".manifest.json" + CORRUPT
    return [p.rsplit("/", 1)[1].removesuffix(suffix)
            for p in root.glob(f"{stage}/*{suffix}")]
