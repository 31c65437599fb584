"""The one stage driver: take the stage's lease, clean dead writers' temps, plan the pending
shards, and run them (a Beam stage as one Beam pipeline, any other stage's shards mapped by an
executor: in-process threads or Prefect tasks), with progress.

`drive` owns every choice; an executor only maps `run_shard` over the specs, and `run_shard` is the
one run policy (`run.retries`, `run.retry_delay_s`, `run.shard_timeout_s`, see attempt.py). In code,
run a stage with `pipelines.core.runner.run_stage(name, root, cfgs)`.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

from pipelines.core.attempt import run_with_retries
from pipelines.core.progress import Progress, ProgressSink
from pipelines.core.report import StageReport
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.stage import ShardSpec, Stage, shard_states
from storage.fs import DataRoot
from storage.manifest import Manifest, read_manifest

log = logging.getLogger("racm3")

# (spec, manifest on success, error on failure); executors may call it from any thread.
OnResult = Callable[[ShardSpec, Manifest | None, str | None], None]
# One shard under the run policy: (manifest, None) or (None, error); never raises.
RunShard = Callable[[ShardSpec], tuple[Manifest | None, str | None]]


@dataclass(frozen=True)
class Job:
    """Everything an executor needs to run a stage's shards."""

    stage: Stage
    root: DataRoot
    cfg: Any
    run: RunConfig
    beam: BeamConfig
    owner: str  # writer id (the lease holder) carried in temp names


class Executor(Protocol):
    """Maps `run_shard` over `specs` (at most `run.shard_concurrency` at once), reporting each."""

    def map(self, job: Job, run_shard: RunShard, specs: list[ShardSpec],
            on_result: OnResult) -> None: ...


class InProcess:
    """Shards on `run.shard_concurrency` threads of this process."""

    def map(self, job: Job, run_shard: RunShard, specs: list[ShardSpec],
            on_result: OnResult) -> None:
        workers = min(job.run.shard_concurrency, len(specs))
        if workers <= 1:
            for spec in specs:
                on_result(spec, *run_shard(spec))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix=f"racm3-{job.stage.name}") as pool:
            futures = {pool.submit(run_shard, spec): spec for spec in specs}
            for fut in as_completed(futures):
                on_result(futures[fut], *fut.result())


def shard_runner(job: Job) -> RunShard:
    """`run_shard` for a local-engine stage: its resources loaded once, the one retry policy."""
    resources = job.stage.load(job.cfg)

    def run_shard(spec: ShardSpec) -> tuple[Manifest | None, str | None]:
        return run_with_retries(job.stage, job.root, job.cfg, spec, resources, job.run, job.owner)

    return run_shard


def run_beam(job: Job, specs: list[ShardSpec], on_result: OnResult) -> None:
    """A Beam stage's pending shards as one Beam pipeline on `beam.runner` (same policy per shard)."""
    from pipelines.core.beam import run_on_beam

    with ManifestWatch(job, specs, on_result) as watch:
        failures = run_on_beam(job.stage, job.root, job.cfg, specs, job.beam, job.run, job.owner,
                               on_shard=watch.shard_ran)
    watch.finish(failures)


