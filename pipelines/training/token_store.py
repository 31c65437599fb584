"""Memory-mapped token store written by stage `pack`: flat token arrays, integer document ids.

Layout (files of one packed part each, so appending a token shard packs only that shard):

    pack/t-<tokenize shard>.tokens.npy   int32, every document's CM3 ids back to back
                           .offsets.npy  int64 (n + 1), document i = tokens[off[i]:off[i+1]]
                           .keys.npy     fixed-width bytes, key of local id i (id -> key)
                           .holdout.npy  uint64, sha1(key)[:8] (the stable held-out split)
                           .keys.parquet key, id: the key <-> id map for people and tools
    pack/n-<retrieve shard>.doc.npy      int64 global id of each row, sorted; .query.npy int8
                           (index in QUERIES); .variant.npy int16; .offsets.npy int64 and
                           .nbr.npy int64: the row's neighbours best first (-1 = no tokens)

A document's global id is its row in its tokenize shard plus the sizes of the token parts before
it (parts ordered by shard id); the index of parts is the set of `pack` manifests, so there is no
file that every shard rewrites. Neighbour ids depend on every token part, so a neighbour part's
inputs are its retrieve shard plus every tokenize shard: adding a token shard re-resolves the
(small) neighbour parts, never the token parts already packed.

`StoreCorpus` reads it all memory-mapped: data-loader workers and ranks share the page cache and
a training process holds no per-document Python object (RSS independent of the corpus size).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import mmap
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.document import Vocab
from pipelines.training.lineage import (
    NEIGHBOUR_LINEAGE,
    QUERIES,
    TOKEN_LINEAGE,
    LineageError,
    same_lineage,
)
from storage.fs import DataRoot, user_cache_dir, verified_copy
from storage.manifest import Manifest, list_manifests

log = logging.getLogger(__name__)

STAGE = "pack"
TOKEN_FILES = ("tokens.npy", "offsets.npy", "keys.npy", "holdout.npy", "keys.parquet")
NEIGHBOUR_FILES = ("doc.npy", "query.npy", "variant.npy", "offsets.npy", "nbr.npy")
RELEASE_EVERY = 4096  # reads between madvise(DONTNEED) of the mappings (bounds resident pages)


def token_part_id(shard_id: str) -> str:
    return f"t-{shard_id}"


def neighbour_part_id(shard_id: str) -> str:
    return f"n-{shard_id}"


def key_hash(keys: list[str]) -> np.ndarray:
    """uint64 of sha1(key)[:8]: a key is held out when `hash / 2**64 < fraction` (`is_held_out`)."""
    return np.array([int.from_bytes(hashlib.sha1(k.encode()).digest()[:8], "big") for k in keys],
                    dtype=np.uint64)


def is_held_out(key: str, fraction: float) -> bool:
    """The stable held-out split by key: the same keys are held out in every run."""
    return fraction > 0 and int(key_hash([key])[0]) / 2**64 < fraction


def fixed_width(keys: list[str]) -> np.ndarray:
    width = max((len(k.encode()) for k in keys), default=1)
    return np.array([k.encode() for k in keys], dtype=f"S{max(1, width)}")


# ---------------------------------------------------------------------------- writing parts


def write_token_part(table: pa.Table, vocab: Vocab, out_dir: str) -> dict[str, Any]:
    """Encode a tokenize shard's rows (in row order: local id = row) into a local part folder."""
    os.makedirs(out_dir, exist_ok=True)
    keys = table.column("key").to_pylist()
    docs = [np.asarray(vocab.encode(c, i), dtype=np.int32) for c, i in
            zip(table.column("caption_ids").to_pylist(), table.column("image_codes").to_pylist(),
                strict=True)]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(f"{out_dir}/tokens.npy", np.concatenate(docs) if docs else np.zeros(0, np.int32))
    np.save(f"{out_dir}/offsets.npy", offsets)
    np.save(f"{out_dir}/keys.npy", fixed_width(keys))
    np.save(f"{out_dir}/holdout.npy", key_hash(keys))
    pq.write_table(pa.table({"key": keys, "id": np.arange(len(keys), dtype=np.int64)}),
                   f"{out_dir}/keys.parquet")
    return {"docs": len(keys), "tokens": int(offsets[-1]),
            "max_doc_len": int(lengths.max()) if len(lengths) else 0}


