"""A Beam stage's whole run on all cores against its shards' own compute, per running mode, side
by side in one process (issue 23: whole run >= 0.9x of the per-shard compute)."""

from __future__ import annotations

import os
import time
from typing import Any

from pipelines.core.runconfig import BeamConfig
from pipelines.core.runner import run_stage
from storage.fs import DataRoot
from storage.manifest import list_manifests

GOAL = 0.9


def whole_run(stage: str, root: DataRoot, cfgs: dict[str, Any], mode: str, workers: int) -> dict:
    """Run every shard of `stage` again (force) with `workers` DirectRunner workers in `mode`."""
    cfgs = {**cfgs, "beam": BeamConfig(direct_num_workers=workers, direct_running_mode=mode)}
    t0 = time.perf_counter()
    report = run_stage(stage, root, cfgs, force=True)
    wall = time.perf_counter() - t0
    assert report.ok, report.failed
    ms = list_manifests(root, stage)
    used = min(workers, len(ms))
    compute = sum(m.timings["compute_s"] for m in ms)
    return {"mode": mode, "runner": ms[0].metrics.get("runner", "?"), "wall": wall,
            "compute": compute, "shards": len(ms), "workers": used,
            "ratio": compute / used / wall, "load": os.getloadavg()[0]}


def compare_modes(stage: str, root: DataRoot, cfgs: dict[str, Any], modes: list[str],
                  items: int, label: str) -> list[dict]:
    """Each mode's whole run, printed as one line: wall, the shards' compute per worker, ratio."""
    workers = os.cpu_count() or 1
    rows = []
    for mode in modes:
        r = whole_run(stage, root, cfgs, mode, workers)
        rows.append(r)
        print(f"  whole run, {r['shards']} shards, {mode:<16} {r['runner']:<34} "
              f"{items / r['wall']:8.1f} {label}/s ({r['wall']:.2f}s; shards' compute "
              f"{r['compute']:.2f}s = {r['compute'] / r['workers']:.2f}s per worker)  "
              f"ratio {r['ratio']:.2f}x (goal >= {GOAL}; load {r['load']:.1f})", flush=True)
    return rows