class ManifestWatch:
    """Reports shards run elsewhere (Beam workers, on any runner) as their manifests appear in the
    data root, so progress advances per shard; `finish` reports the rest once the runner is done.
    The watcher thread runs in the caller's context (a Prefect flow run's, for its artifacts)."""

    POLL_S = 2.0

    def __init__(self, job: Job, specs: list[ShardSpec], on_result: OnResult):
        self.job, self.on_result = job, on_result
        self.left = {s.shard_id: s for s in specs}
        self.t0 = time.time() - 1.0  # manifests older than this run are an earlier run's
        self.stop = threading.Event()
        self.lock = threading.Lock()
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self._watch,), daemon=True,
                                       name=f"racm3-watch-{job.stage.name}")

    def __enter__(self) -> ManifestWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stop.wait(self.POLL_S):
            for sid in self._listed():
                m = read_manifest(self.job.root, self.job.stage.name, sid)
                if m is not None and m.created_at >= self.t0:
                    self._report(sid, m, None)

    def _listed(self) -> list[str]:
        """Pending shards whose manifest file exists: one listing of the stage's folder per poll
        (one LIST request on an object store), not one read per pending shard (thousands of
        requests every POLL_S on a large stage). The listing cache is dropped first: the
        manifests are written by other processes."""
        with self.lock:
            left = set(self.left)
        if not left:
            return []
        root, stage = self.job.root, self.job.stage.name
        root.fs.invalidate_cache(root.join(stage))
        present = {p.rsplit("/", 1)[1].removesuffix(".manifest.json")
                   for p in root.glob(f"{stage}/*.manifest.json")}
        return sorted(left & present)

    def _report(self, sid: str, m: Manifest | None, error: str | None) -> None:
        with self.lock:
            spec = self.left.pop(sid, None)
        if spec is not None:
            self.on_result(spec, m, error)

    def shard_ran(self, sid: str, error: str) -> None:
        """A shard run in this process reports itself at once (no poll to wait for)."""
        m = None if error else read_manifest(self.job.root, self.job.stage.name, sid)
        self._report(sid, m, error or (None if m else "no manifest after the shard ran"))

    def finish(self, failures: dict[str, str]) -> None:
        for sid in list(self.left):
            err = failures.get(sid)
            m = None if err else read_manifest(self.job.root, self.job.stage.name, sid)
            self._report(sid, m, err or (None if m else "no manifest after the shard ran"))


def pending(stage: Stage, root: DataRoot, cfg: Any, force: bool) -> tuple[list[ShardSpec], list[str]]:
    """(specs to run, shard ids already done)."""
    todo, done = [], []
    for s in shard_states(stage, root, cfg):
        if s.state == "done" and not force:
            done.append(s.spec.shard_id)
        else:
            todo.append(s.spec)
    return todo, done


def drive(stage: Stage, root: DataRoot, cfgs: dict[str, Any], executor: Executor | None = None,
          force: bool = False, sinks: Iterable[ProgressSink] = ()) -> StageReport:
    """Run `stage`'s pending shards and report: a Beam stage on its runner, any other's shards
    mapped by `executor` (default: threads of this process)."""
    from storage.lease import stage_lease

    t0 = time.time()
    run: RunConfig = cfgs.get("run") or RunConfig()
    cfg = cfgs.get(stage.section)
    with stage_lease(root, stage.name, run) as lease:
        cleaned = root.clean_tmp(stage.name, keep={lease.owner})
        if cleaned:
            log.info("%s: removed %d temp files left by an interrupted run", stage.name, cleaned)
        todo, done = pending(stage, root, cfg, force)
        report = StageReport(stage.name, skipped=done)
        log.info("%s: %d shards to run, %d already done", stage.name, len(todo), len(done))
        if todo:
            job = Job(stage, root, cfg, run, cfgs.get("beam") or BeamConfig(), lease.owner)
            progress = Progress(stage.name, len(todo), sinks)
            lock = threading.Lock()

            def on_result(spec: ShardSpec, m: Manifest | None, error: str | None) -> None:
                with lock:  # executors call back from their worker threads
                    if m is not None:
                        report.add(m)
                    else:
                        report.failed[spec.shard_id] = error or "failed"
                    progress.shard_done((m.rows_in or m.rows_out) if m else 0, failed=m is None)  # a source: its output

            try:
                if stage.engine == "beam":
                    run_beam(job, todo, on_result)
                else:
                    (executor or InProcess()).map(job, shard_runner(job), todo, on_result)
            finally:
                progress.close()
    report.finish()
    report.seconds = time.time() - t0
    return report
