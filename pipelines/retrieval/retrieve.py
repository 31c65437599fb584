"""Stage `retrieve` (Beam): neighbours per document and query modality, with redundancy skipping
and query-dropout variants (paper §3.2 "Diversity")."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from model.clip_encoder import DocEncoder, decode_image, stable_seed
from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.retrieval.encoders import EncoderCache, embed_encoder
from pipelines.retrieval.faiss_index import LoadedIndex, load_index, vectors
from pipelines.retrieval.search import SKIPS, search_and_select
from storage.fs import DataRoot
from storage.manifest import list_manifests, upstream_ref

log = logging.getLogger(__name__)

MODALITIES = ("text", "image")

RETRIEVE_SHARD = pa.schema([
    ("key", pa.string()), ("query", pa.string()), ("variant", pa.int16()),
    ("neighbor_keys", pa.list_(pa.string())), ("neighbor_scores", pa.list_(pa.float32())),
    ("n_candidates", pa.int32()), ("skipped_self", pa.int32()), ("skipped_duplicate", pa.int32()),
    ("skipped_query_sim", pa.int32()), ("skipped_redundant", pa.int32()),
])


@dataclass(frozen=True)
class RetrieveConfig(StageConfig):
    """How many neighbours to keep, what counts as redundant, and how many dropout variants."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "device", "threads", "use_gpu"})
    top_n: int = 32  # candidates fetched from the index per query (> k_max leaves room to skip)
    k_max: int = 4  # neighbours kept per query (training samples K ~ U{0,1,2} from them)
    query_sim_threshold: float = 0.9  # skip a candidate scoring above this with the query
    redundancy_threshold: float = 0.9  # skip a candidate this similar to an already kept one
    variants: int = 3  # query-dropout variants per query (0 = none)
    drop_fraction: float = 0.2  # share of caption tokens / ViT patches a variant drops
    seed: int = 0  # variants' token/patch choice (per key, modality, variant)
    batch_size: int = 256  # queries per FAISS search call
    device: str = "cpu"  # encoder device for the variants: "cpu", "cuda" or "auto"
    threads: int = 1  # torch CPU threads per worker
    use_gpu: bool = True  # search on GPU FAISS when available

    def __post_init__(self) -> None:
        self.check(self.k_max >= 1, "k_max", "must be >= 1")
        self.check(self.top_n > self.k_max, "top_n", f"must be > k_max ({self.k_max})")
        self.check(self.variants >= 0, "variants", "must be >= 0")
        self.check(0 < self.drop_fraction < 1, "drop_fraction", "must be in (0, 1)")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class Queries:
    """Q query vectors with the document they come from and their kind."""

    doc: np.ndarray  # (Q,) row of the query document in the shard
    modality: np.ndarray  # (Q,) index into MODALITIES
    variant: np.ndarray  # (Q,)
    vecs: np.ndarray  # (Q, D) float32, L2-normalised


def base_queries(emb: pa.Table) -> Queries:
    """Variant 0: each document's stored text and image embeddings (where the part exists)."""
    docs, mods, vecs = [], [], []
    for m, col in enumerate(("text_emb", "image_emb")):
        v = vectors(emb, col)
        present = np.flatnonzero(np.abs(v).sum(axis=1) > 0)  # a missing part is stored as zeros
        docs.append(present)
        mods.append(np.full(len(present), m))
        vecs.append(v[present])
    docs_a = np.concatenate(docs)
    return ordered(Queries(docs_a, np.concatenate(mods), np.zeros(len(docs_a), np.int64),
                           np.concatenate(vecs)))


def ordered(qs: Queries) -> Queries:
    """Rows by document, then modality (text, image), then variant: the shard's row order."""
    order = np.lexsort((qs.variant, qs.modality, qs.doc))
    return Queries(qs.doc[order], qs.modality[order], qs.variant[order], qs.vecs[order])


def dropout_queries(encoder: DocEncoder, base: Queries, keys: list[str], captions: list[str],
                    jpgs: list[bytes], cfg: RetrieveConfig) -> Queries:
    """Variants 1..V: each query re-encoded with drop_fraction of its tokens/patches dropped."""
    out = []
    for m, name in enumerate(MODALITIES):
        docs = base.doc[base.modality == m]
        for v in range(1, cfg.variants + 1):
            seeds = [stable_seed(cfg.seed, keys[d], name, v) for d in docs]
            if name == "text":
                vecs = encoder.encode_text([captions[d] for d in docs], cfg.drop_fraction, seeds)
            else:
                images = [decode_image(jpgs[d], encoder.image_side) for d in docs]
                vecs = encoder.encode_image(images, cfg.drop_fraction, seeds)  # type: ignore[arg-type]
            out.append(Queries(docs, np.full(len(docs), m), np.full(len(docs), v), vecs))
    if not out:
        none = np.zeros(0, np.int64)
        return Queries(none, none, none, np.zeros((0, base.vecs.shape[1]), np.float32))
    return Queries(np.concatenate([o.doc for o in out]), np.concatenate([o.modality for o in out]),
                   np.concatenate([o.variant for o in out]), np.concatenate([o.vecs for o in out]))


