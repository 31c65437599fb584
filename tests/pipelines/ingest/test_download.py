"""Download against a local HTTP server: failing URLs become rows, reruns skip, kill -9 resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from pipelines.demo.paths import metadata_path
from storage.manifest import list_manifests
from storage.views import connect


def truth(root):
    t = pq.read_table(root.artifact("demo", "laion", "truth.parquet")).to_pylist()
    return {r["URL"]: r["kind"] for r in t}


def run(root, overrides, stage, **kw):
    return run_stage(stage, root, load_config("demo", overrides=overrides), **kw)


def test_download_statuses_match_what_the_server_serves(served):
    root, _, overrides = served
    assert run(root, overrides, "filter").ok
    report = run(root, overrides, "download")
    assert report.ok and report.ran
    kinds = truth(root)
    rows = connect(root).sql("select url, status, error_message, jpg, width, height, sha256, "
                             "pwatermark from download").fetchall()
    assert len(rows) == report.rows_out == report.rows_in
    for url, status, err, jpg, w, h, sha, pw in rows:
        kind = kinds[url]
        if kind == "clean":
            assert status == "success" and (w, h) == (256, 256) and jpg[:2] == b"\xff\xd8"
            assert len(sha) == 64 and pw is not None
        elif kind == "404":
            assert status == "failed_to_download" and "404" in err and jpg is None
        elif kind in ("html", "truncated"):
            assert status != "success" and err
    by_kind = {k: sum(1 for u, *_ in rows if kinds[u] == k) for k in ("404", "html", "truncated")}
    assert all(n > 0 for n in by_kind.values()), by_kind
    failed = sum(v for k, v in report.dropped.items())
    assert failed == sum(by_kind.values())


def test_rerun_skips_every_done_shard(served):
    root, _, overrides = served
    run(root, overrides, "filter")
    first = run(root, overrides, "download")
    again = run(root, overrides, "download")
    assert again.ran == [] and sorted(again.skipped) == sorted(first.ran)


def test_threshold_change_reruns_exactly_the_affected_downloads(served):
    root, _, overrides = served
    run(root, overrides, "filter")
    run(root, overrides, "download")
    # let the watermarked rows through: only shards holding one change
    changed = run(root, [*overrides, "filter.max_pwatermark=1.0"], "filter")
    digests = {m.shard_id: m.output_digest for m in list_manifests(root, "filter")}
    again = run(root, [*overrides, "filter.max_pwatermark=1.0"], "download")
    assert len(changed.ran) == len(digests)
    assert 0 < len(again.ran) < len(digests) or len(digests) == 1
    assert set(again.ran).isdisjoint(again.skipped)


def test_kill_9_then_rerun_gives_the_uninterrupted_rows(served):
    root, _, overrides = served
    run(root, overrides, "filter")
    n_shards = len(list_manifests(root, "filter"))
    args = [sys.executable, "-m", "flows.cli", "run", "download", "--local", "--data-root",
            root.uri, "--set", "download.threads=1"]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=str(Path(__file__).resolve().parents[3]))
    deadline = time.time() + 120
    while time.time() < deadline and not list_manifests(root, "download"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list_manifests(root, "download"))
    assert 0 < done_at_kill < n_shards, "the kill should land mid-stage"
    resumed = run(root, overrides, "download")
    assert resumed.ok and len(resumed.skipped) == done_at_kill
    after_resume = sorted(connect(root).sql("select key, status, sha256 from download").fetchall())
    clean = run(root, overrides, "download", force=True)
    assert clean.ok and len(clean.ran) == n_shards
    uninterrupted = sorted(connect(root).sql("select key, status, sha256 from download").fetchall())
    assert after_resume == uninterrupted
    assert len({k for k, *_ in after_resume}) == len(after_resume)  # no duplicates
    assert not [p for p in root.fs.find(root.stage_dir("download")) if ".tmp-" in p]


def test_metadata_is_deterministic_by_seed(small_demo, tmp_path):
    root, cfgs, overrides = small_demo
    from storage.fs import DataRoot

    other = DataRoot(str(tmp_path / "other"))
    run(other, overrides, "demo")
    assert pq.read_table(metadata_path(root)).equals(pq.read_table(metadata_path(other)))


def test_concurrent_shards_keep_stdout_and_stderr(served):
    """img2dataset's resizer dup2()s /dev/null over fds 1/2 per image, which broke the process
    under concurrent shards; ours resizes without the swap and without a lock. Shards at once,
    each with its own downloader and sharing one (a Beam worker), keep the fds and the rows."""
    import concurrent.futures

    from pipelines.core.registry import get_stage
    from pipelines.core.stage import execute_shard

    root, cfgs, overrides = served
    run(root, overrides, "filter")
    sequential = _rows(root) if run(root, overrides, "download").ok else None
    before = [os.fstat(fd).st_ino for fd in (1, 2)]
    stage = get_stage("download")
    specs = stage.plan(root, cfgs["download"])
    assert len(specs) >= 2
    shared = stage.load(cfgs["download"])
    for resources in (None, shared):
        with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
            list(pool.map(lambda s, r=resources: execute_shard(stage, root, cfgs["download"], s, r),
                          specs))
        assert [os.fstat(fd).st_ino for fd in (1, 2)] == before
        assert _rows(root) == sequential
    shared.close()


def _rows(root):
    return sorted(connect(root).sql("select key, status, error_message, sha256, jpg, width, height "
                                    "from download").fetchall())


@pytest.mark.slow  # two multi-process runners start their workers (~40 s on a loaded 2-core box)
def test_download_on_dask_and_multiprocess_beam_gives_the_local_rows(served, tmp_path):
    """The same URL shards through Beam's Dask runner (LocalCluster, 2 worker processes) and the
    DirectRunner's multi-process mode give the rows of the in-process run."""
    import shutil

    from dask.distributed import LocalCluster

    from storage.fs import DataRoot

    root, _, overrides = served
    overrides = [*overrides, "download.url_timeout_s=120"]  # rows must not depend on the load
    assert run(root, overrides, "filter").ok
    copies = {name: DataRoot(str(tmp_path / name)) for name in ("dask", "multi")}
    for other in copies.values():
        shutil.copytree(root.path, other.path)
    assert run(root, overrides, "download").ok
    local = _rows(root)
    multi = run(copies["multi"], [*overrides, "beam.direct_num_workers=2",
                                  "beam.direct_running_mode=multi_processing"], "download")
    assert multi.ok and _rows(copies["multi"]) == local
    with LocalCluster(n_workers=2, processes=True, host="127.0.0.1", threads_per_worker=1,
                      dashboard_address=None) as cluster:
        dask = run(copies["dask"], [
            *overrides, 'beam.runner="apache_beam.runners.dask.dask_runner.DaskRunner"',
            f'beam.options=["--dask_client_address={cluster.scheduler_address}"]'], "download")
    assert dask.ok, dask.failed
    assert _rows(copies["dask"]) == local
    assert sum(1 for r in local if r[1] == "success") > 0
