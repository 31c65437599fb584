"""Where a training run keeps checkpoints and logs: the data root (any fsspec URL) for checkpoints,
a local folder for Lightning's loggers that is copied to the data root when the root is remote."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tempfile

from storage.fs import DataRoot

log = logging.getLogger(__name__)


class WorkDir:
    """`workdir` is a data-root path (`train/<name>/<fingerprint>`). Lightning's ModelCheckpoint
    and checkpoint loading go through fsspec themselves, so checkpoints are written to the root's
    URL directly; loggers write to `local` (the workdir itself on a local root)."""

    def __init__(self, root: DataRoot, workdir: str, work_dir: str = ""):
        self.root, self.workdir = root, workdir
        if root.is_local:
            self.local = workdir
            os.makedirs(workdir, exist_ok=True)
        else:
            base = work_dir or os.path.join(tempfile.gettempdir(), "racm3-train")
            tag = hashlib.sha1(root.url(workdir).encode()).hexdigest()[:16]
            self.local = os.path.join(base, tag)
            os.makedirs(self.local, exist_ok=True)

    @property
    def checkpoint_dir(self) -> str:
        return self.root.url(posixpath.join(self.workdir, "checkpoints"))

    def fetch_last(self) -> str | None:
        """The URL of `last.ckpt` to resume from, or None."""
        path = posixpath.join(self.workdir, "checkpoints", "last.ckpt")
        return self.root.url(path) if self.root.exists(path) else None

    def finish(self) -> None:
        """Copy the local logs into the data root (remote roots only) and drop the local copy."""
        if self.root.is_local:
            return
        for dirpath, _, files in os.walk(self.local):
            for name in files:
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, self.local).replace(os.sep, "/")
                dst = posixpath.join(self.workdir, rel)
                self.root.makedirs(posixpath.dirname(dst))
                self.root.fs.put_file(src, dst)
        shutil.rmtree(self.local, ignore_errors=True)
        log.info("train: logs copied to %s", self.root.url(self.workdir))
