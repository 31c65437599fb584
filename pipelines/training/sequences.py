"""Training sequences (paper §3.1, §3.3, §3.4): retrieved documents m1..mK before the main document x,
CM3 causal masking of x, packing to a fixed length, per-token loss weights, roles and positions.

Pure functions do the work (draw, mask, assemble, pack); `SequenceStream` is the torch
IterableDataset that chains them. They read documents through `DocSource`, which the token store
of stage `pack` implements (`pipelines.training.token_store.open_store`, refusing mixed lineage
before any training starts); `load_tokens` reads the token shards themselves (the memory).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from model.cm3.format import mask_spans
from model.document import IMG_SRC, PAD, Vocab, sequence_positions

# Lineage helpers live in a torch-free module; re-exported here, where callers import them from.
from pipelines.training.lineage import (  # noqa: F401
    TOKEN_LINEAGE,
    LineageError,
    check_pins,
    same_lineage,
)
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table

ROLE_PAD, ROLE_RETRIEVED, ROLE_MAIN = 0, 1, 2  # per-token role in a packed sequence


@dataclass(frozen=True)
class AssemblyConfig:
    """How sequences are built: the [train] section's data-assembly fields (`TrainConfig`
    inherits them, so each is declared, defaulted and documented here only)."""

    seq_len: int = 512  # tokens per packed sequence
    k_max: int = 2  # K ~ Uniform{0..k_max} retrieved documents per main document; 0 = vanilla CM3
    alpha: float = 0.1  # loss weight of retrieved-document tokens (Eq. 2)
    mask_prob: float = 0.5  # probability of CM3 causal masking of the main document
    max_spans: int = 1  # masked spans per masked document, drawn from 1..max_spans
    max_span_frac: float = 0.5  # a span covers at most this fraction of the document
    caption_span_prob: float = 0.0  # share of masked documents whose one span is the whole caption; 0 = paper
    random_neighbours: bool = False  # "random at train" ablation: random documents, not retrieved
    overlong: str = "truncate"  # a main document longer than seq_len: "truncate" or "drop"
    caption_dropout: float = 0.0  # share of main documents with the caption dropped (guidance); 0 = paper


class DocSource(Protocol):
    """What sequence assembly reads: documents by handle (`token_store.StoreCorpus`: integer ids)."""

    vocab: Vocab
    lineage: dict[str, Any]

    def n_items(self) -> int: ...
    def item(self, i: int) -> Any: ...
    def doc(self, h: Any) -> np.ndarray: ...
    def has_doc(self, h: Any) -> bool: ...
    def is_held(self, h: Any) -> bool: ...
    def label(self, h: Any) -> str: ...
    def neighbour_lists(self, h: Any) -> dict[tuple[str, int], list[Any]] | None: ...
    def longest(self) -> int: ...


@dataclass
class Unit:
    """One example (m1..mK, x) as flat per-token arrays, all of the same length."""

    ids: np.ndarray  # (L,) int64 token ids
    positions: np.ndarray  # (L,) position inside its own document, restarting at 0
    weights: np.ndarray  # (L,) float32 loss weight of predicting this token: 1 main, alpha retrieved
    roles: np.ndarray  # (L,) int8 ROLE_MAIN / ROLE_RETRIEVED
    key: str  # the main document's key

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------- drawing neighbours


def choose_neighbours(rng: np.random.Generator, key: Any, corpus: DocSource, k: int,
                      random_docs: bool, counts: Counter) -> list[Any]:
    """Up to k neighbours of `key`, best first: from a random query part and dropout variant."""
    if k == 0:
        return []
    if random_docs:
        return random_keys(rng, key, corpus, k)
    lists = corpus.neighbour_lists(key)
    if not lists:
        counts["no_neighbour_row"] += 1
        return []
    queries = sorted({q for q, _ in lists})  # x's text part or image part, at random (§3.4)
    query = queries[rng.integers(len(queries))]
    variants = sorted(v for q, v in lists if q == query)
    dropout = [v for v in variants if v > 0] or variants  # training uses query dropout (§3.2)
    chosen = lists[(query, dropout[rng.integers(len(dropout))])]
    out: list[Any] = []
    for nk in chosen:
        if len(out) == k:
            break
        if not corpus.has_doc(nk):
            counts["neighbour_missing_tokens"] += 1
        elif corpus.is_held(nk):
            counts["neighbour_held_out"] += 1
        else:
            out.append(nk)
    return out


def random_keys(rng: np.random.Generator, key: Any, corpus: DocSource, k: int) -> list[Any]:
    """k random training documents other than `key` (rejection sampling: no list of all keys)."""
    n = corpus.n_items()
    out: list[Any] = []
    for _ in range(8 * (k + 1)):  # bounded: a corpus that is nearly all held out gives fewer
        if len(out) == k:
            break
        h = corpus.item(int(rng.integers(n)))
        if h != key and h not in out and not corpus.is_held(h):
            out.append(h)
    return out


# ---------------------------------------------------------------------------- causal masking


def draw_spans(rng: np.random.Generator, n: int, max_spans: int,
               max_span_frac: float) -> list[tuple[int, int]]:
    """Sorted, non-overlapping [start, end) spans inside a region of n tokens."""
    if n < 1:
        return []
    count = int(rng.integers(1, min(max_spans, n) + 1))
    starts = np.sort(rng.choice(n, size=count, replace=False))
    longest = max(1, int(n * max_span_frac))
    ends = np.append(starts[1:], n)
    return [(int(s), int(min(s + rng.integers(1, longest + 1), e))) for s, e in zip(starts, ends, strict=True)]


def maybe_drop_caption(rng: np.random.Generator, doc: np.ndarray, cfg: AssemblyConfig) -> np.ndarray:
    """`<img alt="" src="` image `">`: the caption dropped at rate caption_dropout, so the model
    also learns the unconditional branch of classifier-free guidance (no draw at rate 0: runs
    without it keep their random stream)."""
    if cfg.caption_dropout <= 0 or rng.random() >= cfg.caption_dropout:
        return doc
    src = int(np.flatnonzero(doc == IMG_SRC)[0])
    return np.concatenate([doc[:1], doc[src:]])


def caption_span(doc: np.ndarray) -> tuple[int, int] | None:
    """The caption as a span of the document's body (`mask_spans`' coordinates); None when empty."""
    n = int(np.flatnonzero(doc == IMG_SRC)[0]) - 1
    return (0, n) if n > 0 else None


def maybe_mask(rng: np.random.Generator, doc: np.ndarray, vocab: Vocab,
               cfg: AssemblyConfig) -> np.ndarray:
    """CM3 causal masking at rate mask_prob. A share caption_span_prob of the masked documents
    mask exactly their caption: the form image->caption prompts with (`image_to_text_prompt`),
    which random spans almost never produce on short captions, so a model trained on random
    spans only fills in caption fragments ("pictured on sky"). No draw at rate 0: runs without it
    keep their random stream."""
    if cfg.mask_prob <= 0 or rng.random() >= cfg.mask_prob or vocab.n_sentinels == 0:
        return doc
    if cfg.caption_span_prob > 0 and rng.random() < cfg.caption_span_prob:
        span = caption_span(doc)
        if span is not None:
            return mask_spans(doc, [span], vocab)
    spans = draw_spans(rng, len(doc) - 2, min(cfg.max_spans, vocab.n_sentinels), cfg.max_span_frac)
    return mask_spans(doc, spans, vocab)


# ---------------------------------------------------------------------------- assembly


def assemble(retrieved: list[np.ndarray], main: np.ndarray, alpha: float, key: str = "") -> Unit:
    """Concatenate m1..mK, x into one unit with roles, weights and per-document positions."""
    docs = [*retrieved, main]
    roles = np.concatenate([np.full(len(d), ROLE_RETRIEVED, np.int8) for d in retrieved]
                           + [np.full(len(main), ROLE_MAIN, np.int8)])
    weights = np.where(roles == ROLE_MAIN, 1.0, alpha).astype(np.float32)
    return Unit(ids=np.concatenate(docs).astype(np.int64),
                positions=sequence_positions(docs),
                weights=weights, roles=roles, key=key)


def fit_unit(retrieved: list[np.ndarray], main: np.ndarray, cfg: AssemblyConfig,
             counts: Counter) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Make m1..mK, x fit seq_len: drop the lowest-ranked retrieved documents first, then
    truncate or drop the main document (by `cfg.overlong`); every change is counted."""
    retrieved = list(retrieved)
    while retrieved and sum(map(len, retrieved)) + len(main) > cfg.seq_len:
        retrieved.pop()
        counts["retrieved_dropped_overlong"] += 1
    if len(main) <= cfg.seq_len:
        return retrieved, main
    if cfg.overlong == "drop":
        counts["main_dropped_overlong"] += 1
        return retrieved, None
    counts["main_truncated"] += 1
    return retrieved, main[: cfg.seq_len]


