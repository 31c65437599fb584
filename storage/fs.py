"""Data-root paths over fsspec: local folders and object stores (s3://, gs://, memory://) alike."""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from fsspec.core import url_to_fs

TMP_MARK = ".tmp-"
DIGEST_CHUNK = 1 << 20
# This process's writer id: carried in every temp name, so a run cleans up only the temps of
# writers that are gone (their lease expired or was released), never a live run's.
PROCESS_OWNER = uuid.uuid4().hex[:12]


@dataclass
class DataRoot:
    """A data root: `<root>/<stage>/<shard_id>.<ext>` plus manifests beside the shards."""

    uri: str
    owner: str = PROCESS_OWNER  # writer id in temp names (hex, no "-")
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    path: str = field(init=False)

    def __post_init__(self) -> None:
        if "://" not in self.uri:
            self.uri = os.path.abspath(self.uri)
        self.fs, self.path = url_to_fs(self.uri)
        self.path = self.path.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def join(self, *parts: str) -> str:
        """Filesystem path (no protocol) of `parts` under the root."""
        return posixpath.join(self.path, *parts)

    def resolve(self, path: str) -> str:
        """A config path: absolute or a URL as given, otherwise relative to the root."""
        return path if "://" in path or path.startswith("/") else self.join(path)

    def local_copy(self, path: str) -> str:
        """A local file for libraries that only open local paths (torch, open_clip, tokenizers):
        the path itself on a local root, else a copy cached once per machine, keyed by URL and by
        fsspec's `ukey` (size, ETag, mtime), so a re-fitted checkpoint at the same URL is fetched anew."""
        if self.is_local:
            return path
        self.fs.invalidate_cache(path)  # info() must see the object as it is now
        version = self.fs.ukey(path)[:16]  # a folder per version: the name keeps its suffix
        dest = os.path.join(tempfile.gettempdir(), "racm3-cache", version, self.url(path).replace("/", "_"))
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            part = f"{dest}.{uuid.uuid4().hex[:8]}.part"
            self.fs.get(path, part)
            os.replace(part, dest)  # atomic: concurrent workers never read a half copy
        return dest

    def url(self, path: str) -> str:
        """Full URL of a filesystem path (what users and DuckDB see)."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def rel(self, path: str) -> str:
        """Path relative to the root, used in manifests so a root can be moved."""
        p = self.fs._strip_protocol(path)
        return posixpath.relpath(p, self.path) if p.startswith(self.path) else path

    def stage_dir(self, stage: str) -> str:
        return self.join(stage)

    def artifact(self, stage: str, shard_id: str, suffix: str) -> str:
        return self.join(stage, f"{shard_id}.{suffix}")

    def manifest_path(self, stage: str, shard_id: str) -> str:
        return self.artifact(stage, shard_id, "manifest.json")

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def tmp_name(self, path: str) -> str:
        """A sibling temporary name carrying the writer id; renamed over `path` once complete."""
        return f"{path}{TMP_MARK}{self.owner}-{uuid.uuid4().hex[:8]}"

    def commit(self, tmp: str, final: str) -> None:
        """Atomically (on local and POSIX filesystems) move a finished temp file into place."""
        if self.is_local:
            os.replace(tmp, final)
        else:  # object stores: copy-then-delete is the best they offer; manifests still go last
            self.fs.invalidate_cache(posixpath.dirname(tmp))  # objects uploaded since listed
            if not self.fs.isdir(tmp):
                self.fs.mv(tmp, final)
                return
            # A folder is a key prefix: move its objects one by one (fsspec's recursive mv also
            # tries to copy the prefix itself, which is no object, and fails).
            for src in self.fs.find(tmp):
                self.fs.mv(src, posixpath.join(final, posixpath.relpath(src, tmp)))

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        self.makedirs(posixpath.dirname(path))
        tmp = self.tmp_name(path)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.commit(tmp, path)

    def clean_tmp(self, stage: str, keep: frozenset[str] | set[str] = frozenset()) -> int:
        """Remove temp files left by killed runs, except those of the writers in `keep`.

        The driver calls it holding the stage's lease, with `keep` = its own id, so the only
        other writers whose temps can be present are dead or have lost their lease.
        """
        d = self.stage_dir(stage)
        if not self.fs.exists(d):
            return 0
        found = self.fs.find(d, withdirs=True)
        stale = [p for p in found if TMP_MARK in posixpath.basename(p.rstrip("/"))
                 and tmp_owner(p) not in keep]
        removed = 0
        for p in sorted(stale, key=len):  # a temp folder first, then (already gone) its files
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)
                removed += 1
        return removed

    def glob(self, pattern: str) -> list[str]:
        return sorted(self.fs.glob(self.join(pattern)))

    def stages(self) -> Iterator[str]:
        if not self.fs.exists(self.path):
            return
        for p in sorted(self.fs.ls(self.path, detail=False)):
            if self.fs.isdir(p):
                yield posixpath.basename(p.rstrip("/"))


def tmp_owner(path: str) -> str:
    """The writer id in a temp name ("" for names from before ids were carried)."""
    tail = posixpath.basename(path.rstrip("/")).split(TMP_MARK, 1)[1]
    return tail.split("-", 1)[0] if "-" in tail else ""


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def file_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """sha256 of a file's (or a folder's files') bytes."""
    h = hashlib.sha256()
    paths = sorted(fs.find(path)) if fs.isdir(path) else [path]
    for p in paths:
        if fs.isdir(path):
            h.update(posixpath.relpath(p, path).encode())
        with fs.open(p, "rb") as f:
            while chunk := f.read(DIGEST_CHUNK):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def open_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path for any URL or local path."""
    return url_to_fs(url if "://" in url else os.path.abspath(url))
