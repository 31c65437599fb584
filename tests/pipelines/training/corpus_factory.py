"""Synthetic token and neighbour shards, written under the shard contract, for training tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.core.stage import ShardResult, ShardSpec, Stage, execute_shard
from pipelines.training.sequences import load_tokens
from pipelines.training.token_store import StoreCorpus
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table

N_TEXT, N_IMAGE, GRID = 40, 16, 4  # 16 image codes per document


class _Fixed(Stage):
    """Writes a given table and records given lineage metrics, as the real stage would."""

    version = "test"

    def __init__(self, name: str, table: pa.Table, metrics: dict):
        self.name, self.table, self.metrics = name, table, metrics

    def run_shard(self, ctx, resources):
        ctx.write_table(self.table)
        return ShardResult(rows_in=self.table.num_rows, rows_out=self.table.num_rows,
                           metrics=self.metrics)


def entity_doc(i: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Document i shows entity i % 4: caption 'word word <name>' and a 4x4 look plus noise."""
    ent = i % 4
    look = np.random.default_rng(100 + ent).integers(0, N_IMAGE, GRID * GRID)
    noise = rng.random(GRID * GRID) < 0.1
    codes = np.where(noise, rng.integers(0, N_IMAGE, GRID * GRID), look)
    return [1, 2, 10 + ent], [int(c) for c in codes]


def token_table(keys: list[str], seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    caps, imgs = zip(*(entity_doc(int(k), rng) for k in keys), strict=True)
    return pa.table({"key": keys, "caption": [f"doc {k}" for k in keys],
                     "caption_ids": pa.array(caps, pa.list_(pa.int32())),
                     "image_codes": pa.array(imgs, pa.list_(pa.uint16()))})


def make_token_shard(root: DataRoot, shard_id: str, keys: list[str], codebook: str = "cb-1",
                     n_text: int = N_TEXT, n_image: int = N_IMAGE, seed: int = 0) -> None:
    metrics = dict(codebook=codebook, text_tokenizer="bpe-1", n_text=n_text, n_image=n_image,
                   grid=GRID)
    execute_shard(_Fixed("tokenize", token_table(keys, seed), metrics), root, None,
                  ShardSpec("tokenize", shard_id, ()))


Lists = dict[str, dict[tuple[str, int], list[str]]]  # key -> {(query, variant): keys best first}


def oracle_lists(keys: list[str], all_keys: list[str], variants: int = 2) -> Lists:
    """Oracle neighbours: other documents of the same entity, best first, per query and variant."""
    out: Lists = {}
    for k in keys:
        same = [o for o in all_keys if int(o) % 4 == int(k) % 4 and o != k]
        for q in ("text", "image"):
            for v in range(variants + 1):
                out.setdefault(k, {})[(q, v)] = (same[v:] + same[:v])[:2] if v else same[:2]
    return out


def neighbour_table(lists: Lists, n_candidates: int) -> pa.Table:
    """A retrieve shard's rows holding the given neighbour lists."""
    rows = [dict(key=k, query=q, variant=v, neighbor_keys=nks, neighbor_scores=[0.8] * len(nks),
                 n_candidates=n_candidates, skipped_self=1, skipped_duplicate=0,
                 skipped_query_sim=0, skipped_redundant=0)
            for k, by_qv in lists.items() for (q, v), nks in by_qv.items()]
    schema = pa.schema([("key", pa.string()), ("query", pa.string()), ("variant", pa.int16()),
                        ("neighbor_keys", pa.list_(pa.string())),
                        ("neighbor_scores", pa.list_(pa.float32())), ("n_candidates", pa.int32()),
                        ("skipped_self", pa.int32()), ("skipped_duplicate", pa.int32()),
                        ("skipped_query_sim", pa.int32()), ("skipped_redundant", pa.int32())])
    return pa.Table.from_pylist(rows, schema=schema)


def make_neighbour_shard(root: DataRoot, shard_id: str, keys: list[str], all_keys: list[str],
                         index: str = "ix-1", lists: Lists | None = None) -> None:
    """A retrieve shard of `keys` with oracle neighbours among `all_keys`, or exactly `lists`."""
    metrics = dict(index_fingerprint=index, encoder="clip-1")
    table = neighbour_table(oracle_lists(keys, all_keys) if lists is None else lists, len(all_keys))
    execute_shard(_Fixed("retrieve", table, metrics), root, None, ShardSpec("retrieve", shard_id, ()))


def make_corpus(root: DataRoot, n: int = 16, shards: int = 2, neighbours: bool = True,
                packed: bool = False) -> list[str]:
    """n documents over `shards` token shards (and matching neighbour shards); returns the keys.
    `packed`: also run stage `pack` (what training reads)."""
    keys = [f"{i:04d}" for i in range(n)]
    for s in range(shards):
        part = keys[s::shards]
        make_token_shard(root, f"{s:05d}", part)
        if neighbours:
            make_neighbour_shard(root, f"{s:05d}", part, keys)
    if packed:
        pack_corpus(root)
    return keys


def pack_corpus(root: DataRoot) -> list[str]:
    """Run stage `pack` on every shard it plans that is not done yet; returns the shard ids run."""
    from pipelines.core.stage import shard_states
    from pipelines.training.pack import PackConfig, PackStage

    stage, cfg = PackStage(), PackConfig()
    ran = []
    for st in shard_states(stage, root, cfg):
        if st.state != "done":
            execute_shard(stage, root, cfg, st.spec)
            ran.append(st.spec.shard_id)
    return ran


def docs_by_key(store: StoreCorpus) -> dict[str, np.ndarray]:
    """Every document of a token store by key (tests compare against it; training never does)."""
    return {store.label(i): store.doc(i) for i in range(store.n_items())}


@dataclass
class Shards:
    """Token documents and neighbour lists read straight from the shards, not through `pack`:
    the independent oracle a token store is checked against."""

    docs: dict[str, np.ndarray]
    neighbours: Lists


def read_shards(root: DataRoot) -> Shards:
    docs = load_tokens(root)[1]
    neighbours: Lists = {}
    for m in list_manifests(root, "retrieve"):
        t = read_table(root, root.artifact("retrieve", m.shard_id, "parquet"),
                       ["key", "query", "variant", "neighbor_keys"]).to_pydict()
        for k, q, v, nks in zip(t["key"], t["query"], t["variant"], t["neighbor_keys"], strict=True):
            neighbours.setdefault(k, {})[(q, int(v))] = list(nks)
    return Shards(docs, neighbours)