class KeyIndex:
    """Every token part's keys, sorted once: key -> global id for all neighbour parts of a run.

    Built once per run (not once per neighbour part), so resolving a neighbour part costs its
    own rows x log(documents) and adding shards costs what they contain. A key in several rows
    resolves to its lowest global id (stable sort + leftmost match), as the per-part scan did.
    Memory: the corpus's keys as fixed-width bytes plus 8 bytes of id each.
    """

    def __init__(self, sorted_keys: np.ndarray, ids: np.ndarray, layout: list[list[Any]]):
        self.sorted_keys, self.ids, self.layout = sorted_keys, ids, layout

    @staticmethod
    def build(parts: Iterable[tuple[str, np.ndarray]]) -> KeyIndex:
        """(token shard id, keys in row order) per token part, in global id order."""
        arrays, layout = [], []
        for shard_id, keys in parts:
            arrays.append(keys)
            layout.append([shard_id, len(keys)])
        keys = np.concatenate(arrays) if arrays else np.zeros(0, "S1")  # widest width wins
        ids = np.argsort(keys, kind="stable").astype(np.int64)
        return KeyIndex(keys[ids], ids, layout)

    def resolve(self, wanted: np.ndarray) -> np.ndarray:
        """Global ids of `wanted` (fixed-width bytes); -1 where no token part has the key."""
        out = np.full(len(wanted), -1, dtype=np.int64)
        if not len(self.sorted_keys) or not len(wanted):
            return out
        pos = np.searchsorted(self.sorted_keys, wanted).clip(0, len(self.sorted_keys) - 1)
        hit = self.sorted_keys[pos] == wanted
        out[hit] = self.ids[pos[hit]]
        return out


def write_neighbour_part(table: pa.Table, index: KeyIndex, out_dir: str) -> dict[str, Any]:
    """Neighbour rows as integer ids, sorted by (document, query, variant), into a local folder."""
    os.makedirs(out_dir, exist_ok=True)
    t = table.to_pydict()
    lists = [list(n) for n in t["neighbor_keys"]]
    flat = [k for n in lists for k in n]
    width = max([len(k.encode()) for k in flat + t["key"]] + [1])
    as_bytes = lambda ks: np.array([k.encode() for k in ks], dtype=f"S{width}")  # noqa: E731
    ids = index.resolve(as_bytes(t["key"] + flat))
    doc, nbr = ids[:len(t["key"])], ids[len(t["key"]):]
    query = np.array([QUERIES.index(q) for q in t["query"]], dtype=np.int8)
    variant = np.asarray(t["variant"], dtype=np.int16)
    lengths = np.array([len(n) for n in lists], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    keep = doc >= 0  # a row whose own document has no tokens can never be a main document
    order = np.lexsort((variant, query, doc))
    order = order[keep[order]]
    new_lengths = lengths[order]
    new_nbr = [nbr[starts[i]:starts[i + 1]] for i in order]
    np.save(f"{out_dir}/doc.npy", doc[order])
    np.save(f"{out_dir}/query.npy", query[order])
    np.save(f"{out_dir}/variant.npy", variant[order])
    np.save(f"{out_dir}/offsets.npy", np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int64))
    np.save(f"{out_dir}/nbr.npy", np.concatenate(new_nbr) if new_nbr else np.zeros(0, np.int64))
    return {"rows": int(len(order)), "rows_without_tokens": int((~keep).sum()),
            "neighbours_without_tokens": int((nbr < 0).sum())}


# ---------------------------------------------------------------------------- reading


@dataclass
class Part:
    """One packed part: the local (mmap-able) path prefix of its files, and its manifest."""

    manifest: Manifest
    prefix: str  # file `name` of the part is f"{prefix}.{name}"
    offset: int = 0  # global id of its first document (token parts)

    def file(self, name: str) -> str:
        return f"{self.prefix}.{name}"