def draw_unit(rng: np.random.Generator, key: Any, corpus: DocSource, cfg: AssemblyConfig,
              counts: Counter) -> Unit | None:
    """One training example for main document `key`: K ~ U{0..k_max}, neighbours, masking."""
    k = int(rng.integers(0, cfg.k_max + 1))
    counts[f"k{k}"] += 1
    neighbours = choose_neighbours(rng, key, corpus, k, cfg.random_neighbours, counts)
    main = maybe_mask(rng, maybe_drop_caption(rng, corpus.doc(key), cfg), corpus.vocab, cfg)
    retrieved, fitted = fit_unit([corpus.doc(n) for n in neighbours], main, cfg, counts)
    if fitted is None:
        return None
    main = fitted
    counts["retrieved_docs"] += len(retrieved)
    return assemble(retrieved, main, cfg.alpha, corpus.label(key))


# ---------------------------------------------------------------------------- packing


class Packer:
    """First-fit packing of whole units into sequences of exactly seq_len tokens.

    Each sequence takes, in arrival order, the first units of a `lookahead` pool that still fit,
    so RA-CM3's mixed-length units waste little padding; a unit never straddles two sequences.
    Vanilla CM3 (one document per unit) packs several main documents per sequence where RA-CM3
    packs retrieved ones: equal tokens per step. The pool is part of the stream's saved state.
    """

    def __init__(self, next_unit: Callable[[], Unit | None], seq_len: int, counts: Counter,
                 lookahead: int = 16, pool: list[Unit] | None = None):
        self.next_unit, self.seq_len, self.counts = next_unit, seq_len, counts
        self.lookahead, self.pool = lookahead, list(pool or [])

    def _draw(self) -> None:
        u = self.next_unit()
        if u is not None:
            self.pool.append(u)

    def next(self) -> dict[str, Any] | None:
        """The next packed sequence, or None when the units are exhausted."""
        while len(self.pool) < self.lookahead:
            n = len(self.pool)
            self._draw()
            if len(self.pool) == n:
                break
        if not self.pool:
            return None
        buf: list[Unit] = []
        used = 0
        while (i := next((j for j, u in enumerate(self.pool) if used + len(u) <= self.seq_len),
                         None)) is not None:
            unit = self.pool.pop(i)
            buf.append(unit)
            used += len(unit)
            self._draw()
        if not buf:  # a unit longer than seq_len: fit_unit prevents it, refuse loudly otherwise
            raise ValueError(f"unit of {len(self.pool[0])} tokens exceeds seq_len {self.seq_len}")
        return finish(buf, self.seq_len, self.counts)


