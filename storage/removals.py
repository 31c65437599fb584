"""The removal list: documents taken out on request (by key, URL, domain or image sha256).

Kept in the data root as `removals/removals.jsonl`, append-only, one entry a line with who, when
and why. Its digest is an input of the filter stage's fingerprint, so the shard contract
recomputes exactly what a removal touches, downstream included; download drops images whose
bytes hash to a removed sha256; checkpoints record the digest they were trained under.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from storage.fs import DataRoot

PATH = "removals/removals.jsonl"
KINDS = ("key", "url", "domain", "sha256")
_CHECKS = {
    "key": re.compile(r"^\d{3}-\d{9}$"),
    "sha256": re.compile(r"^[0-9a-f]{64}$"),
    "domain": re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                         r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"),
}


class RemovalError(ValueError):
    """A malformed removal request: names the file and line; nothing was recorded."""


@dataclass(frozen=True)
class Removal:
    """One entry of the list."""

    kind: str  # key | url | domain | sha256
    value: str
    who: str = ""
    when: float = 0.0  # unix time it was recorded
    why: str = ""


@dataclass
class RemovalSet:
    """The list as sets, for membership tests in the stages."""

    keys: set[str] = field(default_factory=set)
    urls: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    sha256: set[str] = field(default_factory=set)
    digest: str = ""  # of the list file; "" when there is none

    def __bool__(self) -> bool:
        return bool(self.keys or self.urls or self.domains or self.sha256)

    def url_removed(self, url: str) -> bool:
        if url in self.urls:
            return True
        host = (urlsplit(url).hostname or "").lower()
        return any(host == d or host.endswith("." + d) for d in self.domains)

    def row_removed(self, key: str, url: str, sha256: str | None = None) -> bool:
        return key in self.keys or self.url_removed(url) or (sha256 in self.sha256 if sha256 else False)


def normalise(kind: str, value: str) -> str:
    """The canonical form of a value, or raises ValueError saying what is wrong with it."""
    v = value.strip()
    if kind == "url":
        parts = urlsplit(v)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {v!r}")
        return v
    v = v.lower() if kind in ("domain", "sha256") else v
    if not _CHECKS[kind].match(v):
        raise ValueError(f"not a valid {kind}: {v!r}")
    return v


def parse_lines(kind: str, lines: Iterable[str], source: str) -> list[str]:
    """Values of one request file (blank lines and `#` comments skipped), all or nothing."""
    if kind not in KINDS:
        raise RemovalError(f"unknown removal kind {kind!r}; one of {', '.join(KINDS)}")
    out = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip() if kind != "url" else line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            out.append(normalise(kind, text))
        except ValueError as e:
            raise RemovalError(f"{source}:{n}: {e}") from e
    return out


def read_request(path: str, kind: str) -> list[str]:
    """Values from a local request file; a missing, binary or malformed file is a RemovalError."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_lines(kind, f.read().splitlines(), path)
    except (OSError, UnicodeDecodeError) as e:
        raise RemovalError(f"{path}: cannot read the {kind} list: {e}") from e


def load(root: DataRoot) -> list[Removal]:
    path = root.join(PATH)
    if not root.exists(path):
        return []
    out = []
    for line in root.fs.cat_file(path).decode("utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(Removal(**{k: d[k] for k in ("kind", "value", "who", "when", "why")}))
    return out


def removal_set(root: DataRoot) -> RemovalSet:
    path = root.join(PATH)
    if not root.exists(path):
        return RemovalSet()
    data = root.fs.cat_file(path)
    s = RemovalSet(digest=hashlib.sha256(data).hexdigest())
    target = {"key": s.keys, "url": s.urls, "domain": s.domains, "sha256": s.sha256}
    for r in load(root):
        target[r.kind].add(r.value)
    return s


def append(root: DataRoot, entries: list[Removal]) -> int:
    """Add entries not already listed; returns how many were new. Atomic replace of the file."""
    have = {(r.kind, r.value) for r in load(root)}
    new = [e for e in entries if (e.kind, e.value) not in have]
    if not new:
        return 0
    path = root.join(PATH)
    old = root.fs.cat_file(path) if root.exists(path) else b""
    lines = b"".join(json.dumps(asdict(e), sort_keys=True).encode() + b"\n" for e in new)
    root.makedirs(root.join("removals"))
    root.write_bytes_atomic(path, old + lines)
    return len(new)


def entries(kind: str, values: list[str], who: str, why: str) -> list[Removal]:
    now = round(time.time(), 3)
    return [Removal(kind, v, who, now, why) for v in dict.fromkeys(values)]
