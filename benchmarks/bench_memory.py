"""Benchmark the retrieval memory at scale: what a process that searches holds as the memory grows.

    python benchmarks/bench_memory.py [--sizes 100000,400000,1600000] [--big] [--dim 64]

For each size, generated download shards (9-digit keys, captions, sha256 digests of the demo's
shape; no images) and embed shards of them (doc_emb: clustered unit vectors) are written through
the shard contract, and the real index stage builds an IVF-PQ index and its mapped memory store.
Then, in fresh processes (spawned, so nothing is inherited): one retrieve worker (retrieve's
`rows_for`: search, redundancy walk, keys of the kept rows), two retrieve workers at once, and
evaluate's retriever (`Retriever._select` on query vectors; the CLIP encoder is not loaded), and,
for contrast, the old loader (the key map as Python object arrays plus an IVF direct map).

Printed per size and process: peak RSS (VmHWM), RSS without the data root's mapped files (the
index and the store, which the page cache holds once per machine), PSS (smaps_rollup: shared
pages divided among the processes mapping them), and seconds per 1,000 queries. Then the ratios
the issue asks for: per-process RSS without mapped pages, largest size / smallest; two workers'
PSS / one worker's. Memory figures are taken after the queries, while every worker is alive.
`--big` runs 1M, 4M and 16M documents (about 4.5 GB of shards at 16M; minutes per size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard  # noqa: E402
from storage.fs import DataRoot  # noqa: E402
from storage.manifest import upstream_ref  # noqa: E402
from storage.schemas import IMAGE_SHARD  # noqa: E402

SHARD = 100_000  # documents per generated shard
TRAIN = 65_536  # index training sample: IVF cells = min(4 sqrt(n), TRAIN / 39) -> 1024 here
NAMES = ("cat", "dog", "red car", "lighthouse", "bicycle", "teapot", "mountain", "sailboat")


class _Fixed(Stage):
    """Writes a given table as stage `name`'s shard (download or embed) with its metrics."""

    version = "bench"

    def __init__(self, name: str, table: pa.Table, metrics: dict[str, Any]):
        self.name, self.table, self.metrics = name, table, metrics

    def run_shard(self, ctx: Any, resources: Any) -> ShardResult:
        ctx.write_table(self.table)
        return ShardResult(self.table.num_rows, self.table.num_rows, metrics=self.metrics)


def clustered(n: int, d: int, seed: int, clusters: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(size=(clusters, d)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shard(root: DataRoot, s: int, start: int, n: int, d: int) -> None:
    """Download shard `s` (key, caption, sha256; no jpg) and the embed shard made from it."""
    sid = f"{s:05d}"
    keys = [f"{i:09d}" for i in range(start, start + n)]
    caps = [f"a photo of the {NAMES[i % 8]} number {i}" for i in range(start, start + n)]
    sha = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    cols = {"key": keys, "caption": caps, "sha256": sha, "status": ["success"] * n}
    dl = pa.Table.from_arrays([pa.array(cols[f.name], f.type) if f.name in cols
                               else pa.nulls(n, f.type) for f in IMAGE_SHARD], schema=IMAGE_SHARD)
    execute_shard(_Fixed("download", dl, {}), root, None, ShardSpec("download", sid, ()))
    vec = pa.list_(pa.float32(), d)
    x = pa.FixedSizeListArray.from_arrays(pa.array(clustered(n, d, seed=s).ravel()), d)
    zero = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * d, np.float32)), d)
    emb = pa.Table.from_arrays(
        [pa.array(keys), pa.array(sha), x, zero, x],
        schema=pa.schema([("key", pa.string()), ("sha256", pa.string()), ("text_emb", vec),
                          ("image_emb", vec), ("doc_emb", vec)]))
    metrics = {"encoder": "bench@0", "model": "bench", "checkpoint": "none", "dim": d}
    execute_shard(_Fixed("embed", emb, metrics), root, None,
                  ShardSpec("embed", sid, (upstream_ref(root, "download", sid),)))


