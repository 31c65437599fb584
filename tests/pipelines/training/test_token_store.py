"""Stage `pack` and the memory-mapped token store: a round trip (ids, keys, tokens, neighbours
identical to the shards), appending a token shard packs only it, stale packs are refused."""

import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.core.stage import execute_shard, shard_states
from pipelines.training.pack import PackConfig, PackStage
from pipelines.training.sequences import LineageError
from pipelines.training.token_store import is_held_out, open_store
from pipelines.training.train import TrainConfig, TrainStage
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.training.corpus_factory import (
    make_corpus,
    make_neighbour_shard,
    make_token_shard,
    pack_corpus,
    read_shards,
)


@pytest.fixture
def root(tmp_path):
    r = DataRoot(str(tmp_path))
    make_corpus(r, n=16, shards=2, packed=True)
    return r


def test_round_trip_ids_keys_tokens_and_neighbours(root):
    shards = read_shards(root)  # read straight from the shards
    store = open_store(root, with_neighbours=True)
    assert store.n_items() == len(shards.docs) == 16
    ids = {k: store.key_to_id(k) for k in shards.docs}
    assert sorted(ids.values()) == list(range(16))  # dense integer ids
    for key, doc in shards.docs.items():
        assert store.label(ids[key]) == key
        assert np.array_equal(store.doc(ids[key]), doc) and store.doc(ids[key]).dtype == np.int32
        lists = store.neighbour_lists(ids[key])
        assert {qv: [store.label(i) for i in nb] for qv, nb in lists.items()} == \
            shards.neighbours[key]
    # the key <-> id map beside the arrays, in row order of its tokenize shard
    m = read_manifest(root, "pack", "t-00001")
    assert "pack/t-00001.keys.parquet" in m.outputs and "pack/t-00001.tokens.npy" in m.outputs
    table = pq.read_table(root.artifact("pack", "t-00001", "keys.parquet"))
    assert table.column("key").to_pylist() == [f"{i:04d}" for i in range(1, 16, 2)]
    assert table.column("id").to_pylist() == list(range(8))
    assert store.lineage["codebook"] == "cb-1" and store.lineage["index_fingerprint"] == "ix-1"
    assert store.longest() == max(map(len, shards.docs.values()))


def test_arrays_are_memory_mapped_and_not_pickled(root):
    store = open_store(root, with_neighbours=True)
    store.doc(0)
    maps = store._arrays()
    assert len(maps.mmaps) == 2 * 4 + 2 * 5 and all(isinstance(a, np.memmap) for a in maps.mmaps)
    assert all(isinstance(t.base, np.memmap) for t in maps.tokens)  # views of the mappings
    maps.release()  # madvise(DONTNEED): the pages come back from the page cache on the next read
    assert store.doc(3).tolist() == read_shards(root).docs[store.label(3)].tolist()
    blob = pickle.dumps(store)  # what a spawned data-loader worker receives
    assert len(blob) < 20_000 and pickle.loads(blob).doc(3).tolist() == store.doc(3).tolist()


def test_missing_neighbour_keys_become_minus_one(tmp_path):
    root = DataRoot(str(tmp_path))
    keys = ["0000", "0001", "0002", "0003"]
    make_token_shard(root, "00000", keys)
    make_neighbour_shard(root, "00000", keys, keys + ["9999", "0404"])  # 9999, 0404 have no tokens
    pack_corpus(root)
    store = open_store(root, with_neighbours=True)
    m = read_manifest(root, "pack", "n-00000")
    assert m.metrics["neighbours_without_tokens"] > 0
    flat = [i for k in range(4) for nb in store.neighbour_lists(k).values() for i in nb]
    assert -1 in flat and not store.has_doc(-1)


def test_held_out_split_matches_the_key_hash(root):
    store = open_store(root, with_neighbours=False, holdout_fraction=0.3)
    held = {store.label(i) for i in range(16) if store.is_held(i)}
    assert held == {f"{i:04d}" for i in range(16) if is_held_out(f"{i:04d}", 0.3)}
    assert 0 < len(held) == store.lineage["held_out_docs"]


def test_appending_a_token_shard_packs_only_it(root):
    make_token_shard(root, "00002", ["0100", "0101", "0102"])
    states = {s.spec.shard_id: s.state for s in shard_states(PackStage(), root, PackConfig())}
    assert states == {"t-00000": "done", "t-00001": "done", "t-00002": "missing",
                      "n-00000": "stale", "n-00001": "stale"}  # ids re-resolved, tokens not
    with pytest.raises(FileNotFoundError, match="run `racm3 run pack`"):
        TrainStage().plan(root, TrainConfig())
    execute_shard(PackStage(), root, PackConfig(),
                  next(s.spec for s in shard_states(PackStage(), root, PackConfig())
                       if s.spec.shard_id == "t-00002"))
    with pytest.raises(LineageError, match="other token parts"):  # neighbours not re-resolved
        open_store(root, with_neighbours=True)
    assert sorted(pack_corpus(root)) == ["n-00000", "n-00001"]
    store = open_store(root, with_neighbours=True)
    assert store.n_items() == 19 and store.label(18) == "0102"
    assert store.label(store.key_to_id("0005")) == "0005"
    assert TrainStage().plan(root, TrainConfig())[0].shard_id == "ra-cm3"


def test_stream_from_the_store_never_trains_on_held_out_documents(root):
    from itertools import islice

    from pipelines.training.sequences import AssemblyConfig, SequenceStream

    store = open_store(root, with_neighbours=True, holdout_fraction=0.3)
    held = {store.label(i) for i in range(store.n_items()) if store.is_held(i)}
    stream = SequenceStream(store, AssemblyConfig(seq_len=200, k_max=2, mask_prob=0), seed=0)
    seen = set()
    for seq in islice(iter(stream), 40):
        seen |= set(seq["keys"])
        assert isinstance(seq["keys"][0], str)  # keys, not ids, in batches and error messages
    assert held and not seen & held and len(seen) == 16 - len(held)
    assert stream.counts["neighbour_held_out"] > 0 and stream.counts["retrieved_docs"] > 0
