"""Stage `index`: a FAISS inner-product index over doc_emb plus a key map (row id -> key, sha256),
built shard by shard, optionally as N sub-indexes built in parallel on Beam."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.retrieval.faiss_index import (
    ShardedIndex,
    gpu_available,
    memory,
    part_of,
    part_suffixes,
    read_index_file,
    set_search_params,
)
from pipelines.retrieval.index_add import (
    AddPlan,
    add_plan,
    add_to_parts,
    added_metrics,
    drift,
    iso_utc,
)
from pipelines.retrieval.index_build import (
    add_shards,
    choose_factory,
    estimate_bytes,
    parse_bytes,
    recall_vs_exact,
    row_counts,
    training_sample,
    write_index,
)
from pipelines.retrieval.memory_store import MemoryWriter, rows_file
from storage.fs import DataRoot
from storage.manifest import Manifest, list_manifests, params_hash, read_manifest, upstream_ref
from storage.shards import read_table

log = logging.getLogger(__name__)

__all__ = ["IndexConfig", "IndexStage", "estimate_bytes"]

RECALL_K = 10


@dataclass(frozen=True)
class IndexConfig(StageConfig):
    """Which FAISS index to build over the document embeddings, and how it is searched."""

    # rebuild / retrain_below: a Flat index with shards added equals a rebuild; a trained one
    # differs only by its quantizer's training sample, which the manifest records
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"use_gpu", "beam_options", "rebuild", "retrain_below"})
    factory: str = "Flat"  # FAISS factory string: Flat (paper), IVF1024,PQ64, ...; "" = by max_memory
    max_memory: str = ""  # budget for the built index ("16GB"): picks the factory when it is ""
    shards: int = 1  # sub-indexes (by sha1(key) mod shards), built in parallel on Beam
    train_sample: int = 200_000  # at most this many vectors train a non-flat index
    nprobe: int = 32  # IVF cells visited per query (ignored by non-IVF indexes)
    ef_search: int = 128  # HNSW search breadth (ignored by non-HNSW indexes)
    recall_sample: int = 1000  # queries for the recall@10-vs-exact check of non-flat indexes
    seed: int = 0  # training-sample and recall-sample draw
    use_gpu: bool = True  # build and search on GPU FAISS when it is installed and a GPU is present
    beam_options: tuple[str, ...] = ()  # runner for the sub-index builds; () = local processes
    rebuild: bool = False  # train and build from every shard, never add new shards to the built
    # index (also re-runs an index that had shards added: the retrain the drift check asks for)
    retrain_below: float = 0.9  # drift check: retrain due when the added vectors' recall@10 vs exact
    # is below this times the index's recall when trained

    def __post_init__(self) -> None:
        if self.factory:
            try:
                faiss.index_factory(8 if "PQ" not in self.factory else _pq_dim(self.factory),
                                    self.factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                self.check(False, "factory", f"FAISS cannot parse {self.factory!r}: {str(e)[:200]}")
        else:
            self.check(bool(self.max_memory), "factory", "is empty: set it or index.max_memory")
        if self.max_memory:
            try:
                parse_bytes(self.max_memory)
            except ValueError as e:
                self.check(False, "max_memory", str(e))
        self.check(self.shards >= 1, "shards", "must be >= 1")
        self.check(self.train_sample >= 1, "train_sample", "must be >= 1")
        self.check(self.nprobe >= 1, "nprobe", "must be >= 1")
        self.check(0.0 <= self.retrain_below <= 1.0, "retrain_below", "must be in [0, 1]")


def _pq_dim(factory: str) -> int:
    """A dimension the factory's PQ accepts (multiple of its sub-quantizer count) for parsing."""
    m = re.search(r"PQ(\d+)", factory)
    return 8 * int(m.group(1)) if m else 8


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


def shard_captions(root: DataRoot, embed_shard: str, keys: list[str]) -> list[str]:
    """Captions of `keys` from the download shard the embed shard was made from ('' where there
    is none, e.g. embed shards written without a download stage)."""
    m = read_manifest(root, "embed", embed_shard)
    src = [i for i in (m.inputs if m else []) if i.stage == "download"]
    if not src:
        return [""] * len(keys)
    t = read_table(root, root.artifact("download", src[0].shard_id, "parquet"), ["key", "caption"])
    by_key = dict(zip(t["key"].to_pylist(), t["caption"].to_pylist(), strict=True))
    return [by_key.get(k) or "" for k in keys]


