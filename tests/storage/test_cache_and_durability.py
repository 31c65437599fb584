"""Caches of remote files are this user's (0700) and checked against a digest on fill and reuse;
a commit fsyncs the file and its folder before it counts."""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from storage.fs import DataRoot, file_digest, user_cache_dir


@pytest.fixture
def remote(tmp_path, monkeypatch):
    monkeypatch.setenv("RACM3_CACHE_DIR", str(tmp_path / "cache"))
    root = DataRoot(f"memory://racm3-cache-{uuid.uuid4().hex[:8]}")
    path = root.join("fit-clip", "model.pt")
    root.fs.pipe(path, b"genuine weights")
    return root, path


def test_cache_folders_are_private_to_the_user(remote, tmp_path):
    root, path = remote
    copy = root.local_copy(path)
    d = os.path.dirname(copy)
    while d != str(tmp_path):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
        d = os.path.dirname(d)
    os.chmod(tmp_path / "cache", 0o777)  # loosened by someone: tightened again before use
    user_cache_dir("files")
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700


def test_default_cache_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("RACM3_CACHE_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert user_cache_dir("files") == str(tmp_path / f"racm3-cache-{os.getuid()}" / "files")


def test_a_tampered_copy_is_fetched_again_on_reuse(remote):
    root, path = remote
    copy = root.local_copy(path)
    with open(copy, "wb") as f:  # planted or corrupted after the fill
        f.write(b"pickled payload")
    again = root.local_copy(path)
    assert open(again, "rb").read() == b"genuine weights"


def test_the_expected_digest_is_checked_on_fill_and_reuse(remote):
    root, path = remote
    good = file_digest(root.fs, path)
    assert open(root.local_copy(path, good), "rb").read() == b"genuine weights"
    with pytest.raises(OSError, match="expected sha256:0000"):
        root.local_copy(path, "sha256:" + "0" * 64)
    cached = root.cached(path, good, "index")
    open(cached, "wb").write(b"swapped")
    assert open(root.cached(path, good, "index"), "rb").read() == b"genuine weights"


def test_commit_fsyncs_the_file_then_its_folder(root, monkeypatch):
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        synced.append(f"rename {os.path.basename(dst)}")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = root.join("s", "00000.manifest.json")
    root.write_bytes_atomic(path, b"{}")
    tmp = next(p for p in synced if ".tmp-" in p)
    assert synced.index(tmp) < synced.index("rename 00000.manifest.json")
    assert synced[-1] == root.join("s")  # the rename itself made durable
