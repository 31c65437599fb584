"""Scaling benchmark of the training data path: `pack` seconds per 1,000 documents, and the
training data loader's peak RSS and sequences/s reading the memory-mapped token store, at 1x, 4x,
16x documents; beside it the old in-memory path (every shard read into Python dicts) as the peer.

    python benchmarks/scale_training.py [--sizes 1,4,16] [--base 5000] [--keep DIR]

Standalone, it generates token and neighbour shards (demo-shaped documents: 8 caption tokens,
8x8 image codes, 2 neighbours per query and 3 query-dropout variants, shards of 5,000 documents).
Each measurement is a child process (`--child pack|loader|loader-dict ROOT`); its peak RSS comes
from os.wait4, so it is that process's alone. The loader child streams one full epoch (every
document once as a main document) through SequenceStream + collate, as training does; s/1k and
seq/s are that epoch's, "load s" is opening the store vs reading every shard into dicts. The
loaders run twice, alternating with their peer, and the faster epoch is kept (shared machine).

benchmarks/bench_scale.py calls `rows(root_uri=..., docs=...)` at each of its sizes on its real
data root (after retrieve); `rows(sizes=[1, 4, 16])` runs the standalone generator. Both return
dicts with stage, size, docs, seconds, seconds_per_1k, peak_rss_bytes, peak_rss_mb (plus
sequences_per_s for the loaders).
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHARD_DOCS = 5000
GOAL = 1.25
BATCH = 16


# ---------------------------------------------------------------------------- generated shards


def generate(root_uri: str, n_docs: int, seed: int = 0) -> None:
    """Token and neighbour shards of n_docs demo-shaped documents under the shard contract."""
    import numpy as np
    import pyarrow as pa

    from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard
    from storage.fs import DataRoot

    class Fixed(Stage):
        version = "bench"

        def __init__(self, name: str, table: pa.Table, metrics: dict):
            self.name, self.table, self.metrics = name, table, metrics

        def run_shard(self, ctx: Any, resources: Any) -> ShardResult:
            ctx.write_table(self.table)
            return ShardResult(rows_in=self.table.num_rows, rows_out=self.table.num_rows,
                               metrics=self.metrics)

    root = DataRoot(root_uri)
    rng = np.random.default_rng(seed)
    keys = np.array([f"{i:08d}" for i in range(n_docs)])
    tok_m = dict(codebook="cb-bench", text_tokenizer="bpe-bench", n_text=512, n_image=64, grid=8)
    ret_m = dict(index_fingerprint="ix-bench", encoder="clip-bench")
    for s, lo in enumerate(range(0, n_docs, SHARD_DOCS)):
        part = keys[lo:lo + SHARD_DOCS].tolist()
        n = len(part)
        toks = pa.table({"key": part, "caption": ["c"] * n,
                         "caption_ids": pa.array(rng.integers(0, 512, (n, 8)).tolist(),
                                                 pa.list_(pa.int32())),
                         "image_codes": pa.array(rng.integers(0, 64, (n, 64)).tolist(),
                                                 pa.list_(pa.uint16()))})
        sid = f"{s:05d}"
        execute_shard(Fixed("tokenize", toks, tok_m), root, None, ShardSpec("tokenize", sid, ()))
        rows = 6 * n
        nbrs = keys[rng.integers(0, n_docs, (rows, 2))].tolist()
        ret = pa.table({"key": np.repeat(part, 6).tolist(),
                        "query": (["text"] * 3 + ["image"] * 3) * n,
                        "variant": pa.array([0, 1, 2] * (2 * n), pa.int16()),
                        "neighbor_keys": pa.array(nbrs, pa.list_(pa.string()))})
        execute_shard(Fixed("retrieve", ret, ret_m), root, None, ShardSpec("retrieve", sid, ()))


# ---------------------------------------------------------------------------- child processes


def child_pack(root_uri: str) -> dict[str, Any]:
    from pipelines.core.stage import execute_shard, shard_states
    from pipelines.training.pack import PackConfig, PackStage
    from storage.fs import DataRoot
    from storage.manifest import list_manifests

    root, stage, cfg = DataRoot(root_uri), PackStage(), PackConfig()
    resources = stage.load(cfg)  # once per run, as the driver does: the key index is built once
    for st in shard_states(stage, root, cfg):
        if st.state != "done":
            execute_shard(stage, root, cfg, st.spec, resources)
    compute = sum(m.timings.get("compute_s", 0.0) for m in list_manifests(root, "pack"))
    return {"compute_seconds": compute}


def child_loader(root_uri: str, store: bool) -> dict[str, Any]:
    """One epoch of training sequences (K <= 2, masking, packing, collate) from the store
    (store=True) or from the shards read into dicts (the old path)."""
    import torch  # noqa: F401  (a training process has torch loaded: part of its baseline RSS)

    from benchmarks.dict_source import load_dict_source
    from pipelines.training.sequences import AssemblyConfig, SequenceStream, collate
    from pipelines.training.token_store import open_store
    from storage.fs import DataRoot

    root = DataRoot(root_uri)
    t0 = time.perf_counter()
    corpus = open_store(root, True) if store else load_dict_source(root)
    load_s = time.perf_counter() - t0
    n = corpus.n_items()
    stream = SequenceStream(corpus, AssemblyConfig(seq_len=3 * corpus.longest() + 3), seed=0)
    it, seqs = iter(stream), 0
    t1 = time.perf_counter()
    while stream.counts["main_docs"] < n:
        batch = [next(it) for _ in range(BATCH)]
        collate(batch)
        seqs += BATCH
    dt = time.perf_counter() - t1
    return {"load_seconds": load_s, "epoch_seconds": dt, "sequences": seqs,
            "sequences_per_s": seqs / dt, "docs": n}


def run_child(kind: str, root_uri: str) -> tuple[float, int, dict[str, Any]]:
    """(wall seconds, peak RSS bytes, the child's JSON report)."""
    args = [sys.executable, str(Path(__file__).resolve()), "--child", kind, root_uri]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, cwd=str(HERE.parent),
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code:
            raise RuntimeError(f"{kind} child failed ({code}): "
                               f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        out.seek(0)
        report = json.loads(out.read().decode().strip().splitlines()[-1])
    return dt, usage.ru_maxrss * 1024, report


# ---------------------------------------------------------------------------- rows


def measure(root_uri: str, docs: int, size: int, with_dict_peer: bool,
            repeats: int = 2) -> list[dict[str, Any]]:
    """pack once, then each loader `repeats` times alternating with its peer (the machine is
    shared: the fastest epoch of each is kept; peak RSS is the largest seen)."""
    names = {"pack": "pack", "loader": "train-loader", "loader-dict": "loader-dict"}
    runs: dict[str, list[tuple[float, int, dict[str, Any]]]] = {"pack": [run_child("pack", root_uri)]}
    for _ in range(repeats):
        for kind in ["loader"] + (["loader-dict"] if with_dict_peer else []):
            runs.setdefault(kind, []).append(run_child(kind, root_uri))
    out = []
    for kind, results in runs.items():
        dt, _, rep = min(results, key=lambda r: r[2].get("epoch_seconds", r[0]))
        rss = max(r[1] for r in results)
        seconds = rep.get("compute_seconds") or rep.get("epoch_seconds", dt)
        row = {"stage": names[kind], "size": size, "docs": docs, "seconds": dt,
               "compute_seconds": seconds, "seconds_per_1k": seconds / docs * 1000,
               "peak_rss_bytes": rss, "peak_rss_mb": rss / 2**20}
        if "sequences_per_s" in rep:
            row["sequences_per_s"] = rep["sequences_per_s"]
            row["load_seconds"] = rep["load_seconds"]
        out.append(row)
        print(f"  x{size:<3} {row['stage']:<12} {docs:>8,} docs  {row['seconds_per_1k']:7.3f} s/1k  "
              f"{row['peak_rss_mb']:7.0f} MiB"
              + (f"  {row['sequences_per_s']:7.0f} seq/s  load {row['load_seconds']:.2f} s"
                 if "sequences_per_s" in row else ""), flush=True)
    return out


def rows(sizes: list[int] | None = None, root_uri: str | None = None, docs: int | None = None,
         size: int = 1, base: int = SHARD_DOCS, keep: str | None = None) -> list[dict[str, Any]]:
    """On a given data root with token and neighbour shards (bench_scale.py): pack + loader.
    Otherwise generated shards at `sizes` x `base` documents, with the in-memory peer."""
    if root_uri is not None:
        from storage.fs import DataRoot
        from storage.manifest import list_manifests

        n = docs or sum(m.rows_out for m in list_manifests(DataRoot(root_uri), "tokenize"))
        return measure(root_uri, n, size, with_dict_peer=False)
    work = Path(keep or tempfile.mkdtemp(prefix="racm3-scale-train-"))
    out: list[dict[str, Any]] = []
    try:
        for s in sizes or [1, 4, 16]:
            uri = str(work / f"x{s}")
            if not Path(uri).exists():
                generate(uri, s * base)
            out += measure(uri, s * base, s, with_dict_peer=True)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return out


def print_table(table: list[dict[str, Any]]) -> None:
    sizes = sorted({r["size"] for r in table})
    a, b = sizes[0], sizes[-1]
    print(f"\n{'stage':<13}" + "".join(f"{'x' + str(s) + ' s/1k':>11}{'MiB':>7}{'seq/s':>8}"
                                        f"{'load s':>8}" for s in sizes) + f"   RSS x{b}/x{a}")
    for stage in dict.fromkeys(r["stage"] for r in table):
        by = {r["size"]: r for r in table if r["stage"] == stage}
        cells = "".join(f"{by[s]['seconds_per_1k']:>11.3f}{by[s]['peak_rss_mb']:>7.0f}"
                        f"{by[s].get('sequences_per_s', 0):>8.0f}{by[s].get('load_seconds', 0):>8.2f}"
                        for s in sizes)
        ratio = by[b]["peak_rss_bytes"] / by[a]["peak_rss_bytes"]
        goal = "" if stage == "loader-dict" else (" ok" if ratio <= GOAL else " MISSED")
        print(f"{stage:<13}{cells}   {ratio:8.2f}x{goal}")
    print(f"(goal: train-loader and pack peak RSS within {GOAL}x from x{a} to x{b}; "
          f"loader-dict is the old in-memory path, for comparison)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,4,16")
    p.add_argument("--base", type=int, default=SHARD_DOCS, help="documents at 1x")
    p.add_argument("--keep", default=None, help="keep the generated roots in this folder")
    p.add_argument("--child", nargs=2, metavar=("KIND", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, root = args.child
        rep = child_pack(root) if kind == "pack" else child_loader(root, kind == "loader")
        print(json.dumps(rep))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"training data path at {sizes} x {args.base:,} documents "
          f"(load: {os.getloadavg()[0]:.2f})")
    print_table(rows(sizes, base=args.base, keep=args.keep))


if __name__ == "__main__":
    main()
