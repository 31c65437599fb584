"""Extend end to end: a second metadata file makes only new shards in filter, download, embed,
decontaminate and tokenize; the index adds them to the built one (no rebuild) and retrieve then
finds the new documents."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from pipelines.demo.paths import metadata_path
from pipelines.retrieval.faiss_index import load_index
from storage.manifest import list_manifests, read_manifest
from tests.pipelines.generation.conftest import FIT, TOK
from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint

PER_SHARD = ("filter", "download", "embed", "decontaminate", "tokenize")


def keys(root, stage: str, column: str = "key") -> set[str]:
    out: set[str] = set()
    for m in list_manifests(root, stage):
        for p in (p for p in m.outputs if p.endswith(".parquet")):
            for v in pq.read_table(root.join(p), columns=[column])[column].to_pylist():
                out.update(v if isinstance(v, list) else [v])
    return out


@pytest.mark.slow
def test_a_second_metadata_file_is_added_through_every_stage(served):
    root, _, overrides = served
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    table = pq.read_table(root.join(metadata_path(root)))
    half = table.num_rows // 2
    root.makedirs(root.join("meta"))
    pq.write_table(table.slice(0, half), root.join("meta/part-0.parquet"))
    cfgs = {**load_config("demo", overrides=[*overrides, "filter.metadata=meta/*.parquet"]),
            **configs(fit_vqgan=replace(FIT, holdout_fraction=0.3), tokenize=TOK)}
    write_checkpoint(root)  # the CLIP and (below) the VQGAN stay fixed, as real weights do
    first = {s: run_stage(s, root, cfgs) for s in ("filter", "download", "embed", "decontaminate",
                                                    "fit-vqgan", "tokenize", "index", "retrieve")}
    assert all(r.ok for r in first.values()), {s: r.failed for s, r in first.items()}
    index_before = read_manifest(root, "index", "main")

    pq.write_table(table.slice(half), root.join("meta/part-1.parquet"))
    second = {s: run_stage(s, root, cfgs) for s in (*PER_SHARD, "index", "retrieve")}
    new = set(second["filter"].ran)
    assert new and not new & set(first["filter"].ran)
    for s in PER_SHARD:  # only the new file's shards, nothing done is redone
        assert set(second[s].ran) == new and set(second[s].skipped) == set(first[s].ran), s
    m = read_manifest(root, "index", "main")
    assert second["index"].ran == ["main"] and m.metrics["built"] == "added"
    assert m.metrics["added"][0]["shards"] == sorted(new)
    assert m.metrics["trained_at"] == index_before.metrics["trained_at"]
    embedded = keys(root, "embed")
    assert set(load_index(root).keys) == embedded  # the memory holds old and new documents
    new_docs = embedded - {k for k in embedded if k.startswith("000-")}
    assert new_docs and new_docs <= keys(root, "retrieve")  # each new document was searched
    assert keys(root, "retrieve", "neighbor_keys") & new_docs  # and is somebody's neighbour
    torch.set_num_threads(before)
