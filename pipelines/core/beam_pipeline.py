"""A stage's shards as one Beam pipeline (one element per shard, the worker set up once per Beam
worker); imported only when a stage really runs on Beam (apache_beam takes seconds to import)."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core.runconfig import BeamConfig
from pipelines.core.shard_worker import ShardWorker
from pipelines.core.stage import ShardSpec
from storage.fs import DataRoot


class ShardDoFn(beam.DoFn):
    """The shard worker as a Beam DoFn: `setup` once per Beam worker, one element per shard."""

    def __init__(self, worker: ShardWorker):
        self.worker = worker

    def setup(self) -> None:
        self.worker.setup()

    def process(self, spec: ShardSpec):
        yield from self.worker.process(spec)


def pipeline_options(bcfg: BeamConfig, direct: tuple[int, str]) -> PipelineOptions:
    """Beam options of `bcfg`; on the DirectRunner `direct` = (workers, running mode) as
    `pipelines.core.beam.direct_workers` chose them."""
    args = [f"--runner={bcfg.runner}"]
    if bcfg.runner == "DirectRunner":
        workers, mode = direct
        mode = "multi_threading" if mode == "in_process" else mode  # asked for a Beam pipeline
        args += [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]
    return PipelineOptions([*args, *bcfg.options])  # the user's options come last and win


def run_pipeline(worker: ShardWorker, root: DataRoot, stage: str, specs: list[ShardSpec],
                 bcfg: BeamConfig, direct: tuple[int, str]) -> dict[str, str]:
    """Run `specs` as one Beam pipeline; {shard_id: error} of the shards that failed."""
    for spec in specs:  # error files of an earlier killed run are not this run's
        if root.exists(_failure_path(root, stage, spec.shard_id)):
            root.fs.rm(_failure_path(root, stage, spec.shard_id))
    dofn = ShardDoFn(worker)
    with beam.Pipeline(options=pipeline_options(bcfg, direct)) as p:
        results = (
            p
            | f"{stage}:shards" >> beam.Create(specs)
            | f"{stage}:spread" >> beam.Reshuffle()
            | f"{stage}:execute" >> beam.ParDo(dofn)
        )
        errors = results | f"{stage}:errors" >> beam.Filter(lambda kv: bool(kv[1]))
        # Errors come back through the data root so no driver state is needed on any runner.
        errors | f"{stage}:record" >> beam.Map(_record_failure, root.uri, stage)
    wanted = {s.shard_id for s in specs}
    return {sid: err for sid, err in _read_failures(root, stage) if sid in wanted}


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
