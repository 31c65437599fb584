"""The shard contract: round trip, atomic commit, manifests last, fingerprints, resume."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard, shard_states
from storage.fs import DataRoot
from storage.manifest import InputRef, read_manifest, upstream_ref
from storage.shards import read_table, shard_path, write_table


class Doubler(Stage):
    """Doubles column `x` of its one input shard; fails on demand."""

    name = "double"
    version = "1"
    fail = False

    def plan(self, root, cfg):
        return [ShardSpec(self.name, sid, (upstream_ref(root, "src", sid),)) for sid in ("a", "b")]

    def run_shard(self, ctx, resources):
        t = ctx.read_input(0)
        ctx.write_table(pa.table({"x": pa.compute.multiply(t["x"], cfg_factor(ctx.cfg))}))
        if self.fail:
            raise RuntimeError("boom after writing")
        return ShardResult(rows_in=t.num_rows, rows_out=t.num_rows, dropped={"none": 0})

    def params(self, cfg):
        return {"factor": cfg_factor(cfg)}


def cfg_factor(cfg) -> int:
    return 2 if cfg is None else cfg


class Source(Stage):
    name = "src"

    def __init__(self, values):
        self.values = values

    def run_shard(self, ctx, resources):
        ctx.write_table(pa.table({"x": self.values}))
        return ShardResult(rows_out=len(self.values))


def write_src(root: DataRoot, sid: str, values: list[int]) -> None:
    execute_shard(Source(values), root, None, ShardSpec("src", sid, ()))


def test_parquet_round_trip(root):
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})
    p = shard_path(root, "s", "000")
    write_table(root, p, t)
    assert read_table(root, p).equals(t)
    assert not [f for f in root.fs.ls(root.stage_dir("s")) if ".tmp-" in f]


def test_round_trip_through_memory_filesystem():
    root = DataRoot("memory://racm3-test")
    write_src(root, "a", [1, 2])
    m = read_manifest(root, "src", "a")
    assert m is not None and m.rows_out == 2
    assert read_table(root, root.join("src", "a.parquet"))["x"].to_pylist() == [1, 2]


def test_manifest_records_contract_fields(root):
    write_src(root, "a", [1, 2])
    write_src(root, "b", [3])
    execute_shard(Doubler(), root, None, Doubler().plan(root, None)[0])
    m = read_manifest(root, "double", "a")
    assert m.stage == "double" and m.stage_version == "1" and m.rows_in == 2
    assert m.inputs[0].stage == "src" and m.inputs[0].digest.startswith("sha256:")
    assert m.output_digest.startswith("sha256:") and list(m.outputs) == ["double/a.parquet"]
    assert m.code_version and "compute_s" in m.timings and m.params == {"factor": 2}
    raw = json.loads(root.fs.cat(root.manifest_path("double", "a")))
    assert raw["fingerprint"] == m.fingerprint


def test_failed_shard_leaves_nothing_behind(root):
    write_src(root, "a", [1])
    write_src(root, "b", [2])
    stage = Doubler()
    stage.fail = True
    with pytest.raises(RuntimeError):
        execute_shard(stage, root, None, stage.plan(root, None)[0])
    assert not root.exists(root.join("double", "a.parquet"))
    assert read_manifest(root, "double", "a") is None
    assert root.fs.ls(root.stage_dir("double")) == []


def test_output_without_manifest_does_not_exist(root):
    """A crash between renaming the output and writing the manifest means: recompute."""
    write_src(root, "a", [1])
    write_src(root, "b", [2])
    write_table(root, root.join("double", "a.parquet"), pa.table({"x": [99]}))
    states = {s.spec.shard_id: s.state for s in shard_states(Doubler(), root, None)}
    assert states == {"a": "missing", "b": "missing"}


def test_fingerprints_track_params_and_inputs(root):
    write_src(root, "a", [1])
    write_src(root, "b", [2])
    stage = Doubler()
    for spec in stage.plan(root, None):
        execute_shard(stage, root, None, spec)
    assert {s.state for s in shard_states(stage, root, None)} == {"done"}
    # a parameter change makes every shard stale
    assert {s.state for s in shard_states(stage, root, 3)} == {"stale"}
    # an upstream change makes exactly the shard that reads it stale
    write_src(root, "b", [5])
    states = {s.spec.shard_id: s.state for s in shard_states(stage, root, None)}
    assert states == {"a": "done", "b": "stale"}
    # an upstream recomputed with identical content changes nothing downstream
    write_src(root, "a", [1])
    assert {s.spec.shard_id: s.state for s in shard_states(stage, root, None)}["a"] == "done"


def test_corrupt_manifest_means_recompute(root):
    write_src(root, "a", [1])
    root.fs.pipe(root.manifest_path("src", "a"), b"{not json")
    assert read_manifest(root, "src", "a") is None


def test_clean_tmp_removes_leftovers(root):
    root.makedirs(root.stage_dir("s"))
    leftover = root.tmp_name(root.join("s", "x.parquet"))
    root.fs.pipe(leftover, b"half")
    assert root.clean_tmp("s") == 1
    assert not root.exists(leftover)


def test_missing_upstream_is_a_clear_error(root):
    with pytest.raises(FileNotFoundError, match="racm3 run src"):
        upstream_ref(root, "src", "zzz")


def test_input_ref_detail_is_not_part_of_digest_identity():
    a = InputRef("p", "sha256:1", detail={"row_start": 0})
    assert a.path == "p" and a.detail["row_start"] == 0
