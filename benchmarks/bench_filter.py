"""Benchmark: rows/s and peak RSS of the DuckDB filter on a synthetic 1M-row LAION-like table and on
250k rows: cost should be linear and memory flat (a shard reads only its rows). Each size runs in
its own process so peak RSS is its own. Prints; asserts nothing."""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.core.registry import load_config  # noqa: E402
from pipelines.core.runner import run_stage  # noqa: E402
from storage.fs import DataRoot  # noqa: E402


def synthetic_metadata(path: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    urls = np.where(rng.random(n) < 0.01, "ftp://x/", "http://example.invalid/")
    pq.write_table(pa.table({
        "URL": pa.array([f"{u}{i}.jpg" for i, u in enumerate(urls)]),
        "TEXT": pa.array(np.where(rng.random(n) < 0.01, "", "a caption of some thing")),
        "WIDTH": rng.integers(64, 1024, n), "HEIGHT": rng.integers(64, 1024, n),
        "pwatermark": rng.random(n).astype(np.float32), "punsafe": rng.random(n).astype(np.float32),
        "similarity": rng.random(n).astype(np.float32),
    }), path)


def measure(n: int) -> tuple[float, float, float]:
    """(rows/s, peak RSS MB, RSS MB before the run) of one filter run over n rows, in a fresh
    process so its peak RSS is its own (the synthetic table is built here)."""
    with tempfile.TemporaryDirectory() as d:
        meta = f"{d}/meta.parquet"
        synthetic_metadata(meta, n)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_filter, (meta, f"{d}/root", n))


def _filter(meta: str, root: str, n: int) -> tuple[float, float, float]:
    cfgs = load_config("paper", overrides=[f"filter.metadata={meta}", "filter.shard_size=100000",
                                          "run.shard_concurrency=2"])  # shards in flight: 2 at any size
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports of every stage
    t0 = time.perf_counter()
    report = run_stage("filter", DataRoot(root), cfgs)
    dt = time.perf_counter() - t0
    assert report.ok and report.rows_in == n
    return n / dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    small, small_rss, small_base = measure(args.rows // 4)
    big, big_rss, big_base = measure(args.rows)
    for n, rate, rss, base in ((args.rows // 4, small, small_rss, small_base),
                               (args.rows, big, big_rss, big_base)):
        print(f"filter: {n:>9,} rows -> {rate:,.0f} rows/s, peak RSS {rss:,.0f} MB "
              f"({rss - base:,.0f} MB above the {base:,.0f} MB of imports)")
    print(f"filter: linearity (rows/s at 1x / rows/s at 0.25x) = {big / small:.2f} (1.0 = linear)")
    print(f"filter: peak RSS above imports 1x / 0.25x = "
          f"{(big_rss - big_base) / max(small_rss - small_base, 1):.2f} (1.0 = bounded by a shard)")

if __name__ == "__main__":
    main()
