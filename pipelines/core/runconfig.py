"""Config sections that belong to no single stage: run-wide settings and Beam runner options."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.config import StageConfig


@dataclass(frozen=True)
class RunConfig(StageConfig):
    """How stages are driven (never part of any fingerprint)."""

    SECTION = "run"
    retries: int = 1  # extra attempts for a shard that raised (I/O hiccups)
    shard_concurrency: int = 2  # shards run at once by the Prefect flow of a local-engine stage

    def __post_init__(self) -> None:
        self.check(self.retries >= 0, "retries", "must be >= 0")
        self.check(self.shard_concurrency >= 1, "shard_concurrency", "must be >= 1")


@dataclass(frozen=True)
class BeamConfig(StageConfig):
    """Beam runner for the data-parallel stages (embed, tokenize, retrieve)."""

    SECTION = "beam"
    runner: str = "DirectRunner"  # or DataflowRunner, FlinkRunner, SparkRunner, the Dask runner
    options: tuple[str, ...] = ()  # extra pipeline options, e.g. ["--dask_client_address=..."]
    direct_num_workers: int = 1  # DirectRunner parallelism (each worker loads the model once)
