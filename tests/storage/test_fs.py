"""DataRoot.local_copy: a remote object is copied to local disk once, and again when it changes."""

from __future__ import annotations

import uuid

from storage.fs import DataRoot


def test_local_copy_is_cached_and_follows_a_rewritten_object():
    root = DataRoot(f"memory://racm3-test-{uuid.uuid4().hex[:8]}")
    path = root.join("fit-clip", "model.pt")
    root.fs.pipe(path, b"first weights")
    a = root.local_copy(path)
    assert open(a, "rb").read() == b"first weights"
    assert root.local_copy(path) == a  # unchanged: the cached copy
    root.fs.pipe(path, b"re-fitted weights, longer")  # the stage re-ran at the same URL
    b = root.local_copy(path)
    assert b != a and open(b, "rb").read() == b"re-fitted weights, longer"
    assert b.endswith("model.pt")  # loaders that look at the suffix still see it
