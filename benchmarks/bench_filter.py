"""Benchmark: rows/s of the DuckDB filter on a synthetic 1M-row LAION-like table (and 250k, to show
cost is linear). Prints throughput; asserts nothing."""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from storage.fs import DataRoot


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


def measure(n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        meta = f"{d}/meta.parquet"
        synthetic_metadata(meta, n)
        cfgs = load_config("paper", overrides=[f"filter.metadata={meta}", "filter.shard_size=100000"])
        t0 = time.perf_counter()
        report = run_stage("filter", DataRoot(f"{d}/root"), cfgs)
        dt = time.perf_counter() - t0
        assert report.ok and report.rows_in == n
        return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    small = measure(args.rows // 4)
    big = measure(args.rows)
    print(f"filter: {args.rows // 4:>9,} rows -> {small:,.0f} rows/s")
    print(f"filter: {args.rows:>9,} rows -> {big:,.0f} rows/s")
    print(f"filter: linearity (rows/s at 1x / rows/s at 0.25x) = {big / small:.2f} (1.0 = linear)")


if __name__ == "__main__":
    main()
