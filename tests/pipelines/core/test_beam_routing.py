"""Beam runs never start more worker processes than shards; one shard runs in this process,
and each manifest records how its shard ran."""

from __future__ import annotations

import time

import pyarrow as pa

from pipelines.core.beam import direct_workers, run_on_beam, runner_label
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.stage import ShardResult, ShardSpec, Stage
from storage.fs import DataRoot
from storage.lease import stage_lease
from storage.manifest import read_manifest


class Echo(Stage):
    name = "beam-echo"
    version = "1"
    engine = "beam"

    def run_shard(self, ctx, resources):
        ctx.write_table(pa.table({"shard": [ctx.spec.shard_id]}))
        return ShardResult(rows_out=1, metrics={"kept": True})


def test_workers_follow_the_shard_count():
    cfg = BeamConfig(direct_num_workers=2, direct_running_mode="multi_processing")
    assert direct_workers(cfg, 1) == (1, "in_memory")
    assert direct_workers(cfg, 2) == (2, "multi_processing")
    assert direct_workers(cfg, 50) == (2, "multi_processing")
    assert direct_workers(BeamConfig(direct_num_workers=1), 50) == (1, "in_memory")
    assert runner_label(cfg, 1) == "DirectRunner/in_memory x1"
    assert runner_label(cfg, 9) == "DirectRunner/multi_processing x2"


def test_one_shard_runs_in_process_and_the_manifest_says_so(tmp_path):
    root = DataRoot(str(tmp_path))
    cfg = BeamConfig(direct_num_workers=2, direct_running_mode="multi_processing")
    t0 = time.perf_counter()
    with stage_lease(root, "beam-echo", RunConfig()):  # as the driver does: commits are fenced
        failures = run_on_beam(Echo(), root, None, [ShardSpec("beam-echo", "00000", ())], cfg)
    assert failures == {}
    m = read_manifest(root, "beam-echo", "00000")
    assert m.metrics == {"kept": True, "runner": "DirectRunner/in_memory x1"}
    assert time.perf_counter() - t0 < 60  # no worker process start-up to wait for