def local_prefix(root: DataRoot, m: Manifest, cache_dir: str | None) -> str:
    """Where the part's files are on local disk: in place on a local root, else copies in this
    user's cache (0700; `cache_dir` if given) keyed by the part's digest, each file checked
    against its manifest digest on fill and on every reuse (np.load(mmap_mode) needs a file)."""
    prefix = root.join(STAGE, m.shard_id)
    if root.is_local:
        return prefix
    folder = m.output_digest.replace(":", "-")
    for rel, digest in m.outputs.items():
        name = posixpath.join(folder, posixpath.basename(rel))
        if cache_dir:
            os.makedirs(os.path.join(cache_dir, folder), mode=0o700, exist_ok=True)
            verified_copy(root.fs, root.join(rel), os.path.join(cache_dir, name), digest)
        else:
            root.cached(root.join(rel), digest, "pack", name)
    base = cache_dir or user_cache_dir("pack")
    return os.path.join(base, folder, m.shard_id)


def token_manifests(root: DataRoot) -> list[Manifest]:
    return sorted((m for m in list_manifests(root, STAGE) if m.shard_id.startswith("t-")),
                  key=lambda m: m.shard_id)


def neighbour_manifests(root: DataRoot) -> list[Manifest]:
    return sorted((m for m in list_manifests(root, STAGE) if m.shard_id.startswith("n-")),
                  key=lambda m: m.shard_id)


def parts_layout(manifests: list[Manifest]) -> list[list[Any]]:
    """[[token shard id, documents], ...]: what global ids mean; neighbour parts record it."""
    return [[m.shard_id[2:], int(m.metrics["docs"])] for m in manifests]


@dataclass
class StoreCorpus:
    """The documents of a token store, by integer id, memory-mapped (see the module docstring).

    Implements what `pipelines.training.sequences` draws from (its `DocSource` protocol);
    handles are global document ids. Pickles without its arrays (workers re-open).
    """

    vocab: Vocab
    parts: list[Part]
    neighbour_parts: list[Part] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    holdout_fraction: float = 0.0
    _maps: _Maps | None = field(default=None, repr=False)
    _reads: int = field(default=0, repr=False)

    # -- arrays, opened lazily in each process
    def _arrays(self) -> _Maps:
        if self._maps is None:
            self._maps = _Maps(self.parts, self.neighbour_parts)
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_reads": 0}

    def _touch(self) -> _Maps:
        """Every RELEASE_EVERY reads, drop this process's mappings of the pages it has read
        (MADV_DONTNEED: they stay in the shared page cache, a later read maps them again), so
        the resident set holds a window of recent documents, not every page ever touched."""
        self._reads += 1
        maps = self._arrays()
        if self._reads % RELEASE_EVERY == 0:
            maps.release()
        return maps

    # -- the DocSource interface of pipelines.training.sequences
    def n_items(self) -> int:
        return self._arrays().n

    def item(self, i: int) -> int:
        return int(i)

    def doc(self, h: int) -> np.ndarray:
        maps = self._touch()
        p, j = maps.locate(h)
        tokens, offsets = maps.tokens[p], maps.offsets[p]
        return np.array(tokens[offsets[j]:offsets[j + 1]])

    def has_doc(self, h: int) -> bool:
        return 0 <= h < self._arrays().n

    def is_held(self, h: int) -> bool:
        if self.holdout_fraction <= 0:
            return False
        maps = self._arrays()
        p, j = maps.locate(h)
        return int(maps.holdout[p][j]) / 2**64 < self.holdout_fraction

    def label(self, h: int) -> str:
        maps = self._arrays()
        p, j = maps.locate(h)
        return bytes(maps.keys[p][j]).decode()

    def neighbour_lists(self, h: int) -> dict[tuple[str, int], list[int]] | None:
        maps = self._touch()
        out: dict[tuple[str, int], list[int]] = {}
        for doc, query, variant, offsets, nbr, first, last in maps.neighbours:
            if not first <= h <= last:  # parts cover id ranges: skip the others cheaply
                continue
            lo, hi = int(np.searchsorted(doc, h, "left")), int(np.searchsorted(doc, h, "right"))
            for r in range(lo, hi):
                out[(QUERIES[int(query[r])], int(variant[r]))] = nbr[offsets[r]:offsets[r + 1]].tolist()
        return out or None

    def longest(self) -> int:
        return max(int(p.manifest.metrics["max_doc_len"]) for p in self.parts)

    # -- tools and tests
    def key_to_id(self, key: str) -> int:
        """Global id of a key (a scan per part; for tools and tests, not the hot path)."""
        want = key.encode()
        maps = self._arrays()
        for part, keys in zip(self.parts, maps.keys, strict=True):
            hits = np.flatnonzero(keys == want)
            if len(hits):
                return part.offset + int(hits[0])
        raise KeyError(key)

    def held_out_count(self) -> int:
        if self.holdout_fraction <= 0:
            return 0
        return sum(int((h.astype(np.float64) / 2**64 < self.holdout_fraction).sum())
                   for h in self._arrays().holdout)


