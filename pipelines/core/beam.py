"""Run a stage's stale shards as a Beam pipeline: one element per shard, model loaded per worker."""

from __future__ import annotations

import logging
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core.attempt import run_with_retries
from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.stage import ShardSpec, Stage
from storage.fs import DataRoot

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


def direct_workers(bcfg: BeamConfig, shards: int | None = None) -> tuple[int, str]:
    """(workers, running mode) of the DirectRunner: never more workers than shards, and one
    worker runs in this process (a worker process gains nothing for one shard and costs its
    start-up: ~15 s on 2 loaded cores)."""
    workers = max(1, min(bcfg.direct_num_workers, shards or bcfg.direct_num_workers))
    return workers, bcfg.direct_running_mode if workers > 1 else "in_memory"


def runner_label(bcfg: BeamConfig, shards: int | None = None) -> str:
    """What a manifest records as its `runner` metric, e.g. `DirectRunner/in_memory x1`."""
    if bcfg.runner != "DirectRunner":
        return bcfg.runner
    workers, mode = direct_workers(bcfg, shards)
    return f"DirectRunner/{mode} x{workers}"


def pipeline_options(bcfg: BeamConfig, shards: int | None = None) -> PipelineOptions:
    args = [f"--runner={bcfg.runner}"]
    if bcfg.runner == "DirectRunner":
        workers, mode = direct_workers(bcfg, shards)
        args += [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]
    return PipelineOptions([*args, *bcfg.options])  # the user's options come last and win


def run_on_beam(stage: Stage, root: DataRoot, cfg: Any, specs: list[ShardSpec],
                bcfg: BeamConfig, run: RunConfig | None = None,
                owner: str | None = None) -> dict[str, str]:
    """Run `specs` on the configured runner; returns {shard_id: error} for shards that failed."""
    failures: dict[str, str] = {}
    for spec in specs:  # error files of an earlier killed run are not this run's
        if root.exists(_failure_path(root, stage.name, spec.shard_id)):
            root.fs.rm(_failure_path(root, stage.name, spec.shard_id))
    opts = pipeline_options(bcfg, len(specs))
    if any(o.startswith(("--runner", "--direct_")) for o in bcfg.options):
        label = ""  # the user's options decide; not known here
    else:
        label = runner_label(bcfg, len(specs))
    log.info("%s: %d shards on %s", stage.name, len(specs), label or "the runner in beam.options")
    with beam.Pipeline(options=opts) as p:
        results = (
            p
            | f"{stage.name}:shards" >> beam.Create(specs)
            | f"{stage.name}:spread" >> beam.Reshuffle()
            | f"{stage.name}:execute" >> beam.ParDo(
                ShardDoFn(stage, root.uri, cfg, run or RunConfig(), owner or root.owner, label))
        )
        errors = results | f"{stage.name}:errors" >> beam.Filter(lambda kv: bool(kv[1]))
        # Errors come back through the data root so no driver state is needed on any runner.
        errors | f"{stage.name}:record" >> beam.Map(_record_failure, root.uri, stage.name)
    for shard_id, err in _read_failures(root, stage.name):
        if shard_id in {s.shard_id for s in specs}:
            failures[shard_id] = err
    return failures


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
