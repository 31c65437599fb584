"""The retrieval memory beside the index as memory-mapped columns: keys, sha256, captions, doc
embeddings and per-part row ids, written once by the index stage and shared by every process on
a machine (the page cache holds them once); strings are decoded only for the rows asked for.

Files (artifacts of index/main, `N` documents, `D` dims):
  keys.bin + keys-off.npy          utf-8 keys back to back, (N+1,) int64 offsets
  captions.bin + captions-off.npy  the same for captions ('' when unknown)
  sha256.npy                       (N, 32) uint8 raw digests (all zero = unknown)
  key-hash.npy + key-order.npy     (N,) uint64 sorted hash of each key and its row id: key -> row
  emb.npy                          (N, D) doc embeddings in the embed shards' dtype
  part-PPP.rows.bin                int64 row ids of sub-index PPP (sharded indexes only)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from storage.fs import DataRoot

STORE_FILES = ("keys.bin", "keys-off.npy", "captions.bin", "captions-off.npy", "sha256.npy",
               "key-hash.npy", "key-order.npy", "emb.npy")
NO_DIGEST = bytes(32)


def rows_file(part: int) -> str:
    return f"part-{part:03d}.rows.bin"


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """(N,) uint64: the first 8 bytes of sha1(key), big-endian (what part_of takes mod parts)."""
    return np.fromiter((int.from_bytes(hashlib.sha1(k.encode()).digest()[:8], "big") for k in keys),
                       np.uint64, count=len(keys))


def digests(hexes: Sequence[str | None]) -> np.ndarray:
    """(N, 32) uint8 from hex sha256 strings; '' or None becomes all zeros."""
    try:
        raw = b"".join(bytes.fromhex(h) if h else NO_DIGEST for h in hexes)
    except ValueError:
        raw = b""
    if len(raw) != 32 * len(hexes):
        bad = next(h for h in hexes if h and (len(h) != 64 or not _is_hex(h)))
        raise ValueError(f"sha256 column: {bad!r} is not a 64-digit hex digest (what download "
                         f"writes): re-run `racm3 run download` and `racm3 run embed`")
    return np.frombuffer(raw, np.uint8).reshape(len(hexes), 32)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- reading


def _mapped_bytes(path: str) -> np.ndarray:
    """A file as a read-only uint8 map (np.memmap refuses an empty file)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, np.uint8, mode="r")


class MappedStrings:
    """N strings over a mapped byte file and an offsets array; indexing decodes only those rows."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def one(self, i: int) -> str:
        return bytes(self.data[self.offsets[i]:self.offsets[i + 1]]).decode()

    def __getitem__(self, ids: Any) -> Any:
        """str for an int, else an object array of ids' shape (like indexing an object array)."""
        if np.isscalar(ids):
            return self.one(int(ids))  # type: ignore[arg-type]  # a scalar index
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        starts, ends = self.offsets[flat], self.offsets[flat + 1]
        out = np.empty(len(flat), dtype=object)
        out[:] = [bytes(self.data[s:e]).decode() for s, e in zip(starts, ends, strict=True)]
        return out.reshape(ids.shape)

    def __iter__(self) -> Iterator[str]:
        for s in range(0, len(self), 65536):  # a chunk at a time: never all N as objects
            yield from self[np.arange(s, min(s + 65536, len(self)))]


class MappedDigests:
    """(N, 32) raw sha256 digests; indexing gives hex strings ('' = unknown) for those rows."""

    def __init__(self, raw: np.ndarray):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, ids: Any) -> Any:
        if np.isscalar(ids):
            b = bytes(self.raw[int(ids)])  # type: ignore[arg-type]  # a scalar index
            return "" if b == NO_DIGEST else b.hex()
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.raw[ids.ravel()]
        out = np.empty(len(rows), dtype=object)
        out[:] = ["" if not r.any() else r.tobytes().hex() for r in rows]
        return out.reshape(ids.shape)


