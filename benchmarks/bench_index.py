"""Benchmark the index stage: Flat vs IVF-PQ vs sharded Flat over generated vectors.

    python benchmarks/bench_index.py [--n 1000000] [--dim 64] [--queries 1000] [--shards 4]

The vectors (clustered unit vectors, as embeddings are) are written as embed shards of 20,000
rows; each index is built by the real stage (`run_stage("index")`: trained on a sample, added
shard by shard, sub-indexes on Beam) in a child process, then loaded as retrieve loads it
(memory-mapped) and searched in another child. Printed per index: build seconds, peak RSS of
the build and of the search process (GNU time: the largest process, Beam workers included),
queries/s at k=10 (batches of 256), recall@10 against the exact (Flat) neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from storage.fs import DataRoot  # noqa: E402

SHARD = 20_000
BATCH = 256
K = 10


def clustered(n: int, d: int, seed: int, clusters: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(size=(clusters, d)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shards(root: DataRoot, n: int, d: int) -> None:
    from benchmarks.embed_shards import write_embed_shard

    for i in range(0, n, SHARD):
        m = min(SHARD, n - i)
        write_embed_shard(root, f"{i // SHARD:05d}", [f"v{i + j:09d}" for j in range(m)],
                          clustered(m, d, seed=i // SHARD))


def child_build(root_uri: str, factory: str, shards: int, nprobe: int) -> int:
    from pipelines.core.runconfig import BeamConfig, RunConfig
    from pipelines.core.runner import run_stage
    from pipelines.retrieval.index import IndexConfig

    cfg = IndexConfig(factory=factory, shards=shards, nprobe=nprobe, train_sample=65_536,
                      recall_sample=100, use_gpu=False)
    report = run_stage("index", DataRoot(root_uri),
                       {"index": cfg, "run": RunConfig(retries=0), "beam": BeamConfig()},
                       force=True)
    print(report.line())
    return 0 if report.ok else 1


def child_search(root_uri: str, queries: str, out: str) -> int:
    from pipelines.retrieval.faiss_index import load_index

    q = np.load(queries)
    idx = load_index(DataRoot(root_uri), use_gpu=False)
    t0 = time.perf_counter()
    ids = np.concatenate([idx.search(q[s:s + BATCH], K)[1] for s in range(0, len(q), BATCH)])
    dt = time.perf_counter() - t0
    np.save(out, ids)
    Path(out + ".json").write_text(json.dumps({"qps": len(q) / dt}))
    return 0


def timed(args: list[str], log: Path) -> tuple[float, int]:
    rss = log.with_suffix(".rss")
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, str(Path(__file__).resolve()),
           *args]
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(HERE.parent))
    if code:
        raise RuntimeError(f"{args[:2]} failed; see {log}")
    return time.perf_counter() - t0, int(rss.read_text().split()[-1]) * 1024


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, truth, strict=True)]))


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        sys.exit(child_build(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    if sys.argv[1:2] == ["--search"]:
        sys.exit(child_search(sys.argv[2], sys.argv[3], sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--ivf", default="IVF1024,PQ16")
    ap.add_argument("--nprobe", type=int, default=16)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="racm3-bench-index-"))
    print(f"[index] {args.n:,} x {args.dim} generated vectors, {args.queries} queries, k={K}; "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    try:
        root = DataRoot(str(work / "root"))
        t0 = time.perf_counter()
        write_shards(root, args.n, args.dim)
        qfile = str(work / "queries.npy")
        np.save(qfile, clustered(args.queries, args.dim, seed=10**6))
        print(f"  shards written in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = [("Flat", 1), (args.ivf, 1), ("Flat", args.shards)]
        truth = None
        print(f"  {'index':<22}{'build s':>9}{'build MiB':>11}{'search MiB':>11}{'queries/s':>11}"
              f"{'recall@10':>11}{'file MiB':>10}")
        for factory, shards in runs:
            log = work / f"{factory.replace(',', '_')}-{shards}.log"
            build_s, build_rss = timed(["--build", root.uri, factory, str(shards),
                                        str(args.nprobe)], log)
            from storage.manifest import read_manifest

            m = read_manifest(root, "index", "main")
            assert m is not None
            out = str(work / "ids.npy")
            _, search_rss = timed(["--search", root.uri, qfile, out], log)
            ids = np.load(out)
            qps = json.loads(Path(out + ".json").read_text())["qps"]
            truth = ids if truth is None else truth  # the first run is exact Flat
            name = factory if shards == 1 else f"{factory} x{shards} parts"
            print(f"  {name:<22}{m.metrics['build_seconds']:>9.1f}{build_rss / 2**20:>11.0f}"
                  f"{search_rss / 2**20:>11.0f}{qps:>11,.0f}{recall(ids, truth):>11.3f}"
                  f"{m.metrics['index_bytes'] / 2**20:>10.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"  (build s: the stage's own build time; child wall times include start-up; "
          f"load now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