def concat(a: Queries, b: Queries) -> Queries:
    return ordered(Queries(np.concatenate([a.doc, b.doc]), np.concatenate([a.modality, b.modality]),
                           np.concatenate([a.variant, b.variant]),
                           np.concatenate([a.vecs, b.vecs.astype(np.float32)])))


def rows_for(index: LoadedIndex, qs: Queries, keys: np.ndarray, sha: np.ndarray,
             cfg: RetrieveConfig) -> dict[str, list[Any]]:
    """Output columns for all queries, searched in batches."""
    cols: dict[str, list[Any]] = {f.name: [] for f in RETRIEVE_SHARD}
    for s in range(0, len(qs.doc), cfg.batch_size):
        sl = slice(s, s + cfg.batch_size)
        d = qs.doc[sl]
        sel, scores, ids = search_and_select(index, qs.vecs[sl], keys[d], sha[d], cfg)
        for r in range(len(d)):
            pos = sel.kept[r][sel.kept[r] >= 0]
            cols["key"].append(keys[d[r]])
            cols["query"].append(MODALITIES[qs.modality[sl][r]])
            cols["variant"].append(int(qs.variant[sl][r]))
            cols["neighbor_keys"].append(index.keys[ids[r, pos]].tolist())
            cols["neighbor_scores"].append(scores[r, pos].tolist())
            cols["n_candidates"].append(int(sel.n_candidates[r]))
            for rule in SKIPS:
                cols[f"skipped_{rule}"].append(int(sel.skipped[rule][r]))
    return cols


class RetrieveResources:
    """Per-worker state: the index (loaded once, checked against its digest) and the encoder."""

    def __init__(self, cfg: RetrieveConfig):
        self.use_gpu = cfg.use_gpu
        self.encoders = EncoderCache(cfg.device, 64, cfg.threads)
        self._index: LoadedIndex | None = None

    def index(self, root: DataRoot, digest: str) -> LoadedIndex:
        if self._index is None or self._index.digest != digest:
            self._index = load_index(root, self.use_gpu)
            if self._index.digest != digest:
                raise RuntimeError("the index changed while retrieve was running: run it again")
        return self._index


class RetrieveStage(Stage):
    """One neighbour shard per embed shard; inputs: embed shard, download shard, index."""

    name = "retrieve"
    version = "1"
    config = RetrieveConfig
    engine = "beam"
    description = "neighbours per doc and query modality, redundancy skipping, query dropout"

    def plan(self, root: DataRoot, cfg: RetrieveConfig) -> list[ShardSpec]:
        index = upstream_ref(root, "index", "main")
        shards = sorted(m.shard_id for m in list_manifests(root, "embed"))
        return [ShardSpec(self.name, s, (upstream_ref(root, "embed", s),
                                         upstream_ref(root, "download", s), index)) for s in shards]

    def load(self, cfg: RetrieveConfig) -> RetrieveResources:
        return RetrieveResources(cfg)

    def run_shard(self, ctx: ShardContext, resources: RetrieveResources | None) -> ShardResult:
        cfg: RetrieveConfig = ctx.cfg
        res = resources or self.load(cfg)
        enc = embed_encoder(ctx.root, ctx.spec.inputs[0].shard_id)
        index = res.index(ctx.root, ctx.spec.inputs[2].digest)
        index.check_encoder(enc["encoder"], enc["dim"])
        emb = ctx.read_input(0, ["key", "sha256", "text_emb", "image_emb"])
        keys = np.asarray(emb["key"].to_pylist(), dtype=object)
        sha = np.asarray([s or "" for s in emb["sha256"].to_pylist()], dtype=object)
        qs = base_queries(emb)
        if cfg.variants:
            encoder = res.encoders.get(ctx.root, enc["model"], enc["checkpoint"], enc["encoder"])
            caps, jpgs = doc_parts(ctx, list(keys))
            qs = concat(qs, dropout_queries(encoder, qs, list(keys), caps, jpgs, cfg))
        t0 = time.time()
        table = pa.Table.from_pydict(rows_for(index, qs, keys, sha, cfg), schema=RETRIEVE_SHARD)
        ctx.write_table(table)
        return ShardResult(rows_in=len(keys), rows_out=table.num_rows,
                           metrics=summary(table) | {
                               "index_fingerprint": index.digest, "encoder": enc["encoder"],
                               "queries_per_s": round(len(qs.doc) / max(time.time() - t0, 1e-9), 1)})


def doc_parts(ctx: ShardContext, keys: list[str]) -> tuple[list[str], list[bytes]]:
    """Captions and JPEG bytes of `keys`, from the download shard, in `keys` order."""
    t = ctx.read_input(1, ["key", "caption", "jpg"]).to_pylist()
    by_key = {r["key"]: r for r in t}
    return ([by_key[k]["caption"] or "" for k in keys], [by_key[k]["jpg"] for k in keys])


def summary(table: pa.Table) -> dict[str, Any]:
    """Mean kept neighbours and total skips by rule (what a person checks first)."""
    kept = np.array([len(x) for x in table["neighbor_keys"].to_pylist()])
    out: dict[str, Any] = {"queries": table.num_rows,
                           "mean_kept": round(float(kept.mean()), 3) if len(kept) else 0.0}
    for rule in SKIPS:
        out[f"skipped_{rule}"] = int(pa.compute.sum(table[f"skipped_{rule}"]).as_py() or 0)
    return out


