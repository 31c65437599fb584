"""Building a FAISS index at scale: size estimates, a factory chosen by a memory budget, a seeded
training sample, vectors added one embedding shard at a time, the file written by FAISS."""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipelines.retrieval.faiss_index import (
    ShardedIndex,
    merge_topk,
    part_of,
    search_ties_by_id,
    vectors,
)
from storage.fs import DataRoot
from storage.shards import read_table

log = logging.getLogger(__name__)

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
PQ_SIZES = (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # bytes per vector, best first
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training vectors per centroid


def parse_bytes(text: str) -> int:
    """'16GB', '512 MiB', '2e9' -> bytes; ValueError for anything else."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"{text!r} is not a size like '16GB' or '512MiB'")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


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


def ivf_cells(n: int, train: int) -> int:
    """IVF cells for n vectors: a power of two near 4 sqrt(n), with >= 39 training vectors each."""
    target = 4 * math.sqrt(max(n, 1))
    cells = 1 << max(0, round(math.log2(target)))
    return max(1, min(cells, min(n, train) // MIN_POINTS_PER_CENTROID))


def choose_factory(n: int, d: int, budget: int, train: int) -> str:
    """The most exact index that fits `budget` bytes (like autofaiss): Flat, then IVF with
    8-bit scalar codes, then IVF-PQ with fewer and fewer bytes per vector."""
    cells = ivf_cells(n, train)
    candidates = ["Flat", f"IVF{cells},SQ8"]
    candidates += [f"IVF{cells},PQ{m}" for m in PQ_SIZES if m < d and d % m == 0]
    for factory in candidates:
        if estimate_bytes(factory, n, d) <= budget:
            return factory
    smallest = min(estimate_bytes(f, n, d) for f in candidates)
    raise ValueError(f"config field `index.max_memory`: no index of {n} x {d} vectors fits "
                     f"{budget} bytes (the smallest, {candidates[-1]}, needs ~{smallest}): "
                     f"raise it or set index.shards to split the memory")


def row_counts(root: DataRoot, paths: Sequence[str]) -> list[int]:
    """Rows per embedding shard, from the Parquet footers (no data read)."""
    out = []
    for p in paths:
        with root.fs.open(p, "rb") as f:
            out.append(pq.ParquetFile(f).metadata.num_rows)
    return out


def shard_vectors(root: DataRoot, paths: Sequence[str], part: int = 0,
                  parts: int = 1) -> Iterator[np.ndarray]:
    """doc_emb of each shard in turn (only the rows of sub-index `part`): one shard in memory."""
    for p in paths:
        t = read_table(root, p, ["key", "doc_emb"] if parts > 1 else ["doc_emb"])
        if parts > 1:
            mine = part_of(t["key"].to_pylist(), parts) == part
            t = t.filter(mine)
        yield vectors(t)


def rows_at(root: DataRoot, paths: Sequence[str], counts: Sequence[int],
            rows: np.ndarray) -> np.ndarray:
    """Vectors at global row numbers `rows` (in that order), reading one shard at a time and
    only the shards that hold some of them."""
    out: np.ndarray | None = None
    start = 0
    for path, n in zip(paths, counts, strict=True):
        mine = (rows >= start) & (rows < start + n)
        if mine.any():
            xb = next(shard_vectors(root, [path]))
            if out is None:
                out = np.zeros((len(rows), xb.shape[1]), np.float32)
            out[mine] = xb[rows[mine] - start]
        start += n
    assert out is not None, "no rows to read"
    return out


def training_sample(root: DataRoot, paths: Sequence[str], counts: Sequence[int], size: int,
                    seed: int) -> np.ndarray:
    """A seeded sample of at most `size` vectors, in row order (the draw a one-array build made)."""
    n = sum(counts)
    rng = np.random.default_rng(seed)
    return rows_at(root, paths, counts, np.sort(rng.choice(n, min(n, size), replace=False)))


def reserve(index: Any, n: int) -> None:
    """Allocate a flat index's code array once for n vectors, so adding shard by shard never
    reallocates (a growing array briefly holds two copies: 2-3x the index at the peak)."""
    flat = faiss.downcast_index(index)
    if isinstance(flat, faiss.IndexFlatCodes) and n:
        flat.codes.resize((flat.ntotal + n) * flat.code_size)
        flat.codes.resize(flat.ntotal * flat.code_size)  # size back, capacity kept


def add_shards(index: Any, root: DataRoot, paths: Sequence[str], n: int, part: int = 0,
               parts: int = 1) -> Any:
    """Add sub-index `part`'s n vectors shard by shard; returns the index."""
    reserve(index, n)
    for xb in shard_vectors(root, paths, part, parts):
        if len(xb):
            index.add(xb)
    return index


def write_index(root: DataRoot, path: str, index: Any) -> int:
    """Write with FAISS's file writer to `path` (a temp name the stage commits); for object
    stores through a local temp file that is then uploaded. Returns the file's bytes."""
    if root.is_local:
        faiss.write_index(index, path)
        return os.path.getsize(path)
    fd, local = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, local)
        root.fs.put_file(local, path)
        return os.path.getsize(local)
    finally:
        os.remove(local)


def exact_topk(root: DataRoot, paths: Sequence[str], q: np.ndarray, k: int) -> np.ndarray:
    """Row ids of the exact inner-product top k over every shard, streamed: each shard's top k
    merged into the running one (equal scores by row id, as the index search orders them)."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    start = 0
    for xb in shard_vectors(root, paths):
        flat = faiss.IndexFlatIP(xb.shape[1])
        flat.add(xb)
        d, i = search_ties_by_id(flat, q, k)  # past a small shard's end: id -1
        best_s, best_i = merge_topk([best_s, d], [best_i, np.where(i >= 0, i + start, -1)], k)
        start += len(xb)
    return best_i


def recall_vs_exact(index: Any, root: DataRoot, paths: Sequence[str], counts: Sequence[int],
                    sample: int, seed: int, k: int) -> float:
    """recall@k of `index` against exact inner-product search, queries drawn from the memory."""
    n = sum(counts)
    rng = np.random.default_rng(seed)
    q = rows_at(root, paths, counts, rng.choice(n, min(sample, n), replace=False))
    k = min(k, n)
    truth = exact_topk(root, paths, q, k)
    _, got = index.search(q, k) if isinstance(index, ShardedIndex) else search_ties_by_id(index, q, k)
    hits = [len(set(t) & set(g)) for t, g in zip(truth, got, strict=True)]
    return round(float(np.sum(hits)) / truth.size, 4)
