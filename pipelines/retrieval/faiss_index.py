"""The built FAISS index as a library: load it, search it, reconstruct stored vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import DataRoot
from storage.manifest import read_manifest


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0



def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> dict[str, int]:
    """Apply query-time parameters the index understands; returns what was set."""
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



@dataclass
class LoadedIndex:
    """A built index with its key map and the identity of the encoder that fills it."""

    index: faiss.Index  # searched (GPU copy when available)
    cpu: faiss.Index  # reconstructs stored vectors
    keys: np.ndarray  # (N,) str, row id -> document key
    sha256: np.ndarray  # (N,) str, row id -> image sha256 ('' when unknown)
    encoder: dict[str, Any]
    digest: str  # the index shard's output digest (lineage of what searched it)

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
        """(scores (Q, k) float32, row ids (Q, k) int64, -1 past the end)."""
        return self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) stored vectors (exact for Flat/HNSW, decoded codes for PQ)."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.cpu.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))



def load_index(root: DataRoot, use_gpu: bool = True) -> LoadedIndex:
    """The index stage's output, ready to search and reconstruct (IVF gets a direct map)."""
    m = read_manifest(root, "index", "main")
    if m is None:
        raise FileNotFoundError("no FAISS index: run `racm3 run index` first")
    with root.fs.open(root.artifact("index", "main", "faiss"), "rb") as f:
        cpu = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    try:
        faiss.extract_index_ivf(cpu).make_direct_map()
    except RuntimeError:
        pass  # not an IVF index: reconstruct works as is
    sp = m.metrics.get("search_params", {})
    set_search_params(cpu, sp.get("nprobe", 1), sp.get("ef_search", 16))
    searched = cpu
    if use_gpu and gpu_available():
        try:
            searched = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
        except RuntimeError:
            searched = cpu
    with root.fs.open(root.artifact("index", "main", "keys.parquet"), "rb") as f:
        km = pq.read_table(f)
    keys = np.asarray(km["key"].to_pylist(), dtype=object)
    sha = np.asarray([s or "" for s in km["sha256"].to_pylist()], dtype=object)
    return LoadedIndex(searched, cpu, keys, sha, m.metrics["encoder"], m.output_digest)
