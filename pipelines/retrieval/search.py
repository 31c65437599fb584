"""Neighbour search with the paper's redundancy rules (§3.2), shared by retrieve and inference.

The rule is the retrieve section's search fields (`SearchRule`; `RetrieveConfig` has them too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from model.clip_encoder import DocEncoder
from pipelines.retrieval.encoders import index_encoder
from pipelines.retrieval.faiss_index import LoadedIndex, load_index
from storage.fs import DataRoot

SKIPS = ("self", "duplicate", "query_sim", "redundant")


class SearchSettings(Protocol):
    """The fields a search reads (`RetrieveConfig` and `SearchRule` both have them)."""

    @property
    def top_n(self) -> int: ...
    @property
    def k_max(self) -> int: ...
    @property
    def query_sim_threshold(self) -> float: ...
    @property
    def redundancy_threshold(self) -> float: ...


@dataclass(frozen=True)
class SearchRule:
    """The redundancy rule of one search: candidates fetched, neighbours kept, skip thresholds
    (the meaning and defaults of each field are `RetrieveConfig`'s)."""

    top_n: int
    k_max: int
    query_sim_threshold: float
    redundancy_threshold: float

    @classmethod
    def of(cls, cfg: SearchSettings) -> SearchRule:
        return cls(cfg.top_n, cfg.k_max, cfg.query_sim_threshold, cfg.redundancy_threshold)

    def keeping(self, k: int) -> SearchRule:
        """The same rule keeping k neighbours (fetching at least k + 1 candidates)."""
        return replace(self, k_max=k, top_n=max(self.top_n, k + 1))


@dataclass
class Selection:
    """Result of the redundancy walk for Q queries."""

    kept: np.ndarray  # (Q, K) candidate positions kept, best first, -1 = none
    n_candidates: np.ndarray  # (Q,) valid candidates returned by the index
    skipped: dict[str, np.ndarray] = field(default_factory=dict)  # rule -> (Q,) counts



def select_neighbors(scores: np.ndarray, cand: np.ndarray, valid: np.ndarray, is_self: np.ndarray,
                     is_dup: np.ndarray, k_max: int, query_thr: float,
                     redundancy_thr: float) -> Selection:
    """Walk each candidate list from the top, keeping up to k_max non-redundant candidates.

    scores (Q, N) query-candidate scores, best first; cand (Q, N, D) candidate vectors; valid,
    is_self, is_dup (Q, N) bool. Rules in order: self, exact duplicate, too similar to the query,
    too similar to an already kept one. Vectorised over queries, one step per rank.
    """
    q, n = scores.shape
    kept = np.full((q, k_max), -1, np.int64)
    kept_vecs = np.zeros((q, k_max, cand.shape[2]), np.float32)  # (Q, K, D)
    n_kept = np.zeros(q, np.int64)
    skipped = {r: np.zeros(q, np.int32) for r in SKIPS}
    rows = np.arange(q)
    for j in range(n):
        active = valid[:, j] & (n_kept < k_max)
        if not active.any():
            break
        s_self = active & is_self[:, j]
        s_dup = active & ~s_self & is_dup[:, j]
        rest = active & ~s_self & ~s_dup
        s_q = rest & (scores[:, j] > query_thr)
        rest &= ~s_q
        sims = np.einsum("qkd,qd->qk", kept_vecs, cand[:, j])  # (Q, K)
        sims[np.arange(k_max)[None, :] >= n_kept[:, None]] = -np.inf
        s_red = rest & (sims.max(axis=1) > redundancy_thr)
        take = rest & ~s_red
        kept[rows[take], n_kept[take]] = j
        kept_vecs[rows[take], n_kept[take]] = cand[take, j]
        n_kept += take
        for rule, hit in zip(SKIPS, (s_self, s_dup, s_q, s_red), strict=True):
            skipped[rule] += hit
    return Selection(kept, valid.sum(axis=1).astype(np.int32), skipped)



def search_and_select(index: LoadedIndex, vecs: np.ndarray, keys: np.ndarray, sha: np.ndarray,
                      cfg: SearchSettings) -> tuple[Selection, np.ndarray, np.ndarray]:
    """(selection, scores (Q, N), ids (Q, N)) for query vectors of documents keys/sha (Q,)."""
    n = min(cfg.top_n, index.cpu.ntotal)
    scores, ids = index.search(vecs, n)
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    uniq, inv = np.unique(safe, return_inverse=True)
    cand = index.reconstruct(uniq)[inv.reshape(safe.shape)]  # (Q, N, D)
    is_self = valid & (index.keys[safe] == keys[:, None])
    is_dup = valid & (index.sha256[safe] == sha[:, None]) & (sha[:, None] != "")
    sel = select_neighbors(scores, cand, valid, is_self, is_dup, cfg.k_max,
                           cfg.query_sim_threshold, cfg.redundancy_threshold)
    return sel, scores, ids



class Retriever:
    """Retrieval at inference: encode a caption or an image, search, avoid redundancy.

    Uses the encoder the index was built with, so queries and memory always match.
    """

    def __init__(self, root: DataRoot, rule: SearchRule, device: str = "cpu", use_gpu: bool = False):
        self.rule = rule
        self.index = load_index(root, use_gpu)
        enc = index_encoder(root)
        self.encoder = DocEncoder.load(enc["model"], root.local_copy(root.resolve(enc["checkpoint"])),
                                       enc["fingerprint"], device)
        self.index.check_encoder(self.encoder.info.fingerprint, self.encoder.info.dim)

    def _select(self, vecs: np.ndarray, keys: list[str] | None,
                k: int | None) -> list[tuple[list[str], list[float]]]:
        rule = self.rule if k is None else self.rule.keeping(k)
        q_keys = np.asarray(keys if keys is not None else [""] * len(vecs), dtype=object)
        sel, scores, ids = search_and_select(self.index, vecs, q_keys,
                                             np.full(len(vecs), "", dtype=object), rule)
        out = []
        for r in range(len(vecs)):
            pos = sel.kept[r][sel.kept[r] >= 0]
            out.append((self.index.keys[ids[r, pos]].tolist(), scores[r, pos].tolist()))
        return out

    def by_text(self, captions: list[str], exclude_keys: list[str] | None = None,
                k: int | None = None) -> list[tuple[list[str], list[float]]]:
        """[(neighbour keys, scores)] per caption; exclude_keys[i] is never returned for query i."""
        return self._select(self.encoder.encode_text(captions), exclude_keys, k)

    def by_image(self, images: list[Any], exclude_keys: list[str] | None = None,
                 k: int | None = None) -> list[tuple[list[str], list[float]]]:
        """[(neighbour keys, scores)] per PIL image."""
        return self._select(self.encoder.encode_image(images), exclude_keys, k)