def finish(units: list[Unit], seq_len: int, counts: Counter) -> dict[str, Any]:
    """Concatenate units and pad to seq_len (pad tokens have weight 0 and role ROLE_PAD);
    `segments` numbers the units 0.. (padding is one more), for the block-diagonal mask."""
    pad = seq_len - sum(map(len, units))
    counts["sequences"] += 1
    counts["pad_tokens"] += pad
    counts["main_docs"] += len(units)

    def cat(name: str, fill: float, dtype: Any) -> np.ndarray:
        return np.concatenate([getattr(u, name) for u in units] + [np.full(pad, fill, dtype)])

    segments = np.concatenate([np.full(len(u), i, np.int32) for i, u in enumerate(units)]
                              + [np.full(pad, len(units), np.int32)])
    return {"ids": cat("ids", PAD, np.int64), "positions": cat("positions", 0, np.int64),
            "weights": cat("weights", 0.0, np.float32), "roles": cat("roles", ROLE_PAD, np.int8),
            "segments": segments, "keys": [u.key for u in units]}


# ---------------------------------------------------------------------------- dataset

ORDER_BLOCK = 1 << 16  # epoch order = shuffled blocks of shuffled ids: O(block) memory, any size


def reader_order(n: int, seed: int, epoch: int, reader: int, n_readers: int,
                 start: int = 0) -> Iterator[tuple[int, int]]:
    """(global position, document index) of one reader's share of an epoch, from `start`.

    The epoch's order is one permutation of 0..n-1 for all readers (blocks in a random order,
    each block shuffled, all from (seed, epoch)); reader r takes positions r, r + R, ...
    so readers are disjoint and any position can be resumed without the positions before it.
    """
    nblocks = max(1, -(-n // ORDER_BLOCK))
    blocks = np.random.default_rng([seed, epoch, 1 << 30]).permutation(nblocks)
    g0 = 0
    for bid in blocks:
        size = min(ORDER_BLOCK, n - int(bid) * ORDER_BLOCK)
        if g0 + size > start:
            perm = int(bid) * ORDER_BLOCK + np.random.default_rng(
                [seed, epoch, 1 << 30, int(bid)]).permutation(size)
            gs = np.arange(g0, g0 + size)
            sel = (gs >= start) & (gs % n_readers == reader)
            yield from zip(gs[sel].tolist(), perm[sel].tolist(), strict=True)
        g0 += size


class SequenceStream(IterableDataset):
    """Endless stream of packed sequences: each epoch shuffles main documents by (seed, epoch).

    Every sequence carries `state`, its reader's position after it (epoch, order position, RNG,
    packing pool): `StreamCheckpoint` saves the state of the last trained batch of each reader and
    hands it back through `resume`, so a resumed run continues with the very next batch.
    """

    def __init__(self, corpus: DocSource, cfg: AssemblyConfig, seed: int = 0,
                 start_epoch: int = 0, lookahead: int = 16):
        super().__init__()
        self.corpus, self.cfg, self.seed, self.start_epoch = corpus, cfg, seed, start_epoch
        self.lookahead = lookahead
        self.counts: Counter = Counter()  # drop/skip counts (visible in-process with 0 workers)
        self.modality_table = modality_table(corpus.vocab)
        self.resume: dict[str, Any] | None = None  # {"batches": n, "readers": {reader: state}}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, n_workers, rank, world = stream_position()
        batches = int((self.resume or {}).get("batches", 0))
        # A fresh DataLoader asks worker 0 first; after `batches` batches the next one is due from
        # worker role batches % n_workers, so worker w plays that role shifted by w.
        role = (worker + batches) % n_workers
        reader, n_readers = rank * n_workers + role, world * n_workers
        state = (self.resume or {}).get("readers", {}).get(reader)
        if state is not None and state["n_readers"] != n_readers:
            raise ValueError(f"checkpoint was taken with {state['n_readers']} data readers "
                             f"(ranks x workers), this run has {n_readers}: resume with the same "
                             f"train.devices and train.num_workers")
        yield from self.sequences(reader, n_readers, state)

    def sequences(self, reader: int, n_readers: int,
                  state: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """The sequences of reader `reader` of `n_readers`, from `state` or the start."""
        if state is None:
            epoch, cursor, pool = self.start_epoch, 0, []
            rng = np.random.default_rng([self.seed, epoch, reader])
        else:
            epoch, cursor, pool = int(state["epoch"]), int(state["cursor"]), list(state["pool"])
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        n = self.corpus.n_items()
        while True:
            pos = [cursor]  # the next order position, advanced by _next_unit
            next_unit = partial(self._next_unit, reader_order(
                n, self.seed, epoch, reader, n_readers, cursor), rng, pos)
            packer = Packer(next_unit, self.cfg.seq_len, self.counts, self.lookahead, pool)
            while (seq := packer.next()) is not None:
                seq["modality"] = self.modality_table[seq["ids"]]
                seq["state"] = {"reader": reader, "n_readers": n_readers, "epoch": epoch,
                                "cursor": pos[0], "rng": rng.bit_generator.state,
                                "pool": list(packer.pool)}
                yield seq
            epoch, cursor, pool = epoch + 1, 0, []
            rng = np.random.default_rng([self.seed, epoch, reader])

    def _next_unit(self, order: Iterator[tuple[int, int]], rng: np.random.Generator,
                   pos: list[int]) -> Unit | None:
        for g, i in order:
            pos[0] = g + 1
            h = self.corpus.item(i)
            if self.corpus.is_held(h):
                continue
            unit = draw_unit(rng, h, self.corpus, self.cfg, self.counts)
            if unit is not None:
                return unit
        return None


def stream_position() -> tuple[int, int, int, int]:
    """(loader worker, loader workers, DDP rank, world size) of the calling reader."""
    info = get_worker_info()
    worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return worker, n_workers, dist.get_rank(), dist.get_world_size()
    return worker, n_workers, 0, 1


def modality_table(vocab: Vocab) -> np.ndarray:
    """Lookup id -> modality (0 special, 1 text, 2 image), so per-token lookups are one gather."""
    return vocab.modality(np.arange(vocab.size)).astype(np.int8)


def collate(seqs: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sequence arrays into (B, T) tensors; main-document keys stay a list of lists."""
    out: dict[str, Any] = {k: torch.from_numpy(np.stack([s[k] for s in seqs]))
                           for k in ("ids", "positions", "weights", "roles", "modality",
                                     "segments")}
    out["keys"] = [s["keys"] for s in seqs]
    if "state" in seqs[-1]:  # the reader's position after this batch (exact resume)
        out["stream_state"] = seqs[-1]["state"]
    return out


# ---------------------------------------------------------------------------- reading shards


def load_tokens(root: DataRoot) -> tuple[Vocab, dict[str, np.ndarray], dict[str, Any]]:
    """Every token shard's documents encoded in the CM3 format, and their shared lineage."""
    manifests = sorted(list_manifests(root, "tokenize"), key=lambda m: m.shard_id)
    if not manifests:
        raise FileNotFoundError("no token shards under tokenize/: run `racm3 run tokenize` first")
    lineage = same_lineage(manifests, TOKEN_LINEAGE)
    vocab = Vocab(n_text=int(lineage["n_text"]), n_image=int(lineage["n_image"]))
    docs: dict[str, np.ndarray] = {}
    for m in manifests:
        t = read_table(root, root.artifact("tokenize", m.shard_id, "parquet"),
                       ["key", "caption_ids", "image_codes"]).to_pydict()
        for key, cap, img in zip(t["key"], t["caption_ids"], t["image_codes"], strict=True):
            docs[key] = np.asarray(vocab.encode(cap, img), dtype=np.int32)
    return vocab, docs, {**lineage, "vocab": vocab.fingerprint(), "token_shards": len(manifests)}


def longest_unit(corpus: DocSource, cfg: AssemblyConfig) -> int:
    """Tokens of the longest possible example: (k_max + 1) longest documents, masked."""
    longest = corpus.longest()
    return (cfg.k_max + 1) * longest + 2 * cfg.max_spans + 1