@dataclass
class MemoryStore:
    """The memory's columns, memory-mapped; every accessor reads only the rows it is given."""

    key_col: MappedStrings
    caption_col: MappedStrings
    sha256_col: MappedDigests
    key_hash: np.ndarray  # (N,) uint64 sorted
    key_order: np.ndarray  # (N,) int64: row of each sorted hash
    emb: np.ndarray  # (N, D) float16 or float32
    part_rows: list[np.ndarray]  # rows[p][local id] = row id; [] for a single index

    def __len__(self) -> int:
        return len(self.key_col)

    def keys(self, ids: np.ndarray) -> np.ndarray:
        return self.key_col[ids]

    def captions(self, ids: np.ndarray) -> np.ndarray:
        return self.caption_col[ids]

    def sha256(self, ids: np.ndarray) -> np.ndarray:
        return self.sha256_col[ids]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) float32 doc embeddings, read by id (sorted reads, then put in order)."""
        ids = np.asarray(ids, dtype=np.int64)
        uniq, inv = np.unique(ids, return_inverse=True)
        return np.asarray(self.emb[uniq], dtype=np.float32)[inv.reshape(-1)]

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys),) row id of each key, -1 where the memory has none."""
        h = key_hashes(keys)
        out = np.full(len(keys), -1, np.int64)
        lo = np.searchsorted(self.key_hash, h, "left")
        hi = np.searchsorted(self.key_hash, h, "right")
        for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
            for j in range(a, b):  # more than one only on a 64-bit hash collision
                if self.key_col.one(int(self.key_order[j])) == keys[i]:
                    out[i] = self.key_order[j]
                    break
        return out

    def caption_map(self) -> CaptionLookup:
        """A read-only key -> caption mapping (`.get(key, default)`, `[key]`, `in`)."""
        return CaptionLookup(self)


class CaptionLookup:
    """key -> caption through the mapped store: what a dict of every caption was, without one."""

    def __init__(self, store: MemoryStore):
        self.store = store

    def get(self, key: str, default: Any = None) -> Any:
        row = int(self.store.rows_of([key])[0])
        return default if row < 0 else self.store.caption_col.one(row)

    def __getitem__(self, key: str) -> str:
        row = int(self.store.rows_of([key])[0])
        if row < 0:
            raise KeyError(key)
        return self.store.caption_col.one(row)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and int(self.store.rows_of([key])[0]) >= 0

    def __iter__(self) -> Iterator[str]:
        """The memory's keys, a chunk at a time (a Mapping's iteration; never all as objects)."""
        return iter(self.store.key_col)

    def __len__(self) -> int:
        return len(self.store)


def open_store(root: DataRoot, artifact: Any, parts: int) -> MemoryStore:
    """The store of index/main; `artifact(suffix)` -> path. Remote files are copied once per
    machine by DataRoot.local_copy, then mapped like local ones."""
    def local(suffix: str) -> str:
        return root.local_copy(artifact(suffix))

    def npy(suffix: str) -> np.ndarray:
        return np.load(local(suffix), mmap_mode="r")

    rows = [np.memmap(local(rows_file(p)), np.int64, mode="r")
            if os.path.getsize(local(rows_file(p))) else np.zeros(0, np.int64)
            for p in range(parts)] if parts > 1 else []
    return MemoryStore(MappedStrings(_mapped_bytes(local("keys.bin")), npy("keys-off.npy")),
                       MappedStrings(_mapped_bytes(local("captions.bin")), npy("captions-off.npy")),
                       MappedDigests(npy("sha256.npy")), npy("key-hash.npy"), npy("key-order.npy"),
                       npy("emb.npy"), rows)


# ---------------------------------------------------------------------------- writing


def _npy_header(f: IO[bytes], shape: tuple[int, ...], dtype: Any) -> None:
    """A .npy header for an array whose rows are then written straight after it."""
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": shape})


def _write_chunks(f: IO[bytes], arr: np.ndarray, rows: int = 1 << 16) -> None:
    """A mapped array's bytes, `rows` rows at a time (never the whole array in memory)."""
    for s in range(0, len(arr), rows):
        f.write(np.ascontiguousarray(arr[s:s + rows]).tobytes())


