"""Manifests in a shared data root are untrusted data: a crafted or corrupt one is skipped with a
warning, never run as SQL, never followed outside the root, never fatal to status/inspect/verify."""

from __future__ import annotations

import json
import logging

from flows.cli import main
from storage.fs import file_digest
from storage.manifest import list_manifests, read_manifest
from storage.verify import verify
from storage.views import connect, views
from tests.factories import make_download_shard


def forge(root, rel: str, **changes) -> str:
    """A copy of download/00000's manifest at `rel` with `changes`."""
    m = json.loads(root.fs.cat(root.manifest_path("download", "00000")))
    m.update(changes)
    path = root.join(rel)
    root.fs.pipe_file(path, json.dumps(m).encode())
    return path


def test_a_stage_name_is_never_sql(root, tmp_path):
    make_download_shard(root, "00000", 3)
    pwned = tmp_path / "pwned.csv"
    evil = f"x\" AS SELECT 1; COPY (SELECT 42) TO '{pwned}'; CREATE VIEW \"y"
    forge(root, "download/00001.manifest.json", stage=evil, shard_id="00001")
    con = connect(root)
    assert not pwned.exists()
    assert set(views(root)) == {"manifests", "download"}
    assert con.sql("select count(*) from manifests").fetchall() == [(1,)]


def test_a_manifest_must_name_its_own_location(root, caplog):
    make_download_shard(root, "00000", 3)
    forge(root, "download/00001.manifest.json", shard_id="00007")  # copied under another name
    with caplog.at_level(logging.WARNING, logger="racm3"):
        assert [m.shard_id for m in list_manifests(root)] == ["00000"]
    assert "download/00001.manifest.json" in caplog.text
    assert read_manifest(root, "download", "00001") is None


def test_output_paths_and_shard_ids_stay_inside_the_root(root, tmp_path):
    make_download_shard(root, "00000", 3)
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not yours")
    digest = file_digest(root.fs, str(outside))
    forge(root, "download/00001.manifest.json", shard_id="00001",
          outputs={"../secret.bin": digest})
    forge(root, "download/00002.manifest.json", shard_id="00002",
          outputs={"download/../../secret.bin": "sha256:0"})
    forge(root, "download/00003.manifest.json", shard_id="../../escape")
    checked, findings = verify(root)
    assert (checked, findings) == (1, [])  # only the genuine shard; the outside file is not read
    assert outside.read_bytes() == b"not yours"
    assert not list(tmp_path.glob("**/escape*"))  # nothing moved aside outside the root


def test_corrupt_manifests_are_skipped_by_status_inspect_and_verify(root, capsys, caplog):
    make_download_shard(root, "00000", 3)
    root.fs.pipe_file(root.join("download", "00001.manifest.json"), b"\xff\xfe{not utf-8")
    root.fs.pipe_file(root.join("download", "00002.manifest.json"), b"[1, 2, 3]")
    root.fs.pipe_file(root.join("download", "00003.manifest.json"), b'"a string"')
    with caplog.at_level(logging.WARNING, logger="racm3"):
        assert [m.shard_id for m in list_manifests(root)] == ["00000"]
    assert caplog.text.count("skipping manifest") == 3
    assert verify(root) == (1, [])
    for args in (["status"], ["inspect", "select count(*) from download"], ["verify"]):
        assert main([*args, "--data-root", root.uri]) == 0, args
    assert "3" in capsys.readouterr().out