class _Maps:
    """The parts' arrays in one process: memory maps (kept for madvise) and plain ndarray views
    of them (indexing an ndarray is cheaper than indexing an np.memmap)."""

    def __init__(self, parts: list[Part], neighbour_parts: list[Part]):
        self.mmaps: list[np.memmap] = []

        def load(part: Part, name: str) -> np.ndarray:
            m = np.load(part.file(f"{name}.npy"), mmap_mode="r")
            self.mmaps.append(m)
            return np.asarray(m)

        self.tokens = [load(p, "tokens") for p in parts]
        self.offsets = [load(p, "offsets") for p in parts]
        self.keys = [load(p, "keys") for p in parts]
        self.holdout = [load(p, "holdout") for p in parts]
        self.starts = [p.offset for p in parts]
        self.n = sum(len(o) - 1 for o in self.offsets)
        self.neighbours = []
        for p in neighbour_parts:
            doc = load(p, "doc")
            first, last = (int(doc[0]), int(doc[-1])) if len(doc) else (1, 0)
            self.neighbours.append((doc, load(p, "query"), load(p, "variant"),
                                    load(p, "offsets"), load(p, "nbr"), first, last))

    def locate(self, i: int) -> tuple[int, int]:
        """(part, local id) of global id i."""
        if len(self.starts) == 1:
            return 0, i
        p = bisect.bisect_right(self.starts, i) - 1
        return p, i - self.starts[p]

    def release(self) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for m in self.mmaps:
            mm = getattr(m, "_mmap", None)
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)


def open_store(root: DataRoot, with_neighbours: bool, holdout_fraction: float = 0.0,
               cache_dir: str | None = None) -> StoreCorpus:
    """The packed corpus, refusing parts that do not belong together (see sequences lineage)."""
    tms = token_manifests(root)
    if not tms:
        raise FileNotFoundError("no token parts under pack/: run `racm3 run pack` first")
    lineage = same_lineage(tms, TOKEN_LINEAGE)
    vocab = Vocab(n_text=int(lineage["n_text"]), n_image=int(lineage["n_image"]))
    parts, offset = [], 0
    for m in tms:
        parts.append(Part(m, local_prefix(root, m, cache_dir), offset))
        offset += int(m.metrics["docs"])
    lineage = {**lineage, "vocab": vocab.fingerprint(), "token_shards": len(tms)}
    nparts: list[Part] = []
    if with_neighbours:
        nms = neighbour_manifests(root)
        if not nms:
            raise FileNotFoundError("no neighbour parts under pack/: run `racm3 run retrieve` and "
                                    "`racm3 run pack`, or train the vanilla variant")
        lineage.update(same_lineage(nms, NEIGHBOUR_LINEAGE), neighbour_shards=len(nms))
        layout = parts_layout(tms)
        for m in nms:
            if m.metrics.get("token_parts") != layout:
                raise LineageError(f"pack/{m.shard_id} resolved neighbour ids against other token "
                                   f"parts than pack/ holds now: re-run `racm3 run pack`")
            nparts.append(Part(m, local_prefix(root, m, cache_dir)))
        lineage["neighbour_rows_without_tokens"] = sum(
            int(m.metrics.get("rows_without_tokens", 0)) for m in nms)
    store = StoreCorpus(vocab, parts, nparts, lineage, holdout_fraction)
    lineage["held_out_docs"] = store.held_out_count()
    log.info("token store: %d documents in %d parts (%d held out), %d neighbour parts",
             store.n_items(), len(parts), lineage["held_out_docs"], len(nparts))
    return store
