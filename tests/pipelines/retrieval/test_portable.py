"""Every Beam stage (download, embed, tokenize, retrieve) through Beam's portability layer, the
path Flink, Spark and Dataflow take, gives the rows of the local DirectRunner run; there the
index is also built as 2 sub-indexes on that runner, and retrieve's rows still match one index."""

from __future__ import annotations

import dataclasses
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.core.registry import load_config
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.runner import run_stage
from pipelines.retrieval.embed import EmbedConfig
from pipelines.retrieval.index import IndexConfig
from pipelines.retrieval.retrieve import RetrieveConfig
from storage.fs import DataRoot
from storage.manifest import list_manifests, read_manifest
from storage.shards import read_table
from tests.pipelines.retrieval.retrieval_helpers import CKPT, write_checkpoint

PORTABLE = BeamConfig(runner="PortableRunner",
                      options=("--job_endpoint=embed", "--environment_type=LOOPBACK"))
BEAM_STAGES = ("download", "embed", "tokenize", "retrieve")


def tiny_configs(overrides: list[str], beam: BeamConfig) -> dict:
    cfgs = load_config("demo", overrides=overrides)
    cfgs["fit_vqgan"] = dataclasses.replace(
        cfgs["fit_vqgan"], image_size=16, factor=4, codebook_size=16, channels=8, embed_dim=4,
        max_steps=2, batch_size=8, bpe_vocab_size=64, threads=1)
    cfgs["tokenize"] = dataclasses.replace(cfgs["tokenize"], image_size=16, factor=4,
                                           codebook_size=16, batch_size=16)
    cfgs["embed"] = EmbedConfig(checkpoint=CKPT)
    cfgs["retrieve"] = RetrieveConfig(top_n=8, k_max=2, variants=1)
    cfgs["run"] = RunConfig(retries=0)
    cfgs["beam"] = beam
    if beam.runner == "PortableRunner":  # and the index as 2 sub-indexes built on that runner
        cfgs["index"] = IndexConfig(shards=2, beam_options=(f"--runner={beam.runner}",
                                                            *beam.options))
    return cfgs


@pytest.mark.slow
def test_portable_runner_gives_the_rows_of_the_local_run(served, tmp_path):
    local, _, overrides = served
    assert run_stage("filter", local, tiny_configs(overrides, BeamConfig())).ok
    write_checkpoint(local)
    portable = DataRoot(str(tmp_path / "portable"))
    shutil.copytree(local.path, portable.path)
    for root, beam in ((local, BeamConfig()), (portable, PORTABLE)):
        cfgs = tiny_configs(overrides, beam)
        assert run_stage("download", root, cfgs).ok
        if root is portable:  # the fitted VQGAN is an input here, not what is compared
            shutil.copytree(local.join("fit-vqgan"), portable.join("fit-vqgan"))
        for stage in ("fit-vqgan", "embed", "tokenize", "index", "retrieve"):
            report = run_stage(stage, root, cfgs)
            assert report.ok, (stage, report.failed)
        assert all(m.metrics["queries"] > 0 for m in list_manifests(root, "retrieve"))
        assert list_manifests(root, "retrieve")
    assert not run_stage("fit-vqgan", portable, tiny_configs(overrides, PORTABLE)).ran
    assert read_manifest(portable, "index", "main").metrics["parts"] == 2
    for stage in BEAM_STAGES:
        shards = sorted(m.shard_id for m in list_manifests(local, stage))
        assert shards and shards == sorted(m.shard_id for m in list_manifests(portable, stage))
        for sid in shards:
            a = rows(local, stage, sid)
            b = rows(portable, stage, sid)
            assert a.num_rows == b.num_rows > 0, f"{stage}/{sid}"
            diff = [c for c in a.column_names if not a[c].equals(b[c])]
            assert not diff, f"{stage}/{sid} differs under the PortableRunner in {diff}"


def rows(root: DataRoot, stage: str, sid: str) -> pa.Table:
    """A shard's rows; download's error texts lose the object addresses PIL puts in them."""
    t = read_table(root, root.artifact(stage, sid, "parquet"))
    if stage == "download":
        i = t.column_names.index("error_message")
        t = t.set_column(i, "error_message",
                         pc.replace_substring_regex(t["error_message"], r"0x[0-9a-f]+", "0x"))
    return t
