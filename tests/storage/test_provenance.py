"""Provenance: a key back to its metadata row (URL, caption, licence) and the fetch that stored it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from flows.cli import main
from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from pipelines.demo.paths import metadata_path
from storage.manifest import list_manifests
from storage.provenance import provenance, record_used, source_rows
from storage.removal_audit import outputs_using_removed
from storage.removals import append, entries


def test_key_resolves_to_its_metadata_row_and_fetch(served, capsys):
    root, _, overrides = served
    meta = pq.read_table(root.join(metadata_path(root)))
    licences = [f"cc-by-{i}" for i in range(meta.num_rows)]
    root.makedirs(root.join("meta"))
    pq.write_table(meta.append_column("LICENSE", pa.array(licences)),
                   root.join("meta/part.parquet"), row_group_size=17)  # several row groups
    cfgs = load_config("demo", overrides=[*overrides, "filter.metadata=meta/*.parquet"])
    assert run_stage("filter", root, cfgs).ok and run_stage("download", root, cfgs).ok
    rows = [r for m in list_manifests(root, "download") for p in m.outputs
            for r in pq.read_table(root.join(p)).to_pylist()]
    picks = [rows[0], rows[len(rows) // 2], rows[-1]]
    got = provenance(root, [r["key"] for r in picks] + ["999-000000000", "bogus"])
    assert set(got) == {r["key"] for r in picks}  # unknown keys are left out
    for r in picks:
        p = got[r["key"]]
        n = int(r["key"].split("-")[1])
        assert (p.url, p.caption) == (r["url"], r["caption"]) == (
            meta["URL"][n].as_py(), meta["TEXT"][n].as_py())
        assert p.license == licences[n] and p.metadata_row == n
        assert p.download_shard and p.fetched_at is not None
    assert main(["lineage", "--data-root", root.path, picks[1]["key"]]) == 0
    out = capsys.readouterr().out
    assert picks[1]["url"] in out and "license: cc-by-" in out
    assert main(["lineage", "--data-root", root.path, "999-000000000"]) == 2

    # what the report and generation pages show, and the flag on an output that used a removed one
    k0, k1 = picks[0]["key"], picks[1]["key"]
    n1 = int(k1.split("-")[1])
    rows = source_rows(root, [k1, "bogus"])
    assert rows[0][:3] == [k1, meta["URL"][n1].as_py(), meta["TEXT"][n1].as_py()]
    assert rows[0][3].startswith("20") and rows[0][4] == licences[n1]  # ISO fetch time, licence
    assert rows[1] == ["bogus", "—", "—", "—", "—"]
    record_used(root, "generate", "/pages/a.html", [k0, k1])
    assert outputs_using_removed(root) == {}
    append(root, entries("url", [picks[0]["url"]], "test", "by URL"))
    assert outputs_using_removed(root) == {"generate:/pages/a.html": [k0]}  # resolved to its key