def build(root: DataRoot, n: int, d: int) -> dict[str, Any]:
    from pipelines.core.runconfig import BeamConfig, RunConfig
    from pipelines.core.runner import run_stage
    from pipelines.retrieval.index import IndexConfig
    from pipelines.retrieval.index_build import ivf_cells
    from storage.manifest import read_manifest

    for s, start in enumerate(range(0, n, SHARD)):
        write_shard(root, s, start, min(SHARD, n - start), d)
    cfg = IndexConfig(factory=f"IVF{ivf_cells(n, TRAIN)},PQ16", train_sample=TRAIN, nprobe=16,
                      recall_sample=100, use_gpu=False)
    report = run_stage("index", root, {"index": cfg, "run": RunConfig(retries=0),
                                       "beam": BeamConfig()})
    if not report.ok:
        raise RuntimeError(f"index failed: {report.failed}")
    return read_manifest(root, "index", "main").metrics


# ---------------------------------------------------------------------------- measuring


def memory_of(pid: int, mapped_under: str) -> dict[str, int]:
    """Bytes: VmHWM, Rss and Pss (smaps_rollup), and the Rss of mappings of files under a folder."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["peak_rss"] = int(line.split()[1]) * 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        f = line.split()
        if f[0] in ("Rss:", "Pss:"):
            out[f[0][:-1].lower()] = int(f[1]) * 1024
    mapped, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and "-" in f[0] and not f[0].endswith(":"):
            inside = len(f) >= 6 and f[5].startswith(mapped_under)
        elif inside and f[0] == "Rss:":
            mapped += int(f[1]) * 1024
    out["mapped_rss"] = mapped
    out["rss_unmapped"] = out["rss"] - mapped
    return out


def old_loader(root: DataRoot) -> Any:
    """What every process that loaded the index held before the store: the key map as object
    arrays and an IVF direct map (kept alive while measured)."""
    import faiss
    import pyarrow.parquet as pq

    from pipelines.retrieval.faiss_index import read_index_file

    idx = read_index_file(root.artifact("index", "main", "faiss"), "IVF")
    faiss.extract_index_ivf(idx).make_direct_map()
    km = pq.read_table(root.artifact("index", "main", "keys.parquet"))
    keys = np.asarray(km["key"].to_pylist(), dtype=object)
    sha = np.asarray([s or "" for s in km["sha256"].to_pylist()], dtype=object)
    return idx, keys, sha


def work(root: DataRoot, mode: str, queries: int) -> tuple[Any, float]:
    """Run `mode` over the memory's first `queries` documents (as retrieve's queries are the
    memory's own); returns (what must stay alive while measured, seconds of the queries)."""
    from pipelines.retrieval.faiss_index import load_index
    from pipelines.retrieval.retrieve import Queries, RetrieveConfig, rows_for
    from pipelines.retrieval.search import Retriever, SearchRule

    if mode == "old":
        return old_loader(root), 0.0
    cfg = RetrieveConfig(top_n=32, k_max=4, variants=0, use_gpu=False)
    index = load_index(root, use_gpu=False)
    q = index.reconstruct(np.arange(queries))
    t0 = time.perf_counter()
    if mode == "retrieve":
        n = len(q)
        keys, sha = index.keys[np.arange(n)], index.sha256[np.arange(n)]
        qs = Queries(np.arange(n), np.zeros(n, np.int64), np.zeros(n, np.int64), q)
        rows_for(index, qs, keys, sha, cfg)
    else:
        r = Retriever.__new__(Retriever)
        r.rule, r.index = SearchRule.of(cfg), index
        for s in range(0, len(q), 256):
            r._select(q[s:s + 256], None, None)
    return index, time.perf_counter() - t0


def worker(root_uri: str, mode: str, queries: int, barrier: Any, results: Any) -> None:
    root = DataRoot(root_uri)
    alive, seconds = work(root, mode, queries)
    barrier.wait()  # every worker has finished its queries: measure them side by side
    results.put(memory_of(os.getpid(), root.path) | {"seconds": seconds})
    barrier.wait()  # stay alive until every worker is measured
    del alive


