"""The mapped memory store: its columns round-trip, retrieve's rows equal the old object-array
path's (an exact search over the same embeddings) for a Flat and a 3-part sharded index, and an
index built before the store is refused with what to do."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from pipelines.core.runner import run_stage
from pipelines.retrieval.faiss_index import LoadedIndex, load_index
from pipelines.retrieval.index import IndexConfig
from pipelines.retrieval.memory_store import MappedDigests, MappedStrings, MemoryWriter
from pipelines.retrieval.retrieve import RetrieveConfig
from pipelines.retrieval.search import search_and_select
from storage.fs import DataRoot
from storage.manifest import read_manifest, upstream_ref, write_manifest
from storage.shards import read_table
from tests.factories import download_table, make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import configs, unit, write_embed_shard

SHARDS = (("00000", 0, 70), ("00001", 70, 60), ("00002", 130, 50))  # id, first doc, docs


def demo_root(path) -> tuple[DataRoot, np.ndarray, np.ndarray, list[str], list[str], list[str]]:
    """Download shards (keys, captions, digests as the demo's) and embed shards of them, with
    exact duplicates (tied scores, equal digests) and near duplicates (the redundancy rule)."""
    root = DataRoot(str(path))
    rng = np.random.default_rng(7)
    n = sum(c for *_, c in SHARDS)
    doc = unit(rng.normal(size=(n, 16)))
    doc[1::9] = doc[0::9][: len(doc[1::9])]  # exact copies
    doc[2::9] = unit(doc[0::9][: len(doc[2::9])] + 0.05 * rng.normal(size=(len(doc[2::9]), 16)))
    text = unit(doc + 0.3 * rng.normal(size=doc.shape))
    keys, sha, caps = [], [], []
    for sid, start, count in SHARDS:
        make_download_shard(root, sid, n=count, start=start, failures=1, size=16)
        t = download_table(count, start, size=16)
        keys += t["key"].to_pylist()
        caps += t["caption"].to_pylist()
        sha += t["sha256"].to_pylist()
    for i in range(1, n, 9):
        sha[i] = sha[i - 1]  # the copies share their image's digest
    for sid, start, count in SHARDS:
        sl = slice(start, start + count)
        write_embed_shard(root, sid, keys[sl], sha[sl], text[sl], doc[sl], doc[sl],
                          inputs=(upstream_ref(root, "download", sid),))
    return root, doc, text, keys, sha, caps


def old_path_rows(doc: np.ndarray, text: np.ndarray, keys: list[str], sha: list[str],
                  cfg: RetrieveConfig) -> list[tuple]:
    """What retrieve wrote before the store: object arrays of keys and digests beside a plain
    exact index over the same embeddings, vectors reconstructed from the index."""
    flat = faiss.IndexFlatIP(doc.shape[1])
    flat.add(doc)
    karr, sarr = np.asarray(keys, dtype=object), np.asarray(sha, dtype=object)
    old = LoadedIndex(flat, flat, karr, sarr, {"fingerprint": "x"}, "old")
    out = []
    for m, vecs in enumerate((text, doc)):
        sel, scores, ids = search_and_select(old, vecs, karr, sarr, cfg)
        for r in range(len(vecs)):
            pos = sel.kept[r][sel.kept[r] >= 0]
            out.append((keys[r], ("text", "image")[m], karr[ids[r, pos]].tolist(),
                        scores[r, pos].tolist(),
                        tuple(int(v[r]) for v in sel.skipped.values())))
    return sorted(out, key=lambda t: (t[0], t[1]))


@pytest.mark.parametrize("shards", [1, 3])
def test_retrieve_rows_equal_the_object_array_path(tmp_path, shards):
    root, doc, text, keys, sha, caps = demo_root(tmp_path / "data")
    assert run_stage("index", root, configs(index=IndexConfig(shards=shards))).ok
    cfg = RetrieveConfig(top_n=12, k_max=3, variants=0, redundancy_threshold=0.9)
    report = run_stage("retrieve", root, configs(retrieve=cfg))
    assert report.ok, report.failed
    got = []
    for sid, *_ in SHARDS:
        for r in read_table(root, root.artifact("retrieve", sid, "parquet")).to_pylist():
            got.append((r["key"], r["query"], r["neighbor_keys"], r["neighbor_scores"],
                        tuple(r[f"skipped_{k}"] for k in ("self", "duplicate", "query_sim",
                                                         "redundant"))))
    want = old_path_rows(doc, text, keys, sha, cfg)
    assert len(got) == len(want) == 2 * len(doc)
    for g, w in zip(sorted(got, key=lambda t: (t[0], t[1])), want, strict=True):
        assert g[:3] == w[:3] and g[4] == w[4]
        np.testing.assert_allclose(g[3], w[3], rtol=1e-6)
    assert sum(g[4][1] for g in got) > 0 and sum(g[4][3] for g in got) > 0  # rules were hit
    idx = load_index(root)
    assert idx.store is not None and len(idx.store) == len(doc)
    assert idx.store.captions(np.array([5, 0])).tolist() == [caps[5], caps[0]]
    assert idx.store.sha256(np.array([1])).tolist() == [sha[0]]
    assert idx.store.caption_map().get(keys[77]) == caps[77]
    assert idx.store.caption_map().get("no-such-key", "") == ""
    np.testing.assert_array_equal(idx.store.rows_of([keys[3], "nope", keys[0]]), [3, -1, 0])


def test_mapped_columns_round_trip(tmp_path):
    files = {}

    def open_file(suffix):
        files[suffix] = str(tmp_path / suffix)
        return open(files[suffix], "wb")

    keys, caps = ["a", "", "ключ", "d"], ["x", "é" * 3, "", ""]
    sha = ["", "ab" * 32, None, "0f" * 32]
    emb = np.arange(8, dtype=np.float16).reshape(4, 2)
    w = MemoryWriter(open_file, 4, 2, np.float16, 2)
    w.add(keys[:1], sha[:1], caps[:1], emb[:1], np.array([1]))
    w.add(keys[1:], sha[1:], caps[1:], emb[1:], np.array([0, 1, 0]))
    w.close()
    strings = MappedStrings(np.memmap(files["keys.bin"], np.uint8, mode="r"),
                            np.load(files["keys-off.npy"], mmap_mode="r"))
    assert strings[np.array([[2, 0], [1, 3]])].tolist() == [["ключ", "a"], ["", "d"]]
    assert list(strings) == keys and strings[2] == "ключ"
    digests = MappedDigests(np.load(files["sha256.npy"], mmap_mode="r"))
    assert digests[np.arange(4)].tolist() == ["", "ab" * 32, "", "0f" * 32]
    np.testing.assert_array_equal(np.load(files["emb.npy"]), emb)
    assert np.fromfile(files["part-000.rows.bin"], np.int64).tolist() == [1, 3]
    assert np.fromfile(files["part-001.rows.bin"], np.int64).tolist() == [0, 2]


def test_sha256_that_is_not_a_digest_is_refused(tmp_path):
    w = MemoryWriter(lambda s: open(os.path.join(tmp_path, s), "wb"), 1, 2, np.float32, 1)
    with pytest.raises(ValueError, match="'sha7' is not a 64-digit hex digest"):
        w.add(["k"], ["sha7"], [""], np.zeros((1, 2)), np.zeros(1, np.int32))


def test_an_index_without_the_store_is_refused_with_what_to_do(tmp_path):
    root, *_ = demo_root(tmp_path / "data")
    assert run_stage("index", root, configs()).ok
    m = read_manifest(root, "index", "main")
    old = {k: v for k, v in m.outputs.items() if k.endswith((".faiss", ".parquet"))}
    m.outputs, m.output_digest = old, "sha256:old"  # what an index built before the store lists
    write_manifest(root, m)
    with pytest.raises(FileNotFoundError, match="re-run `racm3 run index`"):
        load_index(root, use_gpu=False)
