"""The built FAISS index as a library: load it and its memory store memory-mapped once per
process, search all of its parts as one index, read candidates' vectors and keys by id."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipelines.retrieval.memory_store import STORE_FILES, MemoryStore, open_store
from storage.fs import DataRoot, verified_copy
from storage.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)

CACHE_ENV = "RACM3_INDEX_CACHE"  # where remote roots' index files are copied, once per machine


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_search_params(index: Any, nprobe: int, ef_search: int) -> dict[str, int]:
    """Apply query-time parameters the index understands; returns what was set."""
    if isinstance(index, ShardedIndex):
        out: dict[str, int] = {}
        for part in index.parts:
            out = set_search_params(part, nprobe, ef_search)
        return out
    out = {}
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
        out["nprobe"] = nprobe
    except RuntimeError:
        pass
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = ef_search
        out["ef_search"] = ef_search
    return out


def vectors(table: pa.Table, column: str = "doc_emb") -> np.ndarray:
    """(N, D) float32 from a fixed-size-list column (float32 or float16)."""
    col = table[column].combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, col.type.list_size), dtype=np.float32)


# ---------------------------------------------------------------------------- parts


def part_suffixes(parts: int) -> list[str]:
    """Artifact suffixes of the index files: `main.faiss`, or `main.part-000.faiss`, ..."""
    return ["faiss"] if parts == 1 else [f"part-{p:03d}.faiss" for p in range(parts)]


def part_of(keys: Sequence[str], parts: int) -> np.ndarray:
    """Sub-index of each key: sha1(key) mod parts, the same on every machine and Python version."""
    if parts == 1:
        return np.zeros(len(keys), np.int32)
    return np.fromiter((int.from_bytes(hashlib.sha1(k.encode()).digest()[:8], "big") % parts
                        for k in keys), np.int32, count=len(keys))


TIE_SLACK = 8  # extra candidates fetched to see whether equal scores continue past the cut


def by_score_then_id(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each row: higher score first, equal scores by ascending row id, none last."""
    key = np.where(ids >= 0, -scores.astype(np.float64), np.inf)
    pick = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), key), axis=-1)[:, :k]
    return (np.take_along_axis(scores, pick, axis=1).astype(np.float32),
            np.take_along_axis(ids, pick, axis=1))