def write_memory(ctx: ShardContext, paths: Sequence[str], n: int, d: int, parts: int,
                 built: Manifest | None = None, start: int = 0) -> tuple[list[int], list[str]]:
    """Stream the memory store (memory_store.py) and main.keys.parquet (key, sha256, part: for
    people and DuckDB) one embedding shard at a time; returns (rows per part, the temp paths of
    the per-part row-id files). With `built` (adding to an index) its store and key map are
    copied first and only `paths[start:]` are read."""
    counts = np.zeros(parts, np.int64)
    schema = pa.schema([("key", pa.string()), ("sha256", pa.string())]
                       + ([("part", pa.int32())] if parts > 1 else []))
    with ctx.root.fs.open(paths[0], "rb") as f:
        vec = pq.ParquetFile(f).schema_arrow.field("doc_emb").type.value_type
    tmp: dict[str, str] = {}

    def open_out(suffix: str) -> Any:
        tmp[suffix] = ctx.output_path(suffix)
        return ctx.root.fs.open(tmp[suffix], "wb")

    store = MemoryWriter(open_out, n, d, np.float16 if vec == pa.float16() else np.float32, parts)
    with ctx.root.fs.open(ctx.output_path("keys.parquet"), "wb") as f, \
            pq.ParquetWriter(f, schema) as w:
        if built is not None:
            store.copy(memory(ctx.root, built, parts))
            copy_key_map(ctx.root, w)
            counts += np.asarray(built.metrics.get("part_rows", [store.row]), np.int64)
        for i, p in enumerate(paths[start:], start):
            t = read_table(ctx.root, p, ["key", "sha256", "doc_emb"])
            keys = t["key"].to_pylist()
            owner = part_of(keys, parts)
            counts += np.bincount(owner, minlength=parts)
            store.add(keys, t["sha256"].to_pylist(),
                      shard_captions(ctx.root, ctx.spec.inputs[i].shard_id, keys),
                      t["doc_emb"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
                      .reshape(len(keys), d), owner)
            t = t.select(["key", "sha256"])
            if parts > 1:
                t = t.append_column("part", pa.array(owner, pa.int32()))
            w.write_table(t.cast(schema))
    store.close()
    return [int(c) for c in counts], [tmp[rows_file(p)] for p in range(parts) if parts > 1]


def copy_key_map(root: DataRoot, w: pq.ParquetWriter) -> None:
    """The built main.keys.parquet into `w`, a row group at a time (the layout a rebuild writes)."""
    with root.fs.open(root.artifact("index", "main", "keys.parquet"), "rb") as f:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            w.write_table(pf.read_row_group(g))


def trained_template(root: DataRoot, paths: Sequence[str], counts: Sequence[int], d: int,
                     factory: str, cfg: IndexConfig) -> tuple[Any, int]:
    """An empty index of `factory`, trained on the seeded sample when its type needs training."""
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index, 0
    sample = training_sample(root, paths, counts, cfg.train_sample, cfg.seed)
    try:
        index.train(sample)
    except RuntimeError as e:
        raise ValueError(
            f"FAISS could not train {factory!r} on {len(sample)} vectors: {str(e)[:200]} "
            f"-- use Flat or fewer IVF cells (about n/39) for a memory this small") from e
    return index, len(sample)


def build_one(blob: bytes, root: DataRoot, paths: Sequence[str], n: int, out: str,
              use_gpu: bool) -> tuple[int, bool]:
    """The single index, filled shard by shard (on GPU FAISS when available) and written to
    `out`; returns (file bytes, built on GPU). Only the index and one shard are ever in memory."""
    index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    if use_gpu and gpu_available():
        try:
            work = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            return write_index(root, out, faiss.index_gpu_to_cpu(
                add_shards(work, root, paths, n))), True
        except RuntimeError as e:  # e.g. HNSW has no GPU version
            log.info("index: stays on CPU (%s)", str(e)[:100])
    return write_index(root, out, add_shards(index, root, paths, n)), False


class IndexStage(Stage):
    """One artifact shard `main`: the index file(s), the mapped memory store, main.keys.parquet,
    manifest with encoder, sizes and recall.

    Sub-indexes are artifacts of this one shard rather than shards of their own: retrieve and
    evaluate need the whole index or none, so the index commits (and is fingerprinted) as one.
    """

    name = "index"
    version = "3"  # 3: the mapped memory store (memory_store.py) beside the index
    config = IndexConfig
    description = "FAISS inner-product index over document embeddings + key map"

    def plan(self, root: DataRoot, cfg: IndexConfig) -> list[ShardSpec]:
        shards = sorted(m.shard_id for m in list_manifests(root, "embed"))
        if not shards:
            raise FileNotFoundError("index needs embed shards: run `racm3 run embed` first")
        return [ShardSpec(self.name, "main", tuple(upstream_ref(root, "embed", s) for s in shards))]

    def wants_rerun(self, cfg: IndexConfig, manifest: Manifest) -> bool:
        """index.rebuild retrains an index that had shards added since it was trained."""
        return cfg.rebuild and manifest.metrics.get("built") == "added"

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: IndexConfig = ctx.cfg
        encoder = common_encoder(ctx.root, [i.shard_id for i in ctx.spec.inputs])
        paths = [ctx.input_path(i) for i in range(len(ctx.spec.inputs))]
        counts = row_counts(ctx.root, paths)
        plan, why = self.add_plan(ctx, cfg, encoder, counts)
        if plan is not None:
            return add(ctx, cfg, plan, paths, counts, int(encoder["dim"]))
        if why != "no index yet":
            log.info("index: building from every shard (%s)", why)
        return build(ctx, cfg, encoder, paths, counts)

    def add_plan(self, ctx: ShardContext, cfg: IndexConfig, encoder: dict[str, Any],
                 counts: list[int]) -> tuple[AddPlan | None, str]:
        """Whether the new shards can be added to the built index, and if not, why."""
        if cfg.rebuild:
            return None, "index.rebuild is set"
        built = read_manifest(ctx.root, self.name, ctx.spec.shard_id)
        plan, why = add_plan(ctx.root, built, ctx.spec.inputs, self.version,
                             params_hash(self.params(cfg)), str(encoder["fingerprint"]))
        if plan is None:
            return None, why
        if sum(counts[:plan.known]) != plan.rows:
            return None, f"the built index holds {plan.rows} rows, its shards {sum(counts[:plan.known])}"
        factory, n = str(plan.built.metrics["factory"]), sum(counts)
        budget = parse_bytes(cfg.max_memory) if cfg.max_memory else 0
        if not cfg.factory and estimate_bytes(factory, n, int(encoder["dim"])) > budget:
            return None, f"{factory} over {n} vectors no longer fits index.max_memory"
        return plan, ""


def build(ctx: ShardContext, cfg: IndexConfig, encoder: dict[str, Any], paths: list[str],
          counts: list[int]) -> ShardResult:
    """Train (trained types) and build from every embedding shard."""
    n, d = sum(counts), int(encoder["dim"])
    part_rows, rows = write_memory(ctx, paths, n, d, cfg.shards)
    budget = parse_bytes(cfg.max_memory) if cfg.max_memory else 0
    factory = cfg.factory or choose_factory(n, d, budget, cfg.train_sample)
    est = estimate_bytes(factory, n, d)
    if budget and est > budget:
        raise ValueError(f"config field `index.max_memory`: {factory} over {n} x {d} needs "
                         f"~{est} bytes, over the budget {budget}: set index.factory = '' to "
                         f"let the budget choose, or raise it")
    log.info("index: %s over %d x %d vectors in %d part(s): ~%.1f MiB", factory, n, d,
             cfg.shards, est / 2**20)
    t0 = time.time()
    template, trained_on = trained_template(ctx.root, paths, counts, d, factory, cfg)
    blob = faiss.serialize_index(template).tobytes()  # empty and trained: centroids only
    del template
    outs = [ctx.output_path(s) for s in part_suffixes(cfg.shards)]
    gpu = False
    if cfg.shards == 1:
        size, gpu = build_one(blob, ctx.root, paths, n, outs[0], cfg.use_gpu)
        sizes = [size]
    else:
        sizes = build_parts(ctx.root, paths, blob, part_rows, outs, cfg)
    built = time.time() - t0
    searched = checked(ctx.root, outs, rows, factory, n)
    metrics = {"encoder": encoder, "dim": d, "ntotal": n, "factory": factory,
               "factory_from": "index.factory" if cfg.factory else "index.max_memory",
               "parts": cfg.shards, "part_rows": part_rows,
               "memory_estimate_bytes": est, "index_bytes": int(sum(sizes)),
               "max_memory_bytes": budget, "train_vectors": trained_on,
               "build_seconds": round(built, 2), "gpu": gpu,
               "search_params": {} if searched is None else set_search_params(
                   searched, cfg.nprobe, cfg.ef_search),
               "built": "trained", "trained_rows": n, "trained_at": iso_utc(), "added": [],
               "retrain_due": False}
    if searched is not None and factory != "Flat":
        metrics["recall@10_vs_exact"] = recall_vs_exact(searched, ctx.root, paths, counts,
                                                        cfg.recall_sample, cfg.seed, RECALL_K)
    return ShardResult(rows_in=n, rows_out=n, metrics=metrics)


def add(ctx: ShardContext, cfg: IndexConfig, plan: AddPlan, paths: list[str], counts: list[int],
        d: int) -> ShardResult:
    """The new shards added to the built index: its store and key map copied and extended, each
    (sub-)index read and added to (no training), and the drift check on the added vectors."""
    built, n = plan.built.metrics, sum(counts)
    factory, t0 = str(built["factory"]), time.time()
    log.info("index: adding %d new shard(s), %d vectors, to the built %s index of %d (no "
             "retraining)", len(paths) - plan.known, n - plan.rows, factory, plan.rows)
    part_rows, rows = write_memory(ctx, paths, n, d, cfg.shards, plan.built, plan.known)
    new_rows = [a - b for a, b in zip(part_rows, built.get("part_rows", [plan.rows]), strict=True)]
    outs = [ctx.output_path(s) for s in part_suffixes(cfg.shards)]
    sizes = add_to_parts(ctx.root, plan, paths[plan.known:], outs, new_rows)
    seconds = time.time() - t0
    searched = checked(ctx.root, outs, rows, factory, n)
    recall = None
    if searched is not None and factory != "Flat":  # Flat search is exact: nothing drifts
        set_search_params(searched, cfg.nprobe, cfg.ef_search)
        recall = drift(searched, ctx.root, paths, counts, plan.rows, cfg.recall_sample,
                       cfg.seed, RECALL_K)
    metrics = {**built, "ntotal": n, "part_rows": part_rows, "index_bytes": int(sum(sizes)),
               "memory_estimate_bytes": estimate_bytes(factory, n, d),
               "build_seconds": round(seconds, 2), "gpu": False,
               **added_metrics(plan, ctx.spec.inputs, n - plan.rows, recall, cfg.retrain_below)}
    if metrics["retrain_due"]:
        log.warning("index: a retrain is due: the added vectors' recall@10 vs exact search is %s, "
                    "%s of the %s it had when trained (index.retrain_below = %s); run `racm3 run "
                    "index --set index.rebuild=true`", recall, metrics["drift"]["ratio"],
                    metrics["drift"]["recall@10_at_training"], cfg.retrain_below)
    return ShardResult(rows_in=n, rows_out=n, metrics=metrics)


def checked(root: DataRoot, outs: list[str], rows: list[str], factory: str, n: int) -> Any:
    """The written index read back (memory-mapped: no copy on a local root) and checked to hold
    `n` vectors; None for a Flat index on an object store (not downloaded again just for that)."""
    if not (root.is_local or factory != "Flat"):
        return None
    searched = reopen(root, outs, rows, factory)
    if searched.ntotal != n:
        raise RuntimeError(f"the index holds {searched.ntotal} vectors, the shards {n}")
    return searched


def reopen(root: DataRoot, outs: list[str], rows: list[str], factory: str) -> Any:
    """The written index read back as retrieve will see it (memory-mapped on local roots)."""
    parts = [read_built(root, p, factory) for p in outs]
    if len(parts) == 1:
        return parts[0]
    ids = []
    for r in rows:  # the stage's temp files: read once for the recall check
        with root.fs.open(r, "rb") as f:
            ids.append(np.frombuffer(f.read(), np.int64))
    return ShardedIndex(parts, ids)


def read_built(root: DataRoot, path: str, factory: str) -> Any:
    if root.is_local:
        return read_index_file(path, factory)
    with root.fs.open(path, "rb") as f:  # object store: the recall check reads it once
        return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))


def build_parts(root: DataRoot, paths: list[str], blob: bytes, part_rows: list[int],
                outs: list[str], cfg: IndexConfig) -> list[int]:
    """Build the sub-indexes in parallel on Beam (one element per part); returns file sizes."""
    from pipelines.retrieval.index_parts import build_on_beam

    opts = list(cfg.beam_options) or [
        "--runner=DirectRunner", "--direct_running_mode=multi_processing",
        f"--direct_num_workers={min(cfg.shards, os.cpu_count() or 1)}"]
    build_on_beam(root.uri, paths, blob, part_rows, outs, opts)
    return [int(root.fs.size(o)) for o in outs]
