"""Removal on request: recorded append-only, applied by filter and download, checked by verify."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from storage import removals
from storage.manifest import list_manifests
from storage.removal_audit import leftovers, made_before_removal


def shard_rows(root, stage: str) -> list[dict]:
    return [r for m in list_manifests(root, stage) for p in m.outputs
            for r in pq.read_table(root.join(p)).to_pylist()]


def write(tmp_path, name: str, lines: list[str]) -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


@pytest.fixture
def downloaded(served):
    root, _, overrides = served
    cfgs = load_config("demo", overrides=overrides)
    assert run_stage("filter", root, cfgs).ok and run_stage("download", root, cfgs).ok
    return root, overrides


def test_remove_keys_urls_and_sha256_leaves_no_trace(downloaded, tmp_path, capsys):
    root, overrides = downloaded
    before = shard_rows(root, "download")
    ok = [r for r in before if r["status"] == "success"]
    by_key, by_url, by_sha = ok[0], ok[5], ok[9]
    digests_before = {m.shard_id: m.output_digest for m in list_manifests(root, "download")}
    shard_of = {r["key"]: m.shard_id for m in list_manifests(root, "download") for p in m.outputs
                for r in pq.read_table(root.join(p), columns=["key"]).to_pylist()}
    args = ["remove", "--data-root", root.path, "--who", "tester", "--why", "ticket 7",
            "--keys", write(tmp_path, "k.txt", [by_key["key"], "# a comment", "999-000000001"]),
            "--urls", write(tmp_path, "u.txt", [by_url["url"]]),
            "--sha256", write(tmp_path, "s.txt", [by_sha["sha256"].upper()]),
            *sum((["--set", o] for o in overrides), [])]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"key {by_key['key']}: 1 document" in out
    assert "key 999-000000001: 0 documents  (matches nothing now" in out  # reported, kept
    entries = removals.load(root)
    assert {(e.kind, e.who, e.why) for e in entries} >= {("key", "tester", "ticket 7")}
    assert len(entries) == 5  # + the key of the removed sha256

    rows = shard_rows(root, "download")
    gone = {by_key["key"], by_url["key"], by_sha["key"]}
    assert not gone & {r["key"] for r in rows}  # the bytes left the download shards
    assert not gone & {r["key"] for r in shard_rows(root, "filter")}  # url shards too
    assert len(rows) == len(before) - 3
    assert {r["key"]: r for r in rows} == {r["key"]: r for r in before if r["key"] not in gone}
    changed = {m.shard_id for m in list_manifests(root, "download")
               if m.output_digest != digests_before[m.shard_id]}
    assert changed == {shard_of[k] for k in gone} != set(digests_before)  # only those that held them
    assert sum(m.dropped.get("removed", 0) for m in list_manifests(root, "filter")) >= 2
    assert leftovers(root) == []
    assert main(["verify", "--data-root", root.path]) == 0

    # recording twice adds nothing
    assert main(args) == 0
    assert len(removals.load(root)) == 5


def test_removal_not_yet_applied_is_found_by_verify_and_status(downloaded, tmp_path, capsys):
    root, overrides = downloaded
    key = shard_rows(root, "download")[0]["key"]
    assert main(["remove", "--data-root", root.path, "--no-apply",
                 "--keys", write(tmp_path, "k.txt", [key])]) == 0
    left = leftovers(root)
    assert {x.stage for x in left} == {"filter", "download"}
    assert main(["verify", "--data-root", root.path]) == 1
    assert "REMOVED-DOCUMENTS" in capsys.readouterr().out
    assert made_before_removal(root) == {}  # no train/evaluate artifacts exist yet


@pytest.mark.parametrize("lines, msg", [
    (["not a key"], "k.txt:1: not a valid key"),
    (["000-000000001", "000-1"], "k.txt:2"),
])
def test_malformed_request_exits_2_and_records_nothing(tmp_path, capsys, lines, msg):
    root = tmp_path / "data"
    rc = main(["remove", "--data-root", str(root), "--keys", write(tmp_path, "k.txt", lines)])
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (root / removals.PATH).exists()


def test_binary_request_file_exits_2(tmp_path, capsys):
    p = tmp_path / "s.txt"
    p.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["remove", "--data-root", str(tmp_path / "d"), "--sha256", str(p)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_domain_matches_subdomains_only():
    rs = removals.RemovalSet(domains={"example.com"})
    assert rs.url_removed("https://img.example.com/a.jpg")
    assert rs.url_removed("http://EXAMPLE.com/a.jpg")
    assert not rs.url_removed("https://notexample.com/a.jpg")


def test_removal_file_is_append_only_json_lines(tmp_path):
    from storage.fs import DataRoot

    root = DataRoot(str(tmp_path / "d"))
    assert removals.append(root, removals.entries("domain", ["a.org"], "me", "why")) == 1
    first = (tmp_path / "d" / removals.PATH).read_bytes()
    assert removals.append(root, removals.entries("key", ["000-000000001"], "me", "")) == 1
    second = (tmp_path / "d" / removals.PATH).read_bytes()
    assert second.startswith(first)
    assert [json.loads(x)["kind"] for x in second.splitlines()] == ["domain", "key"]
