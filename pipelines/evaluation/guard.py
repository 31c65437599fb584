"""The leakage guard (§3.4): memory documents that are near-duplicates of an evaluation image or
caption are never retrieved for any evaluation query; searched in bounded chunks of queries."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.evaluation.split import batches
from pipelines.retrieval.faiss_index import vectors
from pipelines.retrieval.search import Retriever, select_neighbors
from storage.coco import CocoIndex
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table

QUERY_CHUNK = 256  # queries scored against a memory shard at once: (chunk, shard rows) floats


def near_duplicates(root: DataRoot, image_emb: np.ndarray, text_emb: np.ndarray,
                    image_thr: float, text_thr: float) -> dict[str, set[str]]:
    """Memory keys whose image (text) embedding scores above the threshold with any evaluation
    image (caption); streamed shard by shard over the embed shards, queries in chunks."""
    out: dict[str, set[str]] = {"image": set(), "text": set()}
    for m in list_manifests(root, "embed"):
        t = read_table(root, root.artifact("embed", m.shard_id, "parquet"),
                       ["key", "text_emb", "image_emb"])
        keys = np.asarray(t["key"].to_pylist(), dtype=object)
        for kind, q, thr in (("image", image_emb, image_thr), ("text", text_emb, text_thr)):
            mem = vectors(t, f"{kind}_emb")  # (N, D), zeros where the part is missing
            if not len(q) or not len(mem):
                continue
            best = np.full(len(mem), -np.inf, np.float32)
            for s in range(0, len(q), QUERY_CHUNK):
                best = np.maximum(best, (q[s:s + QUERY_CHUNK] @ mem.T).max(axis=0))  # (N,)
            out[kind].update(keys[best > thr].tolist())
    return out


def split_exclusions(root: DataRoot, retriever: Retriever, index: CocoIndex, cfg: Any,
                     memory: DataRoot | None = None) -> dict[str, Any]:
    """The guard over the WHOLE split (every shard excludes the same documents), batch by batch;
    the split's images are read from `root`, the memory's embeddings from `memory` (default `root`).

    Reads its own copy of the counts: the skips of the split are counted by the shards."""
    enc = retriever.encoder
    scratch = CocoIndex(index.path, index.dirs, index.entries, dict(index.counts))
    dups: dict[str, set[str]] = {"image": set(), "text": set()}
    for batch in batches(root, scratch, 0, None, cfg.batch_images):
        d = near_duplicates(memory or root, enc.encode_image([it.image for it in batch]),
                            enc.encode_text([c for it in batch for c in it.captions]),
                            cfg.dup_image_threshold, cfg.dup_text_threshold)
        dups["image"] |= d["image"]
        dups["text"] |= d["text"]
    return {"excluded": dups["image"] | dups["text"],
            "summary": {"excluded_memory_docs": len(dups["image"] | dups["text"]),
                        "image_near_duplicates": len(dups["image"]),
                        "text_near_duplicates": len(dups["text"]),
                        "image_threshold": cfg.dup_image_threshold,
                        "text_threshold": cfg.dup_text_threshold}}


def guarded_search(retriever: Retriever, vecs: np.ndarray, excluded: set[str], k: int,
                   chunk: int = 64) -> list[list[str]]:
    """Neighbour keys per query (best first, redundancy rules as in training), never a key in
    `excluded` (treated like the query's own document); `chunk` queries at a time, so the
    candidate vectors held are (chunk, top_n + |excluded|, D), not (all queries, ..., D)."""
    out: list[list[str]] = []
    for s in range(0, len(vecs), chunk):
        out += _guarded_chunk(retriever, vecs[s:s + chunk], excluded, k)
    return out


def _guarded_chunk(retriever: Retriever, vecs: np.ndarray, excluded: set[str],
                   k: int) -> list[list[str]]:
    index, rule = retriever.index, retriever.rule
    n = min(rule.top_n + len(excluded), index.cpu.ntotal)
    scores, ids = index.search(vecs, n)
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    uniq, inv = np.unique(safe, return_inverse=True)
    cand = index.reconstruct(uniq)[inv.reshape(safe.shape)]  # (chunk, N, D)
    banned = valid & np.vectorize(excluded.__contains__, otypes=[bool])(index.keys[safe])
    sel = select_neighbors(scores, cand, valid, banned, np.zeros_like(valid), k,
                           rule.query_sim_threshold, rule.redundancy_threshold)
    return [index.keys[ids[r, sel.kept[r][sel.kept[r] >= 0]]].tolist() for r in range(len(vecs))]
