"""Data-root paths over fsspec: local folders and object stores (s3://, gs://, memory://) alike."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger("racm3")
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

    def local_copy(self, path: str, digest: str | None = None) -> str:
        """A local file for libraries that only open local paths (torch, open_clip, tokenizers):
        the path itself on a local root, else a copy in this user's cache, keyed by URL and by
        fsspec's `ukey` (size, ETag, mtime), so a re-fitted checkpoint at the same URL is fetched
        anew; its bytes are checked against `digest` (else the digest recorded when it was
        fetched) on fill and on every reuse, since torch.load and faiss trust what they read."""
        if self.is_local:
            return path
        self.fs.invalidate_cache(path)  # info() must see the object as it is now
        version = self.fs.ukey(path)[:16]  # a folder per version: the name keeps its suffix
        return self.cached(path, digest, "files", os.path.join(version, self.url(path).replace("/", "_")))

    def cached(self, path: str, digest: str | None, kind: str, name: str | None = None) -> str:
        """`path` copied into this user's cache folder `kind` as `name` (default: digest and
        basename), verified against `digest` on fill and reuse (see `verified_copy`)."""
        name = name or f"{(digest or 'nodigest').removeprefix('sha256:')[:32]}-{posixpath.basename(path)}"
        dest = os.path.join(user_cache_dir(kind), name)
        os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
        return verified_copy(self.fs, path, dest, digest)

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
            # Durable before it counts: the bytes, then the rename (its folder entry). Without the
            # fsyncs a power loss can leave a manifest naming a torn or empty shard.
            fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_dir(os.path.dirname(final))
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


def fsync_tree(path: str) -> None:
    """fsync a file, or every file and folder of a folder (a written shard folder)."""
    if not os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for d, _, files in os.walk(path):
        for f in files:
            fsync_tree(os.path.join(d, f))
        fsync_dir(d)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def user_cache_dir(kind: str) -> str:
    """`<tmp>/racm3-cache-<uid>/<kind>`, this user's alone (0700): another user who could write
    there could plant a checkpoint or an index for torch.load or faiss to read."""
    base = os.environ.get("RACM3_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"racm3-cache-{os.getuid()}")
    for d in (base, os.path.join(base, kind)):
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"cache folder {d} is not a folder owned by this user; remove it "
                                  "or set RACM3_CACHE_DIR")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(d, 0o700)
    return os.path.join(base, kind)


def local_digest(path: str) -> str:
    return file_digest(fsspec.filesystem("file"), path)


def verified_copy(fs: fsspec.AbstractFileSystem, path: str, dest: str, digest: str | None) -> str:
    """`dest` holding `path`'s bytes. Checked against `digest` (else against the digest recorded
    at fill) on fill and on every reuse; a copy that does not match is fetched again, and a fetch
    that does not match `digest` raises OSError. Filled under a temp name and renamed, so
    concurrent workers never read half a copy."""
    record = dest + ".sha256"
    if os.path.exists(dest):
        want = digest or (_read_text(record) if os.path.exists(record) else None)
        if want and local_digest(dest) == want:
            return dest
        log.warning("cache: %s does not match its digest; fetching it again", dest)
        _remove(dest)
    part = f"{dest}.{uuid.uuid4().hex[:8]}.part"
    fs.get(path, part)
    got = local_digest(part)
    if digest and got != digest:
        _remove(part)
        raise OSError(f"{path}: fetched content has digest {got}, expected {digest}")
    with open(f"{record}.{uuid.uuid4().hex[:8]}", "w") as f:
        f.write(got)
    os.replace(f.name, record)
    os.replace(part, dest)
    return dest


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