def search_ties_by_id(index: Any, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search(q, k) with equal scores ordered by row id, also at the cut: FAISS's heap
    keeps an arbitrary one of several candidates tied for the k-th place, and that choice would
    differ between one index and its parts. Rows whose tie runs past what was fetched are
    searched again, wider."""
    n = int(index.ntotal)
    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    todo, width = np.arange(len(q)), min(k + TIE_SLACK, n) if k < n else k
    while len(todo):
        d, i = index.search(q[todo], width)
        open_ = ((d[:, k - 1] == d[:, -1]) & (i[:, -1] >= 0)) if width < n else np.zeros(
            len(todo), bool)
        done = todo[~open_]
        scores[done], ids[done] = by_score_then_id(d[~open_], i[~open_], k)
        todo, width = todo[open_], min(2 * width, n)
    return scores, ids


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of several indexes' results (each ordered by score, then id, as
    search_ties_by_id returns them), exactly as one index over all their rows returns it.
    `ids` are row ids of that one index (-1 = none)."""
    return by_score_then_id(np.concatenate(scores, axis=1), np.concatenate(ids, axis=1), k)


class ShardedIndex:
    """Sub-indexes searched as one. Row ids are positions in the one-index order (the key map's)."""

    def __init__(self, parts: list[Any], rows: list[np.ndarray]):
        self.parts, self.rows = parts, rows  # rows[p][local id] = row id (memory-mapped on load)
        self.ntotal = int(sum(p.ntotal for p in parts))
        self.d = int(parts[0].d)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for part, rows in zip(self.parts, self.rows, strict=True):
            d, i = search_ties_by_id(part, q, k)
            scores.append(d)
            ids.append(np.where(i >= 0, rows[np.maximum(i, 0)], -1))
        return merge_topk(scores, ids, k)

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors by row id. Builds an (N,) part/local map on first use: callers that
        hold a memory store read vectors from it instead (LoadedIndex.reconstruct)."""
        if not hasattr(self, "part_of"):
            self.part_of = np.empty(self.ntotal, np.int32)
            self.local_of = np.empty(self.ntotal, np.int64)
            for p, r in enumerate(self.rows):
                self.part_of[r] = p
                self.local_of[r] = np.arange(len(r))
        out = np.empty((len(ids), self.d), np.float32)
        for p, part in enumerate(self.parts):
            m = self.part_of[ids] == p
            if m.any():
                out[m] = part.reconstruct_batch(np.ascontiguousarray(self.local_of[ids[m]]))
        return out


# ---------------------------------------------------------------------------- loading


@dataclass
class LoadedIndex:
    """A built index with its memory store and the identity of the encoder that fills it."""

    index: Any  # searched: a faiss.Index (GPU copy when available) or a ShardedIndex
    cpu: Any  # the CPU index (reconstructs stored vectors when there is no store)
    keys: Any  # row ids -> document keys: store.key_col (mapped) or an (N,) object array
    sha256: Any  # row ids -> image sha256 hex ('' when unknown), like keys
    encoder: dict[str, Any]
    digest: str  # the index shard's output digest (lineage of what searched it)
    store: MemoryStore | None = None  # the mapped memory; None for an index built in memory

    @property
    def dim(self) -> int:
        return int(self.cpu.d)

    def check_encoder(self, fingerprint: str, dim: int) -> None:
        """Refuse queries from another encoder: their scores would be meaningless."""
        if dim != self.dim or fingerprint != self.encoder["fingerprint"]:
            raise ValueError(
                f"the index was built from encoder {self.encoder['fingerprint']} (dim {self.dim}) "
                f"but the queries come from {fingerprint} (dim {dim}): re-run `racm3 run embed` "
                f"and `racm3 run index` with one encoder")

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, row ids (Q, k) int64, -1 past the end); equal scores by row id."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        if isinstance(self.index, ShardedIndex):
            return self.index.search(q, k)
        return search_ties_by_id(self.index, q, k)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) document embeddings: read from the store's mapped copy (exact for every
        index type, no per-process IVF direct map); without a store, what the index stores."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.store is not None:
            return self.store.vectors(ids)
        return self.cpu.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def read_index_file(path: str, factory: str = "") -> Any:
    """A local index file, memory-mapped where FAISS can (Flat/SQ/PQ codes, IVF lists), so every
    process on the machine shares its pages; read into memory otherwise (e.g. HNSW graphs)."""
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if "IVF" in factory
             else faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:
        log.info("index: %s cannot be memory-mapped (%s); reading it", path, str(e)[-80:])
        return faiss.read_index(path)


def local_file(root: DataRoot, path: str, digest: str) -> str:
    """A local path for an index file: itself on a local root, else a copy in this user's cache
    (0700; `$RACM3_INDEX_CACHE` if set), checked against the manifest's digest on fill and on
    every reuse: faiss.read_index is not memory-safe, so it never reads a planted or torn copy."""
    if root.is_local:
        return path
    custom = os.environ.get(CACHE_ENV)
    if not custom:
        return root.cached(path, digest or None, "index")
    os.makedirs(custom, mode=0o700, exist_ok=True)
    name = digest.removeprefix("sha256:")[:32] + "-" + posixpath.basename(path)
    return verified_copy(root.fs, path, os.path.join(custom, name), digest or None)


def memory(root: DataRoot, m: Manifest, parts: int) -> MemoryStore:
    """The index's mapped memory store; refuses an index built before there was one."""
    missing = [f for f in STORE_FILES if root.rel(root.artifact("index", "main", f)) not in m.outputs]
    if missing:
        raise FileNotFoundError(
            f"the index was built by an older racm3 without the mapped memory store (no "
            f"index/main.{missing[0]}): re-run `racm3 run index`")
    return open_store(root, lambda s: root.artifact("index", "main", s), parts)


def _load(root: DataRoot, m: Manifest, use_gpu: bool) -> LoadedIndex:
    parts = int(m.metrics.get("parts", 1))
    factory = str(m.metrics.get("factory", ""))
    store = memory(root, m, parts)
    cpus = []
    for suffix in part_suffixes(parts):
        path = root.artifact("index", "main", suffix)
        cpus.append(read_index_file(local_file(root, path, m.outputs.get(root.rel(path), "")),
                                    factory))
    cpu: Any = cpus[0] if parts == 1 else ShardedIndex(cpus, store.part_rows)
    sp = m.metrics.get("search_params", {})
    set_search_params(cpu, sp.get("nprobe", 1), sp.get("ef_search", 16))
    searched = cpu
    if use_gpu and parts == 1 and gpu_available():
        try:
            searched = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
        except RuntimeError:
            searched = cpu
    return LoadedIndex(searched, cpu, store.key_col, store.sha256_col, m.metrics["encoder"],
                       m.output_digest, store)


_LOADED: dict[tuple[str, bool], LoadedIndex] = {}  # one index per root in this process
_LOCK = threading.Lock()


def load_index(root: DataRoot, use_gpu: bool = True) -> LoadedIndex:
    """The index stage's output and its mapped memory store, ready to search.

    Loaded once per process and data root (threads of a Beam worker share it) and reloaded
    only when the index's digest changes.
    """
    m = read_manifest(root, "index", "main")
    if m is None:
        raise FileNotFoundError("no FAISS index: run `racm3 run index` first")
    gpu = use_gpu and gpu_available()  # on a CPU machine every caller shares one copy
    with _LOCK:
        hit = _LOADED.get((root.uri, gpu))
        if hit is None or hit.digest != m.output_digest:
            hit = _LOADED[(root.uri, gpu)] = _load(root, m, gpu)
        return hit
