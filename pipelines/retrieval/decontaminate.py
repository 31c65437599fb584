"""Stage `decontaminate`: main documents that near-duplicate an evaluation image or caption.

Per embed shard, the keys whose image (caption) embedding scores above a threshold with any image
(caption) of an evaluation split, with the split and the score. Tokenize leaves them out, so they
are neither main nor retrieved documents in training, nor documents of the memory's token store;
the index still holds their vectors, and evaluation's leakage guard (the same rule) never returns
them for an evaluation query (the paper's §3.4 guard, applied at training time too).
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.retrieval.encoders import EncoderCache, embed_encoder
from pipelines.retrieval.faiss_index import vectors
from storage.coco import coco_ref, load_coco
from storage.fs import DataRoot
from storage.manifest import list_manifests, upstream_ref

log = logging.getLogger(__name__)
QUERY_CHUNK = 256  # evaluation vectors scored against a shard at once: (chunk, shard rows) floats
DECONTAMINATE_SHARD = pa.schema([("key", pa.string()), ("split", pa.string()),
                                 ("kind", pa.string()), ("score", pa.float32())])


@dataclass(frozen=True)
class DecontaminateConfig(StageConfig):
    """Which evaluation sets are kept out of training and the memory, and how near is a copy."""

    EXECUTION_FIELDS = frozenset({"threads"})
    splits: tuple[str, ...] = ("demo/laion.coco/captions_dev.json",
                               "demo/laion.coco/captions_test.json")  # COCO JSONs; () = off
    image_threshold: float = 0.98  # cosine of image embeddings above which a document is a copy
    text_threshold: float = 0.98  # cosine of a caption embedding with any evaluation caption
    threads: int = 1  # torch threads for encoding the evaluation sets

    def __post_init__(self) -> None:
        for f in ("image_threshold", "text_threshold"):
            v = getattr(self, f)
            self.check(-1.0 <= v <= 1.0, f, "must be a cosine in [-1, 1]")
        self.check(self.threads >= 1, "threads", "must be >= 1")


class EvalVectors:
    """Evaluation-set embeddings, computed once per worker for each (split digest, encoder)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._encoders = EncoderCache()

    def get(self, root: DataRoot, split: str, digest: str, enc: dict[str, Any],
            threads: int) -> tuple[np.ndarray, np.ndarray]:
        key = (digest, enc["encoder"])
        with self._lock:
            if key not in self._cache:
                self._encoders.threads = threads
                encoder = self._encoders.get(root, enc["model"], enc["checkpoint"], enc["encoder"])
                coco = load_coco(root, split)
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in coco.images]
                caps = [c for cs in coco.captions for c in cs]
                self._cache[key] = (np.asarray(encoder.encode_image(images), np.float32),
                                    np.asarray(encoder.encode_text(caps), np.float32))
            return self._cache[key]


def best_scores(queries: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """(N,) best cosine of each memory row with any query, in bounded chunks of queries."""
    best = np.full(len(memory), -np.inf, np.float32)
    for s in range(0, len(queries), QUERY_CHUNK):
        best = np.maximum(best, (queries[s:s + QUERY_CHUNK] @ memory.T).max(axis=0))
    return best


class DecontaminateStage(Stage):
    name = "decontaminate"
    version = "1"
    config = DecontaminateConfig
    description = "find main documents that near-duplicate an evaluation image or caption"

    def plan(self, root: DataRoot, cfg: DecontaminateConfig) -> list[ShardSpec]:
        splits = tuple(coco_ref(root, s) for s in cfg.splits)
        return [ShardSpec(self.name, m.shard_id, (upstream_ref(root, "embed", m.shard_id), *splits))
                for m in list_manifests(root, "embed")]

    def load(self, cfg: DecontaminateConfig) -> EvalVectors:
        return EvalVectors()

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: DecontaminateConfig = ctx.cfg
        vecs = resources if isinstance(resources, EvalVectors) else EvalVectors()
        emb = ctx.read_input(0, ["key", "text_emb", "image_emb"])
        keys = np.asarray(emb["key"].to_pylist(), dtype=object)
        enc = embed_encoder(ctx.root, ctx.spec.shard_id)
        rows: dict[str, list] = {f: [] for f in DECONTAMINATE_SHARD.names}
        counts: dict[str, int] = {}
        for split, ref in zip(cfg.splits, ctx.spec.inputs[1:], strict=True):
            images, captions = vecs.get(ctx.root, split, ref.digest, enc, cfg.threads)
            for kind, q, col, thr in (("image", images, "image_emb", cfg.image_threshold),
                                      ("text", captions, "text_emb", cfg.text_threshold)):
                if not len(q) or not len(keys):
                    continue
                best = best_scores(q, vectors(emb, col))  # zeros where the part is missing
                for i in np.flatnonzero(best > thr):
                    for f, v in zip(DECONTAMINATE_SHARD.names,
                                    (keys[i], split, kind, float(best[i])), strict=True):
                        rows[f].append(v)
            counts[split] = len({k for k, s in zip(rows["key"], rows["split"], strict=True)
                                 if s == split})
        ctx.write_table(pa.table(rows, schema=DECONTAMINATE_SHARD))
        n = len(set(rows["key"]))
        return ShardResult(rows_in=len(keys), rows_out=n,
                           metrics={"near_duplicates_by_split": counts, "documents": n})


def excluded_keys(root: DataRoot) -> tuple[set[str], dict[str, int]]:
    """Every decontaminated key and the count per evaluation split (read shard by shard)."""
    from storage.shards import read_table

    keys: set[str] = set()
    per_split: dict[str, int] = {}
    for m in list_manifests(root, "decontaminate"):
        t = read_table(root, root.artifact("decontaminate", m.shard_id, "parquet"), ["key", "split"])
        keys.update(t["key"].to_pylist())
        for s, n in m.metrics.get("near_duplicates_by_split", {}).items():
            per_split[s] = per_split.get(s, 0) + int(n)
    return keys, per_split

