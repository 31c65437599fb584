"""Retrieval recall@k on a COCO split (paper Table 4): the computation, shared by recall and fit-clip."""

from __future__ import annotations

from typing import Any

import numpy as np

from model.clip_encoder import DocEncoder, decode_image, mix
from storage.coco import CocoSplit

TASKS = ("text_to_image", "text_to_mixture", "image_to_text", "image_to_mixture")



def recall(scores: np.ndarray, hits: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """scores (Q, M) similarities, hits (Q, M) bool relevance -> {"R@k": % of queries with a hit}."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(hits, order, axis=1)  # (Q, M) relevance in rank order
    return {f"R@{k}": round(100.0 * float(ranked[:, :k].any(axis=1).mean()), 2) for k in ks}


def chunked_recall(q: np.ndarray, q_owner: np.ndarray, mem: np.ndarray, m_owner: np.ndarray,
                   ks: tuple[int, ...], chunk: int = 512) -> dict[str, float]:
    """`recall` with relevance = same owner, `chunk` queries at a time: never the (Q, M) score
    matrix, only (chunk, M) and each query's top max(ks) (same order and ties as `recall`)."""
    kmax = min(max(ks), len(mem))
    hit = {k: 0 for k in ks}
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ mem.T  # (c, M)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]  # (c, kmax)
        ranked = m_owner[top] == q_owner[s:s + chunk, None]  # (c, kmax)
        for k in ks:
            hit[k] += int(ranked[:, :k].any(axis=1).sum())
    return {f"R@{k}": round(100.0 * hit[k] / max(len(q), 1), 2) for k in ks}



def table4(encoder: DocEncoder, split: CocoSplit, ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, Any]:
    """The four retrieval tasks of Table 4 on `split`.

    A mixture document is image i with its first caption; text queries are the other captions
    of each image (so no query is the memory's own text); image->text memory is every caption.
    """
    m = len(split.images)
    imgs = [decode_image(b, encoder.image_side) for b in split.images]
    if any(im is None for im in imgs):
        raise ValueError("a held-out image could not be decoded; regenerate the COCO split")
    image_emb = encoder.encode_image(imgs)  # type: ignore[arg-type]  # (M, D)
    flat = [(i, c) for i, caps in enumerate(split.captions) for c in caps]
    cap_emb = encoder.encode_text([c for _, c in flat])  # (sum captions, D)
    owner = np.array([i for i, _ in flat])
    first = np.cumsum([0] + [len(c) for c in split.captions[:-1]])  # (M,) first caption per image
    ones = np.ones(m, bool)
    mixture = mix(cap_emb[first], image_emb, ones, ones)  # (M, D)
    query = np.setdiff1d(np.arange(len(flat)), first)  # text queries: the non-first captions
    ids = np.arange(m)  # relevance = same image, scored chunk by chunk (no (Q, M) matrix)
    out: dict[str, Any] = {
        "text_to_image": chunked_recall(cap_emb[query], owner[query], image_emb, ids, ks),
        "text_to_mixture": chunked_recall(cap_emb[query], owner[query], mixture, ids, ks),
        "image_to_text": chunked_recall(image_emb, ids, cap_emb, owner, ks),
        "image_to_mixture": chunked_recall(image_emb, ids, mixture, ids, ks),
    }
    out["chance"] = {f"R@{k}": round(100.0 * min(k, m) / m, 2) for k in ks}
    out["n_images"], out["n_text_queries"] = m, int(len(query))
    return out


def entity_hit_rates(ids: np.ndarray, mem_entity: np.ndarray, query_entity: np.ndarray,
                     ks: tuple[int, ...]) -> dict[str, float]:
    """Same-entity hit rates of ranked neighbours: `rank r` = % of queries whose r-th neighbour
    (r = 1, 2) shows the query's entity (what RA-CM3 reads with K = r documents); `R@k` = % with
    one in the top k. ids (Q, >= max(ks, 2)) memory rows in rank order (-1 = none), mem_entity
    (M,) and query_entity (Q,) entity labels ("" or None never matches)."""
    known = np.asarray([e not in ("", None) for e in mem_entity], bool)
    ent = np.asarray(mem_entity, dtype=object)
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    hits = valid & known[safe] & (ent[safe] == np.asarray(query_entity, dtype=object)[:, None])
    n = max(len(ids), 1)
    out = {f"rank {r}": round(100.0 * float(hits[:, r - 1].sum()) / n, 2)
           for r in (1, 2) if hits.shape[1] >= r}
    out |= {f"R@{k}": round(100.0 * float(hits[:, :k].any(axis=1).sum()) / n, 2) for k in ks}
    return out
