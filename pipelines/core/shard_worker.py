"""The per-shard worker every runner executes (Beam's DoFn wraps it), and the in-process runner:
a small input's shards on threads of this process, no Beam imported."""

from __future__ import annotations

import contextvars
import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipelines.core.attempt import run_with_retries
from pipelines.core.runconfig import RunConfig
from pipelines.core.stage import ShardSpec, Stage
from storage.fs import DataRoot

log = logging.getLogger(__name__)


class ShardWorker:
    """Executes shards under the shard contract and the run policy (retries, deadline): a Beam
    DoFn's body (`setup` once per worker, `process` per shard) without Beam, so the in-process
    path does not import it (1.4 s idle). Holds only names and config, so it pickles.
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


def run_in_threads(worker: ShardWorker, specs: list[ShardSpec], workers: int,
                   on_shard: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """The worker's shards on `workers` threads of this process, each thread with its own set-up
    copy (its own stage resources, as a Beam worker has): the same work as on Beam, without a
    worker process to start. Threads run in the caller's context (a Prefect flow run's)."""
    local = threading.local()

    def one(spec: ShardSpec) -> tuple[str, str]:
        fn = getattr(local, "worker", None)
        if fn is None:
            fn = local.worker = copy.copy(worker)
            fn.setup()
        sid, err = next(iter(fn.process(spec)))
        if on_shard is not None:
            on_shard(sid, err)
        return sid, err

    with ThreadPoolExecutor(workers, thread_name_prefix=f"racm3-{worker.stage_ref.name}") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, spec) for spec in specs]
        return {sid: err for sid, err in (f.result() for f in futures) if err}
