"""The one driver on its in-process executor: retries, shard concurrency, shard deadline."""

from __future__ import annotations

import time

import pytest

from pipelines.core.driver import InProcess, drive
from pipelines.core.runconfig import RunConfig
from storage.manifest import list_manifests, read_manifest
from tests.pipelines.core.toy_stage import Counters, ToyStage, toy_cfgs


@pytest.fixture(autouse=True)
def fresh_counters():
    Counters.reset()


def test_runs_pending_then_skips_done(root):
    report = drive(ToyStage(), root, toy_cfgs(), InProcess())
    assert report.ok and report.ran == ["000", "001", "002", "003"] and report.rows_out == 12
    again = drive(ToyStage(), root, toy_cfgs())
    assert again.ran == [] and len(again.skipped) == 4


def test_retries_take_effect(root):
    report = drive(ToyStage(), root, toy_cfgs(RunConfig(retries=2), fail_times=2, sleep_s=0))
    assert report.ok and all(Counters.attempts[s] == 3 for s in report.ran)
    Counters.reset()
    short = drive(ToyStage(), root, toy_cfgs(RunConfig(retries=1), fail_times=2, sleep_s=0),
                  force=True)
    assert set(short.failed) == {"000", "001", "002", "003"}
    assert "OSError: flaky attempt 2" in short.failed["000"]
    assert all(n == 2 for n in Counters.attempts.values())


def test_one_retry_policy_waits_with_backoff(root):
    """run.retry_delay_s before the first retry, doubled before each next (every executor)."""
    t0 = time.monotonic()
    report = drive(ToyStage(), root, toy_cfgs(RunConfig(retries=2, retry_delay_s=0.4,
                                                        shard_concurrency=4),
                                              fail_times=2, sleep_s=0))
    assert report.ok and all(Counters.attempts[s] == 3 for s in report.ran)
    assert time.monotonic() - t0 >= 0.4 + 0.8  # shards in parallel: one shard's two waits
    from pipelines.core.config import ConfigError

    with pytest.raises(ConfigError, match="run.retry_delay_s"):
        RunConfig(retry_delay_s=-1)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_shard_concurrency_takes_effect(root, concurrency):
    report = drive(ToyStage(), root,
                   toy_cfgs(RunConfig(shard_concurrency=concurrency), shards=6, sleep_s=0.3))
    assert report.ok and Counters.max_running == concurrency


def test_shard_timeout_stops_and_fails_the_shard(root):
    t0 = time.monotonic()
    report = drive(ToyStage(), root, toy_cfgs(RunConfig(shard_timeout_s=1.0, retries=3),
                                              hang="001", sleep_s=0.1))
    assert time.monotonic() - t0 < 15
    assert set(report.failed) == {"001"} and report.ran == ["000", "002", "003"]
    assert "ShardTimeout" in report.failed["001"] and "run.shard_timeout_s=1s" in report.failed["001"]
    assert Counters.attempts["001"] == 1  # a timeout is not retried
    assert Counters.hang_exit and float(Counters.hang_exit[0]) < 10  # the loop was really stopped
    assert read_manifest(root, "toy", "001") is None
    assert not root.glob("toy/001.parquet*")  # its temp output was cleaned up, nothing committed
    assert len(list_manifests(root, "toy")) == 3


@pytest.mark.slow
def test_beam_path_applies_the_same_policy_and_reports_progress_per_shard(root, tmp_path):
    from pipelines.core.progress import Snapshot
    from tests.pipelines.core.toy_stage import ToyBeamStage, ToyConfig

    stamps: list[tuple[float, Snapshot]] = []

    class Sink:
        def update(self, snap):
            stamps.append((time.monotonic(), snap))

        def close(self, snap):
            pass

    cfgs = {**toy_cfgs(RunConfig(retries=1, shard_timeout_s=4.0)),
            "toy_beam": ToyConfig(shards=4, sleep_s=1.5, fail_times=1, hang="003",
                                  trace=str(tmp_path))}
    report = drive(ToyBeamStage(), root, cfgs, InProcess(), sinks=[Sink()])
    assert report.ran == ["000", "001", "002"] and set(report.failed) == {"003"}
    attempts = {s: len((tmp_path / f"{s}.attempts").read_text().split()) for s in ("000", "003")}
    assert "ShardTimeout" in report.failed["003"] and attempts == {"000": 2, "003": 1}
    assert stamps[-1][0] - stamps[0][0] > 3  # shards reported as they committed, not at the end


def test_manifest_watch_lists_the_stage_once_per_poll_and_reads_only_new_manifests(root, monkeypatch):
    """Shards run by other processes are found by one listing per poll: with 300 pending shards
    and 2 committed, a poll opens 2 manifests, not 300 (thousands of requests on S3)."""
    from pipelines.core.driver import Job, ManifestWatch
    from pipelines.core.runconfig import BeamConfig
    from pipelines.core.stage import execute_shard
    from tests.pipelines.core.toy_stage import ToyConfig

    cfg = ToyConfig(shards=300, sleep_s=0.0)
    stage = ToyStage()
    specs = stage.plan(root, cfg)
    heard: list[str] = []
    job = Job(stage, root, cfg, RunConfig(), BeamConfig(), root.owner)
    monkeypatch.setattr(ManifestWatch, "POLL_S", 0.2)
    opened: list[str] = []
    real_open = root.fs.open

    def counting_open(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    with ManifestWatch(job, specs, lambda spec, m, err: heard.append(spec.shard_id)) as watch:
        for spec in specs[:2]:  # as a Beam worker would: a manifest appears in the data root
            execute_shard(stage, root, cfg, spec)
        monkeypatch.setattr(root.fs, "open", counting_open)
        deadline = time.monotonic() + 10
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a few more polls with nothing new
        monkeypatch.setattr(root.fs, "open", real_open)
        assert sorted(heard) == ["000", "001"]
        assert {p.rsplit("/", 1)[1] for p in opened} <= {"000.manifest.json", "001.manifest.json"}
        watch.finish({s.shard_id: "not run" for s in specs[2:]})
    assert len(heard) == 300
