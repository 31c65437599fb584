"""Pack scaling: marginal seconds per 1,000 documents at 1x/4x/16x/64x, one key index per run
(today) beside the per-neighbour-part resolution it replaced (each neighbour part read and
sorted every tokenize shard's keys: work ~ shards^2), on generated shards, in this process.

    python benchmarks/bench_pack.py [--docs-per-shard 160] [--shards 4] [--sizes 1,4,16,64]
                                    [--old-sizes 1,4,16]

Shards are written through the shard contract with the real schemas (a tokenize shard: key,
caption_ids, image_codes; a retrieve shard: 2 queries x 2 variants x 4 neighbours per document),
a fixed number of documents per shard, so a shard's work is the same at every size. `cmp/1k`
is the shards' own compute from their manifests (`compute_s`), split into token (t-) and
neighbour (n-) parts; `key reads` counts tokenize-shard key reads (the algorithmic evidence:
per-part resolution reads shards^2 of them, the run index reads each once).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.core.driver import InProcess, drive  # noqa: E402
from pipelines.core.runconfig import RunConfig  # noqa: E402
from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard  # noqa: E402
from pipelines.training import pack as pack_mod  # noqa: E402
from pipelines.training.pack import PackConfig, PackStage  # noqa: E402
from storage.fs import DataRoot  # noqa: E402
from storage.manifest import list_manifests  # noqa: E402


class _Fixed(Stage):
    version = "bench"

    def __init__(self, name: str, table: pa.Table, metrics: dict[str, Any]):
        self.name, self.table, self.metrics = name, table, metrics  # type: ignore[misc]

    def run_shard(self, ctx: Any, resources: Any) -> ShardResult:
        ctx.write_table(self.table)
        return ShardResult(self.table.num_rows, self.table.num_rows, metrics=self.metrics)


class PerPartPack(PackStage):
    """Pack as it was: no per-run resources, so every neighbour part builds its own key index
    from every tokenize shard (the same reads and sorts as the old per-part resolver)."""

    def load(self, cfg: PackConfig) -> None:
        return None


def token_table(keys: list[str], rng: np.random.Generator) -> pa.Table:
    caps = [rng.integers(0, 1000, 16).tolist() for _ in keys]
    imgs = [rng.integers(0, 1024, 256).tolist() for _ in keys]
    return pa.table({"key": keys, "caption_ids": pa.array(caps, pa.list_(pa.int32())),
                     "image_codes": pa.array(imgs, pa.list_(pa.uint16()))})


def neighbour_table(keys: list[str], n_all: int, rng: np.random.Generator) -> pa.Table:
    rows = {"key": [], "query": [], "variant": [], "neighbor_keys": []}
    for k in keys:
        for q in ("text", "image"):
            for v in range(2):
                rows["key"].append(k)
                rows["query"].append(q)
                rows["variant"].append(v)
                rows["neighbor_keys"].append([f"{j:09d}" for j in rng.integers(0, n_all, 4)])
    return pa.table({"key": rows["key"], "query": rows["query"],
                     "variant": pa.array(rows["variant"], pa.int16()),
                     "neighbor_keys": pa.array(rows["neighbor_keys"], pa.list_(pa.string()))})


def generate(root: DataRoot, shards: int, per_shard: int) -> int:
    rng = np.random.default_rng(0)
    n_all = shards * per_shard
    tok = dict(codebook="cb", text_tokenizer="bpe", n_text=1000, n_image=1024, grid=16)
    nbr = dict(index_fingerprint="ix", encoder="clip")
    for s in range(shards):
        keys = [f"{j:09d}" for j in range(s * per_shard, (s + 1) * per_shard)]
        execute_shard(_Fixed("tokenize", token_table(keys, rng), tok), root, None,
                      ShardSpec("tokenize", f"{s:05d}", ()))
        execute_shard(_Fixed("retrieve", neighbour_table(keys, n_all, rng), nbr), root, None,
                      ShardSpec("retrieve", f"{s:05d}", ()))
    return n_all


def measure(stage: PackStage, root: DataRoot, force: bool) -> dict[str, float]:
    reads = {"n": 0}
    real = pack_mod.read_table

    def counting(*a: Any, **k: Any) -> pa.Table:
        reads["n"] += 1
        return real(*a, **k)

    pack_mod.read_table = counting  # only token_keys reads through it
    try:
        t0 = time.perf_counter()
        report = drive(stage, root, {"pack": PackConfig(), "run": RunConfig(shard_concurrency=1)},
                       InProcess(), force)
        wall = time.perf_counter() - t0
    finally:
        pack_mod.read_table = real
    assert not report.failed, report.failed
    ms = list_manifests(root, "pack")
    cmp = {p: sum(m.timings.get("compute_s", 0.0) for m in ms if m.shard_id.startswith(p))
           for p in ("t-", "n-")}
    return {"wall": wall, "t": cmp["t-"], "n": cmp["n-"], "reads": reads["n"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--docs-per-shard", type=int, default=160)
    ap.add_argument("--shards", type=int, default=4, help="shards at 1x")
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--old-sizes", default="1,4,16", help="sizes to also run per-part ('' none)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    old_sizes = {int(s) for s in args.old_sizes.split(",") if s}
    rows: dict[str, list[tuple[int, dict[str, float]]]] = {"run index": [], "per part": []}
    print(f"{'size':>5} {'docs':>7} {'variant':>10} {'wall s':>8} {'t cmp/1k':>9} "
          f"{'n cmp/1k':>9} {'key reads':>9}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pack-warm-") as tmp:  # imports, first calls
        generate(DataRoot(tmp), 2, 8)
        measure(PackStage(), DataRoot(tmp), False)
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
            root = DataRoot(tmp)
            docs = generate(root, args.shards * size, args.docs_per_shard)
            runs = [("run index", PackStage(), False)]
            if size in old_sizes:
                runs.append(("per part", PerPartPack(), True))
            for label, stage, force in runs:
                r = measure(stage, root, force)
                rows[label].append((docs, r))
                print(f"{size:>5} {docs:>7} {label:>10} {r['wall']:>8.2f} "
                      f"{1000 * r['t'] / docs:>9.3f} {1000 * r['n'] / docs:>9.3f} "
                      f"{int(r['reads']):>9}", flush=True)
    for label, rs in rows.items():
        if not rs:
            continue
        d0, a = rs[0]
        for d1, b in rs[1:]:
            ratio = {part: ((b[part] - a[part]) / (d1 - d0)) / (a[part] / d0) for part in "tn"}
            whole = ((b["t"] + b["n"] - a["t"] - a["n"]) / (d1 - d0)) / ((a["t"] + a["n"]) / d0)
            print(f"{label}: marginal compute per doc {d0}->{d1} docs: {whole:.2f}x the {d0}-doc "
                  f"average (token parts {ratio['t']:.2f}x, neighbour parts {ratio['n']:.2f}x; "
                  f"goal <= 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
