"""Run a stage's stale shards as a Beam pipeline (one element per shard, model loaded per worker),
or, for a small input on the DirectRunner, on threads of this process."""

from __future__ import annotations

import contextvars
import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core.attempt import run_with_retries
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.stage import ShardSpec, Stage
from storage.fs import DataRoot
from storage.manifest import read_manifest

log = logging.getLogger(__name__)


class ShardDoFn(beam.DoFn):
    """Executes shards under the shard contract and the run policy (retries, deadline).

    Holds only names and config, so it pickles to any runner's workers.
    """

    def __init__(self, stage: Stage, root_uri: str, cfg: Any, run: RunConfig, owner: str,
                 runner: str = ""):
        self.stage_ref = type(stage)
        self.root_uri, self.cfg, self.run, self.owner = root_uri, cfg, run, owner
        self.runner = runner  # how the shards ran, recorded in each manifest's metrics

    def setup(self) -> None:
        self.stage = self.stage_ref()
        if self.runner:
            self.stage.run_shard = self._recorded(self.stage.run_shard)  # type: ignore[method-assign]
        self.root = DataRoot(self.root_uri, owner=self.owner)  # temps carry the lease holder's id
        self.resources = self.stage.load(self.cfg)  # once per worker, as DoFn.setup promises

    def _recorded(self, run_shard: Any) -> Any:
        def run(ctx: Any, resources: Any) -> Any:
            result = run_shard(ctx, resources)
            result.metrics.setdefault("runner", self.runner)
            return result
        return run

    def process(self, spec: ShardSpec):
        m, err = run_with_retries(self.stage, self.root, self.cfg, spec, self.resources, self.run,
                                  self.owner)
        if m is not None:
            log.info("%s/%s done: %d rows", self.stage.name, m.shard_id, m.rows_out)
        yield (spec.shard_id, err or "")


def direct_workers(bcfg: BeamConfig, shards: int | None = None,
                   rows: int | None = None) -> tuple[int, str]:
    """(workers, running mode) of the DirectRunner: never more workers than shards. Mode "auto"
    is "in_process" (threads of this process, no Beam pipeline) below `process_min_rows` input
    rows; otherwise one worker runs in this process (`in_memory`: a worker process gains nothing
    for one shard and costs its start-up, ~15 s on 2 cores) and several are worker processes."""
    workers = max(1, min(bcfg.direct_num_workers, shards or bcfg.direct_num_workers))
    auto = bcfg.direct_running_mode == "auto"
    if auto and (rows is None or rows < bcfg.process_min_rows):
        return workers, "in_process"
    if workers == 1:
        return 1, "in_memory"
    return workers, "multi_processing" if auto else bcfg.direct_running_mode


def runner_label(bcfg: BeamConfig, shards: int | None = None, rows: int | None = None) -> str:
    """What a manifest records as its `runner` metric, e.g. `DirectRunner/in_memory x1` or
    `InProcess/threads x2` (the DirectRunner's shards on threads of the driving process)."""
    if bcfg.runner != "DirectRunner":
        return bcfg.runner
    workers, mode = direct_workers(bcfg, shards, rows)
    return f"InProcess/threads x{workers}" if mode == "in_process" else f"DirectRunner/{mode} x{workers}"


def pipeline_options(bcfg: BeamConfig, shards: int | None = None,
                     rows: int | None = None) -> PipelineOptions:
    args = [f"--runner={bcfg.runner}"]
    if bcfg.runner == "DirectRunner":
        workers, mode = direct_workers(bcfg, shards, rows)
        mode = "multi_threading" if mode == "in_process" else mode  # asked for a Beam pipeline
        args += [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]
    return PipelineOptions([*args, *bcfg.options])  # the user's options come last and win


def input_rows(root: DataRoot, specs: list[ShardSpec]) -> int:
    """Rows of the specs' first inputs, as their upstream manifests recorded them (0 if none)."""
    total = 0
    for spec in specs:
        ref = spec.inputs[0] if spec.inputs else None
        m = read_manifest(root, ref.stage, ref.shard_id) if ref and ref.stage else None
        total += m.rows_out if m else 0
    return total


