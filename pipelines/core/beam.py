"""Where a Beam stage's shards run: as a Beam pipeline on the configured runner, or, for a small
input on the DirectRunner, on threads of this process (no Beam pipeline, no Beam import)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipelines.core.runconfig import BeamConfig, RunConfig
from pipelines.core.shard_worker import ShardWorker, run_in_threads
from pipelines.core.stage import ShardSpec, Stage
from storage.fs import DataRoot
from storage.manifest import read_manifest

log = logging.getLogger(__name__)


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
    user_decides = any(o.startswith(("--runner", "--direct_")) for o in bcfg.options)
    auto = bcfg.runner == "DirectRunner" and bcfg.direct_running_mode == "auto"
    rows = input_rows(root, specs) if auto and not user_decides else None
    label = "" if user_decides else runner_label(bcfg, len(specs), rows)
    why = f" ({rows:,} input rows, beam.process_min_rows {bcfg.process_min_rows:,})" if auto and rows is not None else ""
    log.info("%s: %d shards on %s%s", stage.name, len(specs), label or "the runner in beam.options", why)
    worker = ShardWorker(stage, root.uri, cfg, run or RunConfig(), owner or root.owner, label)
    if label.startswith("InProcess/"):
        return run_in_threads(worker, specs, direct_workers(bcfg, len(specs), rows)[0], on_shard)
    from pipelines.core.beam_pipeline import run_pipeline  # imports apache_beam (seconds)

    return run_pipeline(worker, root, stage.name, specs, bcfg, direct_workers(bcfg, len(specs), rows))