def run_workers(root: DataRoot, mode: str, queries: int, count: int) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(root.uri, mode, queries, barrier, results))
             for _ in range(count)]
    for p in procs:
        p.start()
    out = [results.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{mode} worker exited {p.exitcode}")
    return out


# ---------------------------------------------------------------------------- report


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def measure_size(work_dir: Path, n: int, d: int, queries: int) -> dict[str, Any]:
    root = DataRoot(str(work_dir / f"root-{n}"))
    t0 = time.perf_counter()
    metrics = build(root, n, d)
    built = time.perf_counter() - t0
    out: dict[str, Any] = {"n": n, "build_s": round(built, 1), "factory": metrics["factory"],
                           "recall@10": metrics.get("recall@10_vs_exact"),
                           "load": round(os.getloadavg()[0], 2)}
    out["retrieve"] = run_workers(root, "retrieve", queries, 1)[0]
    out["retrieve x2"] = run_workers(root, "retrieve", queries, 2)
    out["evaluate"] = run_workers(root, "evaluate", queries, 1)[0]
    out["old loader"] = run_workers(root, "old", queries, 1)[0]
    shutil.rmtree(root.path)
    return out


def print_size(r: dict[str, Any], queries: int) -> None:
    print(f"  {r['n']:,} docs ({r['factory']}, recall@10 {r['recall@10']}, built in "
          f"{r['build_s']:.0f} s, load {r['load']})", flush=True)
    rows = [("retrieve, one worker", r["retrieve"]), *[(f"retrieve, worker {i + 1} of 2", w)
            for i, w in enumerate(r["retrieve x2"])], ("evaluate's retriever", r["evaluate"]),
            ("old loader (contrast)", r["old loader"])]
    for name, m in rows:
        per_k = f"{1000 * m['seconds'] / queries:>10.2f}" if m["seconds"] else f"{'-':>10}"
        print(f"    {name:<26}{mib(m['peak_rss']):>10}{mib(m['rss_unmapped']):>12}"
              f"{mib(m['mapped_rss']):>10}{mib(m['pss']):>9}{per_k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="100000,400000,1600000", help="memory documents, comma-separated")
    ap.add_argument("--big", action="store_true", help="the issue's sizes: 1M, 4M, 16M")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    args = ap.parse_args()
    sizes = [1_000_000, 4_000_000, 16_000_000] if args.big else [
        int(s) for s in args.sizes.split(",")]
    work_dir = Path(tempfile.mkdtemp(prefix="racm3-bench-memory-"))
    print(f"[memory] sizes {sizes}, dim {args.dim}, {args.queries} queries; load "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    print(f"    {'process':<26}{'peak MiB':>10}{'unmapped':>12}{'mapped':>10}{'PSS':>9}"
          f"{'s/1k q':>10}")
    results = []
    try:
        for n in sizes:
            results.append(measure_size(work_dir, n, args.dim, args.queries))
            print_size(results[-1], args.queries)
            if args.out:  # after every size: a long run stopped early keeps what it measured
                Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    a, b = results[0], results[-1]
    print(f"  per-process RSS without mapped pages, {b['n']:,} / {a['n']:,} docs: retrieve "
          f"{b['retrieve']['rss_unmapped'] / a['retrieve']['rss_unmapped']:.2f}x, evaluate "
          f"{b['evaluate']['rss_unmapped'] / a['evaluate']['rss_unmapped']:.2f}x, old loader "
          f"{b['old loader']['rss_unmapped'] / a['old loader']['rss_unmapped']:.2f}x")
    for r in results:
        two = sum(w["pss"] for w in r["retrieve x2"])
        print(f"  two retrieve workers' PSS / one's at {r['n']:,} docs: {two / r['retrieve']['pss']:.2f}x")


if __name__ == "__main__":
    main()
