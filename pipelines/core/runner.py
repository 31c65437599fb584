"""Drive a stage over its shards without Prefect: skip done shards, retry broken ones, report."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipelines.core.registry import get_stage
from pipelines.core.stage import ShardSpec, Stage, execute_shard, shard_states
from storage.fs import DataRoot
from storage.manifest import Manifest, read_manifest

log = logging.getLogger("racm3")


@dataclass
class StageReport:
    """What one stage run did: the one-screen summary a person reads at the end."""

    stage: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, m: Manifest) -> None:
        self.ran.append(m.shard_id)
        self.rows_in += m.rows_in
        self.rows_out += m.rows_out
        self.dropped.update(m.dropped)
        if m.metrics:
            self.metrics[m.shard_id] = m.metrics

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "-"
        s = (f"{self.stage:<10} ran {len(self.ran):>4}  skipped {len(self.skipped):>4}  "
             f"failed {len(self.failed):>3}  rows {self.rows_in}->{self.rows_out}  "
             f"dropped: {drops}  ({self.seconds:.1f}s)")
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "ran": list(self.ran), "skipped": list(self.skipped),
                "failed": dict(self.failed), "rows_in": self.rows_in, "rows_out": self.rows_out,
                "dropped": dict(self.dropped), "metrics": self.metrics,
                "seconds": round(self.seconds, 2)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageReport:
        return cls(d["stage"], list(d["ran"]), list(d["skipped"]), dict(d["failed"]),
                   d["rows_in"], d["rows_out"], Counter(d["dropped"]), d.get("metrics", {}),
                   d["seconds"])


def stage_config(name: str, cfgs: dict[str, Any]) -> Any:
    stage = get_stage(name)
    return cfgs[stage.section]


def pending(stage: Stage, root: DataRoot, cfg: Any, force: bool) -> tuple[list[ShardSpec], list[str]]:
    """(specs to run, shard ids already done)."""
    todo, done = [], []
    for s in shard_states(stage, root, cfg):
        if s.state == "done" and not force:
            done.append(s.spec.shard_id)
        else:
            todo.append(s.spec)
    return todo, done


def run_stage(name: str, root: DataRoot, cfgs: dict[str, Any], force: bool = False) -> StageReport:
    """Run one stage locally (sequential shards, or its Beam pipeline for Beam stages)."""
    t0 = time.time()
    stage = get_stage(name)
    cfg = cfgs[stage.section]
    cleaned = root.clean_tmp(name)
    if cleaned:
        log.info("%s: removed %d temp files left by an interrupted run", name, cleaned)
    todo, done = pending(stage, root, cfg, force)
    report = StageReport(name, skipped=done)
    log.info("%s: %d shards to run, %d already done", name, len(todo), len(done))
    if stage.engine == "beam" and todo:
        from pipelines.core.beam import run_on_beam

        failures = run_on_beam(stage, root, cfg, todo, cfgs["beam"])
        report.failed.update(failures)
        collect(report, stage, root, [s for s in todo if s.shard_id not in failures])
    else:
        run_local(stage, root, cfg, todo, report, retries=cfgs["run"].retries)
    report.seconds = time.time() - t0
    return report


def run_local(stage: Stage, root: DataRoot, cfg: Any, todo: list[ShardSpec],
              report: StageReport, retries: int) -> None:
    resources = stage.load(cfg) if todo else None
    for i, spec in enumerate(todo, 1):
        for attempt in range(retries + 1):
            try:
                report.add(execute_shard(stage, root, cfg, spec, resources))
                break
            except Exception as e:  # noqa: BLE001 - one broken shard never stops the others
                log.warning("%s/%s attempt %d failed: %s", stage.name, spec.shard_id, attempt + 1, e)
                if attempt == retries:
                    report.failed[spec.shard_id] = f"{type(e).__name__}: {e}"
        log.info("%s: %d/%d shards (%d failed)", stage.name, i, len(todo), len(report.failed))


def collect(report: StageReport, stage: Stage, root: DataRoot, specs: list[ShardSpec]) -> None:
    for spec in specs:
        m = read_manifest(root, stage.name, spec.shard_id)
        if m is not None:
            report.add(m)
