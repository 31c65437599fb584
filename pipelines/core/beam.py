"""Run a stage's stale shards as a Beam pipeline: one element per shard, model loaded per worker."""

from __future__ import annotations

import logging
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core.runconfig import BeamConfig
from pipelines.core.stage import ShardSpec, Stage, execute_shard
from storage.fs import DataRoot

log = logging.getLogger(__name__)


class ShardDoFn(beam.DoFn):
    """Executes shards under the shard contract. Holds only names and config: picklable anywhere."""

    def __init__(self, stage_name: str, root_uri: str, cfg: Any):
        self.stage_name, self.root_uri, self.cfg = stage_name, root_uri, cfg

    def setup(self) -> None:
        from pipelines.core.registry import get_stage

        self.stage = get_stage(self.stage_name)
        self.root = DataRoot(self.root_uri)
        self.resources = self.stage.load(self.cfg)  # once per worker, as DoFn.setup promises

    def process(self, spec: ShardSpec):
        try:
            m = execute_shard(self.stage, self.root, self.cfg, spec, self.resources)
            yield (spec.shard_id, "")
        except Exception as e:  # noqa: BLE001 - reported per shard; the rest of the stage goes on
            log.exception("%s/%s failed", self.stage_name, spec.shard_id)
            yield (spec.shard_id, f"{type(e).__name__}: {e}")
        else:
            log.info("%s/%s done: %d rows", self.stage_name, m.shard_id, m.rows_out)


def pipeline_options(bcfg: BeamConfig) -> PipelineOptions:
    args = [f"--runner={bcfg.runner}", *bcfg.options]
    if bcfg.runner == "DirectRunner":
        args.append(f"--direct_num_workers={bcfg.direct_num_workers}")
    return PipelineOptions(args)


def run_on_beam(stage: Stage, root: DataRoot, cfg: Any, specs: list[ShardSpec],
                bcfg: BeamConfig) -> dict[str, str]:
    """Run `specs` on the configured runner; returns {shard_id: error} for shards that failed."""
    failures: dict[str, str] = {}
    opts = pipeline_options(bcfg)
    with beam.Pipeline(options=opts) as p:
        results = (
            p
            | f"{stage.name}:shards" >> beam.Create(specs)
            | f"{stage.name}:spread" >> beam.Reshuffle()
            | f"{stage.name}:execute" >> beam.ParDo(ShardDoFn(stage.name, root.uri, cfg))
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
