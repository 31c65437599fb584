"""Beam runs never start more worker processes than shards; one shard runs in this process, a
small input on threads of it (beam.direct_running_mode "auto"), and each manifest records how its
shard ran."""

from __future__ import annotations

import threading
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
    one = BeamConfig(direct_num_workers=1, direct_running_mode="multi_processing")
    assert direct_workers(one, 50) == (1, "in_memory")
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


class Meet(Stage):
    """Two shards that can only finish together (a barrier): proof that they ran at once."""

    name = "beam-meet"
    version = "1"
    engine = "beam"
    barrier = threading.Barrier(2, timeout=60)
    loads: list[str] = []

    def load(self, cfg):
        Meet.loads.append(threading.current_thread().name)
        return threading.current_thread().name

    def run_shard(self, ctx, resources):
        Meet.barrier.wait()
        ctx.write_table(pa.table({"shard": [ctx.spec.shard_id]}))
        return ShardResult(rows_out=1, metrics={"thread": resources})


def test_auto_mode_routes_by_input_rows():
    cfg = BeamConfig(direct_num_workers=2, process_min_rows=1000)
    assert cfg.direct_running_mode == "auto"
    assert direct_workers(cfg, 4, 999) == (2, "in_process")
    assert direct_workers(cfg, 4, 1000) == (2, "multi_processing")
    assert direct_workers(cfg, 1, 10**9) == (1, "in_memory")
    assert direct_workers(cfg, 1, 10) == (1, "in_process")  # no Beam pipeline for a small shard
    assert runner_label(cfg, 4, 10) == "InProcess/threads x2"
    assert runner_label(cfg, 4, 5000) == "DirectRunner/multi_processing x2"


def test_small_input_runs_on_threads_each_with_its_own_resources(tmp_path):
    root = DataRoot(str(tmp_path))
    Meet.loads.clear()
    specs = [ShardSpec("beam-meet", f"{i:05d}", ()) for i in range(4)]
    t0 = time.perf_counter()
    with stage_lease(root, "beam-meet", RunConfig()):
        failures = run_on_beam(Meet(), root, None, specs, BeamConfig(direct_num_workers=2))
    assert failures == {}
    ms = [read_manifest(root, "beam-meet", s.shard_id) for s in specs]
    assert {m.metrics["runner"] for m in ms} == {"InProcess/threads x2"}
    assert len(Meet.loads) == 2 and len(set(Meet.loads)) == 2  # once per worker thread
    assert {m.metrics["thread"] for m in ms} == set(Meet.loads)
    assert time.perf_counter() - t0 < 60  # no worker process start-up to wait for


def test_a_failing_shard_is_reported_on_threads(tmp_path):
    root = DataRoot(str(tmp_path))

    class Fails(Echo):
        name = "beam-fails"

        def run_shard(self, ctx, resources):
            if ctx.spec.shard_id == "00001":
                raise ValueError("bad shard")
            return super().run_shard(ctx, resources)

    specs = [ShardSpec("beam-fails", f"{i:05d}", ()) for i in range(3)]
    with stage_lease(root, "beam-fails", RunConfig()):
        failures = run_on_beam(Fails(), root, None, specs, BeamConfig(direct_num_workers=2),
                               RunConfig(retries=0))
    assert list(failures) == ["00001"] and "bad shard" in failures["00001"]
    assert read_manifest(root, "beam-fails", "00001") is None
    assert read_manifest(root, "beam-fails", "00002").metrics["runner"] == "InProcess/threads x2"
