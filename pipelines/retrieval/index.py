"""Stage `index`: a FAISS inner-product index over doc_emb plus a key map (row id -> key, sha256)."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.retrieval.faiss_index import gpu_available, set_search_params, vectors
from storage.fs import DataRoot
from storage.manifest import list_manifests, read_manifest, upstream_ref

log = logging.getLogger(__name__)

RECALL_K = 10


@dataclass(frozen=True)
class IndexConfig(StageConfig):
    """Which FAISS index to build over the document embeddings, and how it is searched."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"use_gpu"})
    factory: str = "Flat"  # FAISS index factory string: Flat (paper), IVF1024,PQ64, HNSW32, ...
    train_sample: int = 200_000  # at most this many vectors train a non-flat index
    nprobe: int = 32  # IVF cells visited per query (ignored by non-IVF indexes)
    ef_search: int = 128  # HNSW search breadth (ignored by non-HNSW indexes)
    recall_sample: int = 1000  # queries for the recall@10-vs-exact check of non-flat indexes
    seed: int = 0  # training-sample and recall-sample draw
    use_gpu: bool = True  # build and search on GPU FAISS when it is installed and a GPU is present

    def __post_init__(self) -> None:
        try:
            faiss.index_factory(8 if "PQ" not in self.factory else _pq_dim(self.factory),
                                self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            self.check(False, "factory", f"FAISS cannot parse {self.factory!r}: {str(e)[:200]}")
        self.check(self.train_sample >= 1, "train_sample", "must be >= 1")
        self.check(self.nprobe >= 1, "nprobe", "must be >= 1")


def _pq_dim(factory: str) -> int:
    """A dimension the factory's PQ accepts (multiple of its sub-quantizer count) for parsing."""
    m = re.search(r"PQ(\d+)", factory)
    return 8 * int(m.group(1)) if m else 8


def estimate_bytes(factory: str, n: int, d: int) -> int:
    """Rough resident size of the built index (codes + coarse quantizer + graph links)."""
    total = 0
    for part in factory.split(","):
        if m := re.fullmatch(r"IVF(\d+)(_HNSW\d+)?", part):
            total += int(m.group(1)) * d * 4 + n * 8  # centroids + stored ids
        elif m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?", part):
            bits = int(m.group(2) or 8)
            total += n * int(m.group(1)) * bits // 8 + (1 << bits) * d * 4
        elif m := re.fullmatch(r"HNSW(\d+)(?:_.*)?", part):
            total += n * int(m.group(1)) * 2 * 4 + (n * d * 4 if part == factory else 0)
        elif part in ("Flat", "IDMap,Flat") or part.startswith("Flat"):
            total += n * d * 4
        elif part == "SQ8":
            total += n * d
        elif part == "SQfp16":
            total += n * d * 2
    return total


def build_index(xb: np.ndarray, cfg: IndexConfig) -> tuple[faiss.Index, dict[str, Any]]:
    """Train (on a sample) and fill the index; returns the CPU index and build facts."""
    n, d = xb.shape
    index = faiss.index_factory(d, cfg.factory, faiss.METRIC_INNER_PRODUCT)
    on_gpu = cfg.use_gpu and gpu_available()
    work = index
    if on_gpu:
        try:
            work = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        except RuntimeError as e:  # e.g. HNSW has no GPU version
            log.info("index: %s stays on CPU (%s)", cfg.factory, str(e)[:100])
            on_gpu = False
    if not work.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample = xb[np.sort(rng.choice(n, min(n, cfg.train_sample), replace=False))]
        try:
            work.train(sample)
        except RuntimeError as e:
            raise ValueError(
                f"FAISS could not train {cfg.factory!r} on {len(sample)} vectors: {str(e)[:200]} "
                f"-- use Flat or fewer IVF cells (about n/39) for a memory this small") from e
    work.add(xb)
    cpu = faiss.index_gpu_to_cpu(work) if on_gpu else work
    return cpu, {"gpu": on_gpu, "search_params": set_search_params(cpu, cfg.nprobe, cfg.ef_search)}


def recall_vs_exact(index: faiss.Index, xb: np.ndarray, sample: int, seed: int) -> float:
    """recall@10 of `index` against exact inner-product search, queries drawn from the memory."""
    rng = np.random.default_rng(seed)
    q = xb[rng.choice(len(xb), min(sample, len(xb)), replace=False)]
    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    k = min(RECALL_K, len(xb))
    _, truth = exact.search(q, k)
    _, got = index.search(q, k)
    hits = [len(set(t) & set(g)) for t, g in zip(truth, got, strict=True)]
    return round(float(np.sum(hits)) / truth.size, 4)


def common_encoder(root: DataRoot, shard_ids: list[str]) -> dict[str, Any]:
    """The one encoder every embed shard was made with; refuses a mix."""
    seen = {}
    for sid in shard_ids:
        m = read_manifest(root, "embed", sid)
        met = m.metrics if m else {}
        seen[sid] = {"model": met.get("model"), "checkpoint": met.get("checkpoint"),
                     "fingerprint": met.get("encoder"), "dim": met.get("dim")}
    prints = {v["fingerprint"] for v in seen.values()}
    if len(prints) != 1:
        raise ValueError(f"embed shards come from different encoders {sorted(map(str, prints))}: "
                         f"re-run `racm3 run embed` so every shard uses the configured one")
    return next(iter(seen.values()))


class IndexStage(Stage):
    """One artifact shard `main`: main.faiss, main.keys.parquet, manifest with encoder and recall."""

    name = "index"
    version = "1"
    config = IndexConfig
    description = "FAISS inner-product index over document embeddings + key map"

    def plan(self, root: DataRoot, cfg: IndexConfig) -> list[ShardSpec]:
        shards = sorted(m.shard_id for m in list_manifests(root, "embed"))
        if not shards:
            raise FileNotFoundError("index needs embed shards: run `racm3 run embed` first")
        return [ShardSpec(self.name, "main", tuple(upstream_ref(root, "embed", s) for s in shards))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: IndexConfig = ctx.cfg
        encoder = common_encoder(ctx.root, [i.shard_id for i in ctx.spec.inputs])
        tables = [ctx.read_input(i, ["key", "sha256", "doc_emb"]) for i in range(len(ctx.spec.inputs))]
        table = pa.concat_tables(tables)
        xb = vectors(table)
        n, d = xb.shape
        est = estimate_bytes(cfg.factory, n, d)
        log.info("index: %s over %d x %d vectors: ~%.1f MiB index, ~%.1f MiB vectors in memory",
                 cfg.factory, n, d, est / 2**20, xb.nbytes / 2**20)
        t0 = time.time()
        index, facts = build_index(xb, cfg)
        metrics = {"encoder": encoder, "dim": d, "ntotal": int(index.ntotal), "factory": cfg.factory,
                   "memory_estimate_bytes": est, "build_seconds": round(time.time() - t0, 2), **facts}
        if cfg.factory != "Flat":
            metrics["recall@10_vs_exact"] = recall_vs_exact(index, xb, cfg.recall_sample, cfg.seed)
        with ctx.root.fs.open(ctx.output_path("faiss"), "wb") as f:
            f.write(faiss.serialize_index(index).tobytes())
        with ctx.root.fs.open(ctx.output_path("keys.parquet"), "wb") as f:
            pq.write_table(table.select(["key", "sha256"]), f)
        return ShardResult(rows_in=n, rows_out=int(index.ntotal), metrics=metrics)