def run_on_beam(stage: Stage, root: DataRoot, cfg: Any, specs: list[ShardSpec],
                bcfg: BeamConfig, run: RunConfig | None = None, owner: str | None = None,
                on_shard: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Run `specs` on the configured runner; returns {shard_id: error} for shards that failed.
    On threads of this process `on_shard(shard_id, error or "")` hears of each shard at once."""
    for spec in specs:  # error files of an earlier killed run are not this run's
        if root.exists(_failure_path(root, stage.name, spec.shard_id)):
            root.fs.rm(_failure_path(root, stage.name, spec.shard_id))
    user_decides = any(o.startswith(("--runner", "--direct_")) for o in bcfg.options)
    auto = bcfg.runner == "DirectRunner" and bcfg.direct_running_mode == "auto"
    rows = input_rows(root, specs) if auto and not user_decides else None
    label = "" if user_decides else runner_label(bcfg, len(specs), rows)
    why = f" ({rows:,} input rows, beam.process_min_rows {bcfg.process_min_rows:,})" if auto and rows is not None else ""
    log.info("%s: %d shards on %s%s", stage.name, len(specs), label or "the runner in beam.options", why)
    dofn = ShardDoFn(stage, root.uri, cfg, run or RunConfig(), owner or root.owner, label)
    if label.startswith("InProcess/"):
        return run_in_threads(dofn, specs, direct_workers(bcfg, len(specs), rows)[0], on_shard)
    with beam.Pipeline(options=pipeline_options(bcfg, len(specs), rows)) as p:
        results = (
            p
            | f"{stage.name}:shards" >> beam.Create(specs)
            | f"{stage.name}:spread" >> beam.Reshuffle()
            | f"{stage.name}:execute" >> beam.ParDo(dofn)
        )
        errors = results | f"{stage.name}:errors" >> beam.Filter(lambda kv: bool(kv[1]))
        # Errors come back through the data root so no driver state is needed on any runner.
        errors | f"{stage.name}:record" >> beam.Map(_record_failure, root.uri, stage.name)
    wanted = {s.shard_id for s in specs}
    return {sid: err for sid, err in _read_failures(root, stage.name) if sid in wanted}


def run_in_threads(dofn: ShardDoFn, specs: list[ShardSpec], workers: int,
                   on_shard: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """The DoFn's shards on `workers` threads of this process, each thread with its own set-up
    copy (its own stage resources, as a Beam worker has): the same work as on Beam, without a
    worker process to start. Threads run in the caller's context (a Prefect flow run's)."""
    local = threading.local()

    def one(spec: ShardSpec) -> tuple[str, str]:
        fn = getattr(local, "dofn", None)
        if fn is None:
            fn = local.dofn = copy.copy(dofn)
            fn.setup()
        sid, err = next(iter(fn.process(spec)))
        if on_shard is not None:
            on_shard(sid, err)
        return sid, err

    with ThreadPoolExecutor(workers, thread_name_prefix=f"racm3-{dofn.stage_ref.name}") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, spec) for spec in specs]
        return {sid: err for sid, err in (f.result() for f in futures) if err}


def _failure_path(root: DataRoot, stage: str, shard_id: str) -> str:
    return root.artifact(stage, shard_id, "error.txt")


def _record_failure(kv: tuple[str, str], root_uri: str, stage: str) -> None:
    root = DataRoot(root_uri)
    root.write_bytes_atomic(_failure_path(root, stage, kv[0]), kv[1].encode())


def _read_failures(root: DataRoot, stage: str) -> list[tuple[str, str]]:
    out = []
    for p in root.glob(f"{stage}/*.error.txt"):
        shard_id = p.rsplit("/", 1)[1].removesuffix(".error.txt")
        with root.fs.open(p, "r") as f:
            out.append((shard_id, f.read()))
        root.fs.rm(p)
    return out
