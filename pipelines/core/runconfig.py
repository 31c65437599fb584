"""Config sections that belong to no single stage: run-wide settings and Beam runner options."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from pipelines.core.config import StageConfig


@dataclass(frozen=True)
class RunConfig(StageConfig):
    """How stages are driven (never part of any fingerprint), on every executor alike."""

    SECTION = "run"
    retries: int = 1  # extra attempts for a shard that raised (I/O hiccups); timeouts are final
    retry_delay_s: float = 1.0  # wait before the first retry; each later wait doubles (backoff)
    shard_concurrency: int = 2  # shards of a local-engine stage run at once (threads)
    shard_timeout_s: float = 0.0  # a shard running longer is stopped and failed; 0 = no limit
    lease_wait_s: float = 0.0  # wait this long for another run's stage lease, then exit 2
    lease_ttl_s: float = 60.0  # a lease not renewed for this long is expired (holder dead)

    def __post_init__(self) -> None:
        for name in ("shard_timeout_s", "lease_wait_s", "lease_ttl_s"):
            self.check(math.isfinite(getattr(self, name)), name, "must be a finite number")
        self.check(self.retries >= 0, "retries", "must be >= 0")
        self.check(self.retry_delay_s >= 0, "retry_delay_s", "must be >= 0")
        self.check(self.shard_concurrency >= 1, "shard_concurrency", "must be >= 1")
        self.check(self.shard_timeout_s >= 0, "shard_timeout_s", "must be >= 0 (0 = no limit)")
        self.check(self.lease_wait_s >= 0, "lease_wait_s", "must be >= 0")
        self.check(self.lease_ttl_s >= 3, "lease_ttl_s", "must be >= 3 seconds")


MODES = ("auto", "in_memory", "multi_threading", "multi_processing")


@dataclass(frozen=True)
class BeamConfig(StageConfig):
    """Beam runner for the data-parallel stages (embed, tokenize, retrieve)."""

    SECTION = "beam"
    runner: str = "DirectRunner"  # or DataflowRunner, FlinkRunner, SparkRunner, the Dask runner
    options: tuple[str, ...] = ()  # extra pipeline options, e.g. ["--dask_client_address=..."]
    # DirectRunner parallelism (each worker loads the model once): one worker per core
    direct_num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # "auto": below process_min_rows input rows the shards run on direct_num_workers threads of
    # this process (no worker start-up: ~15 s per stage on 2 cores), from there on one worker
    # process each; or multi_processing / multi_threading / in_memory (Beam's own modes, always)
    direct_running_mode: str = "auto"
    process_min_rows: int = 100_000  # "auto": rows of the pending shards' first inputs

    def __post_init__(self) -> None:
        self.check(self.direct_num_workers >= 1, "direct_num_workers", "must be >= 1")
        self.check(self.direct_running_mode in MODES, "direct_running_mode",
                   "must be auto, in_memory, multi_threading or multi_processing")
        self.check(self.process_min_rows >= 0, "process_min_rows", "must be >= 0")
