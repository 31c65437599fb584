"""New metadata files add shards through filter and download; nothing done is redone or renamed."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from pipelines.demo.paths import metadata_path
from storage.manifest import list_manifests


def keys_by_url(root, stage: str) -> dict[str, str]:
    return {r["url"]: r["key"] for m in list_manifests(root, stage) for p in m.outputs
            for r in pq.read_table(root.join(p)).to_pylist()}


def test_a_new_metadata_file_only_adds_shards(served):
    root, _, overrides = served
    table = pq.read_table(root.join(metadata_path(root)))
    half = table.num_rows // 2
    root.makedirs(root.join("meta"))
    pq.write_table(table.slice(half), root.join("meta/part-1.parquet"))
    cfgs = load_config("demo", overrides=[*overrides, "filter.metadata=meta/*.parquet"])

    first = run_stage("filter", root, cfgs)
    assert first.ok and first.ran
    run_stage("download", root, cfgs)
    keys_before = keys_by_url(root, "download")

    # a new file that sorts BEFORE the known one: known rows must keep their keys
    pq.write_table(table.slice(0, half), root.join("meta/part-0.parquet"))
    second = run_stage("filter", root, cfgs)
    assert second.ok and set(second.skipped) == set(first.ran)
    assert second.ran and not set(second.ran) & set(first.ran)
    dl = run_stage("download", root, cfgs)
    assert dl.ok and sorted(dl.ran) == sorted(second.ran)  # only the new shards are fetched
    keys_after = keys_by_url(root, "download")
    assert all(keys_after[u] == k for u, k in keys_before.items())
    assert len(keys_after) > len(keys_before)
    assert len(set(keys_after.values())) == len(keys_after)  # no key given twice
