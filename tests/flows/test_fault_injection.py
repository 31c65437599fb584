"""Fault injection: SIGKILL `racm3 run STAGE --local` at random points, run it again, and the
stage's rows are identical to an uninterrupted run's: no row lost, no shard computed twice.

Trials per stage: RACM3_FAULT_TRIALS (default 3). The figures go to build/fault-injection.json.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from storage.fs import DataRoot
from storage.manifest import list_manifests

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UNDER_TEST = ("filter", "download", "embed", "tokenize")
ORDER = ("filter", "download", "fit-clip", "fit-vqgan", "embed", "tokenize")
TINY = ["fit_clip.max_steps=2", "fit_clip.batch_size=8",
        "fit_vqgan.image_size=16", "fit_vqgan.codebook_size=16", "fit_vqgan.channels=8",
        "fit_vqgan.embed_dim=4", "fit_vqgan.max_steps=2", "fit_vqgan.batch_size=8",
        "fit_vqgan.bpe_vocab_size=64", "fit_vqgan.kmeans_codes=0", "fit_vqgan.kmeans_iters=2",
        "tokenize.image_size=16", "tokenize.codebook_size=16", "filter.shard_size=20"]
TIMING = {"seconds", "elapsed_s"}  # columns that may legitimately differ between runs
pytestmark = pytest.mark.slow


def shard_tables(root: DataRoot, stage: str) -> dict[str, object]:
    """shard id -> its committed Parquet table (without timing columns), via the manifests."""
    out = {}
    for m in list_manifests(root, stage):
        for rel in m.outputs:
            if rel.endswith(".parquet"):
                t = pq.read_table(root.join(rel))
                out[f"{m.shard_id}:{rel}"] = t.drop_columns([c for c in t.column_names if c in TIMING])
    return out


def cli(root: str, stage: str, sets: list[str]) -> list[str]:
    return [str(BIN / "racm3"), "run", stage, "--local", "--data-root", root, *sets]


def summary_ran(out: str, stage: str) -> int:
    line = next(x for x in out.splitlines() if x.strip("│ ").startswith(stage))
    return int([c.strip() for c in line.split("│") if c.strip()][1])


def manifests(d: Path, stage: str) -> int:
    return len(list((d / stage).glob("*.manifest.json"))) if (d / stage).exists() else 0


def run_and_kill(cmd: list[str], d: Path, stage: str, after_shards: int, at_s: float,
                 extra_s: float) -> bool:
    """Start `cmd`; SIGKILL its process group `extra_s` after `after_shards` shards committed
    (after_shards == 0: at `at_s` s, before the first commit). True if it was still running."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0 = time.monotonic()
    while p.poll() is None:
        if (manifests(d, stage) >= after_shards > 0) or (after_shards == 0 and
                                                           time.monotonic() - t0 >= at_s):
            time.sleep(extra_s)
            break
        time.sleep(0.01)
    if p.poll() is not None:
        return False
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return True


def first_commit_s(cmd: list[str], d: Path, stage: str) -> float:
    """Run `cmd` to completion; seconds until its first shard committed (the CLI's start-up)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, first = time.monotonic(), None
    while p.poll() is None:
        if first is None and manifests(d, stage):
            first = time.monotonic() - t0
        time.sleep(0.05)
    assert p.returncode == 0
    return first if first is not None else time.monotonic() - t0


def test_sigkill_at_random_points_loses_and_duplicates_nothing(served, tmp_path):
    root, _, overrides = served  # the demo's HTTP server runs for the whole test (download)
    overrides = [*overrides, *TINY]
    sets = [a for o in overrides for a in ("--set", o)]
    cfgs = load_config("demo", overrides=overrides)
    before: dict[str, Path] = {}
    for stage in ORDER:  # the uninterrupted reference, snapshotting the root before each stage
        if stage in UNDER_TEST:
            before[stage] = Path(shutil.copytree(root.path, tmp_path / f"before-{stage}"))
        assert run_stage(stage, root, cfgs).ok, stage
    rng, trials = random.Random(11), int(os.environ.get("RACM3_FAULT_TRIALS", "3"))
    figures = []
    for stage in UNDER_TEST:
        ref, n = shard_tables(root, stage), len(list_manifests(root, stage))
        calib = tmp_path / f"calib-{stage}"
        shutil.copytree(before[stage], calib)
        t_first = first_commit_s(cli(str(calib), stage, sets), calib, stage)
        for trial in range(trials):
            d = tmp_path / f"{stage}-{trial}"
            shutil.copytree(before[stage], d)
            # a random point: before the first commit, or just after the k-th of n shards
            after, at_s, extra = rng.randrange(n), rng.uniform(0.5, 1.0) * t_first, \
                rng.uniform(0.0, 0.3)
            if trial == 0:  # at once after the k-th commit: on an idle machine the rest of a
                extra = 0.0  # small stage commits within 0.3 s, and no kill would land mid-stage
            killed = run_and_kill(cli(str(d), stage, sets), d, stage, after, at_s, extra)
            delay = at_s if after == 0 else extra
            done_at_kill = len(list_manifests(DataRoot(str(d)), stage))
            again = subprocess.run(cli(str(d), stage, sets), capture_output=True, text=True,
                                   timeout=900)
            assert again.returncode == 0, again.stderr[-3000:]
            got = shard_tables(DataRoot(str(d)), stage)
            lost = sum(t.num_rows for k, t in ref.items() if k not in got or not got[k].equals(t))
            recomputed = summary_ran(again.stdout, stage)
            figures.append({"stage": stage, "trial": trial, "kill_after_shards": after,
                            "kill_delay_s": round(delay, 2),
                            "killed_mid_run": killed, "shards": n,
                            "done_at_kill": done_at_kill, "rerun_ran": recomputed,
                            "rows": sum(t.num_rows for t in ref.values()), "rows_lost": lost,
                            "duplicated": done_at_kill + recomputed - n})
            assert got.keys() == ref.keys() and lost == 0, figures[-1]
            assert done_at_kill + recomputed == n, figures[-1]  # no shard computed twice
            assert not [p for p in DataRoot(str(d)).glob(f"{stage}/*") if ".tmp-" in p]
    out = ROOT / "build" / "fault-injection.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    assert sum(f["killed_mid_run"] for f in figures) >= len(figures) // 2
    assert any(0 < f["done_at_kill"] < f["shards"] for f in figures)  # some kills mid-stage