class MemoryWriter:
    """Streams the store's files chunk by chunk (one embedding shard in memory at a time).

    `open_file(suffix)` -> a writable binary file (the stage's temp output path); n, d, dtype
    are known up front (from the shards' footers and the encoder) so .npy headers come first.
    """

    def __init__(self, open_file: Any, n: int, d: int, dtype: Any, parts: int):
        self.n, self.parts, self.row = n, parts, 0
        self.f = {s: open_file(s) for s in STORE_FILES if s not in ("key-hash.npy", "key-order.npy")}
        self.rows = [open_file(rows_file(p)) for p in range(parts)] if parts > 1 else []
        self.open_file = open_file
        self.ends = {"keys": 0, "captions": 0}
        self.hashes = np.empty(n, np.uint64)  # 8 bytes a row, in the building process only
        for name in ("keys-off.npy", "captions-off.npy"):
            _npy_header(self.f[name], (n + 1,), np.int64)
            self.f[name].write(np.zeros(1, np.int64).tobytes())
        _npy_header(self.f["sha256.npy"], (n, 32), np.uint8)
        _npy_header(self.f["emb.npy"], (n, d), dtype)
        self.dtype = np.dtype(dtype)

    def _strings(self, name: str, values: Sequence[str]) -> None:
        enc = [v.encode() for v in values]
        ends = self.ends[name] + np.cumsum([len(b) for b in enc], dtype=np.int64)
        self.f[f"{name}.bin"].write(b"".join(enc))
        self.f[f"{name}-off.npy"].write(ends.tobytes())
        if len(ends):
            self.ends[name] = int(ends[-1])

    def add(self, keys: Sequence[str], sha: Sequence[str | None], captions: Sequence[str],
            emb: np.ndarray, owner: np.ndarray) -> None:
        """One chunk of rows in row order; owner (len,) = sub-index of each row."""
        self._strings("keys", keys)
        self._strings("captions", captions)
        self.f["sha256.npy"].write(digests(sha).tobytes())
        self.f["emb.npy"].write(np.ascontiguousarray(emb, dtype=self.dtype).tobytes())
        ids = np.arange(self.row, self.row + len(keys), dtype=np.int64)
        for p, f in enumerate(self.rows):
            f.write(ids[owner == p].tobytes())
        self.hashes[self.row:self.row + len(keys)] = key_hashes(keys)
        self.row += len(keys)

    def copy(self, store: MemoryStore) -> None:
        """Every row of a built store first, as stored: adding shards to an index keeps the old
        rows' ids, so the extended store is what a rebuild over the same shards writes."""
        if self.row:
            raise RuntimeError("memory store: copy the old rows before adding new ones")
        if store.emb.dtype != self.dtype:
            raise ValueError(f"memory store: the built store holds {store.emb.dtype} embeddings, "
                             f"the new shards {self.dtype}: rebuild the index (index.rebuild)")
        for name, col in (("keys", store.key_col), ("captions", store.caption_col)):
            _write_chunks(self.f[f"{name}.bin"], col.data)
            _write_chunks(self.f[f"{name}-off.npy"], col.offsets[1:])
            self.ends[name] = int(col.offsets[-1])
        _write_chunks(self.f["sha256.npy"], store.sha256_col.raw)
        _write_chunks(self.f["emb.npy"], store.emb)
        for f, rows in zip(self.rows, store.part_rows, strict=True):
            _write_chunks(f, rows)
        self.row = len(store)
        self.hashes[np.asarray(store.key_order)] = store.key_hash  # back in row order

    def close(self) -> None:
        if self.row != self.n:
            raise RuntimeError(f"memory store: {self.row} rows written, {self.n} expected")
        order = np.argsort(self.hashes, kind="stable")
        for name, arr in (("key-hash.npy", self.hashes[order]), ("key-order.npy", order)):
            with self.open_file(name) as f:
                np.save(f, np.ascontiguousarray(arr))
        for f in [*self.f.values(), *self.rows]:
            f.close()
