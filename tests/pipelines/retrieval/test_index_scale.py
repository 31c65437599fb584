"""index at scale: sub-indexes merged exactly, training on a sample shard by shard, a factory
chosen by a memory budget, memory-mapped loading (once per process, cached for remote roots)."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.runner import run_stage
from pipelines.retrieval import faiss_index
from pipelines.retrieval.faiss_index import load_index, merge_topk
from pipelines.retrieval.index import IndexConfig
from pipelines.retrieval.index_build import choose_factory, parse_bytes, training_sample
from pipelines.retrieval.memory_store import STORE_FILES
from pipelines.retrieval.retrieve import RetrieveConfig
from storage.fs import DataRoot
from storage.manifest import read_manifest
from storage.shards import read_table
from tests.factories import make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import configs, unit, write_embed_shard

THREADS = ("--direct_running_mode=multi_threading", "--direct_num_workers=2")


def memory_root(path, n: int = 240, d: int = 16, shards: int = 3) -> tuple[DataRoot, np.ndarray]:
    """`shards` embed shards of unit vectors with exact copies (tied scores) and a download
    shard each (retrieve's lineage input)."""
    root = DataRoot(str(path))
    rng = np.random.default_rng(3)
    doc = unit(rng.normal(size=(n, d)))
    doc[1::7] = doc[0::7][: len(doc[1::7])]  # exact duplicates: equal scores to break ties on
    text = unit(doc + 0.2 * rng.normal(size=doc.shape))
    keys = [f"k{i:04d}" for i in range(n)]
    sha = [f"s{i}" for i in range(n)]
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        sid = f"{s:05d}"
        write_embed_shard(root, sid, keys[a:b], sha[a:b], text[a:b], doc[a:b], doc[a:b])
        make_download_shard(root, sid, n=1, size=16)
    return root, doc


def test_equal_scores_come_by_row_id_also_at_the_cut():
    """FAISS's heap keeps an arbitrary one of candidates tied for the k-th place; the search
    breaks ties by row id, for one index and for its parts alike."""
    x = unit(np.random.default_rng(0).normal(size=(60, 8)))
    x[[20, 30, 40, 50]] = x[10]
    one = faiss.IndexFlatIP(8)
    one.add(x)
    rows = [np.arange(0, 60, 2), np.arange(1, 60, 2)]  # two parts: even and odd rows
    parts = []
    for r in rows:
        p = faiss.IndexFlatIP(8)
        p.add(x[r])
        parts.append(p)
    q = x[[10, 5]]
    for k in (2, 3, 5, 7, 60):
        s, i = faiss_index.search_ties_by_id(one, q, k)
        s2, i2 = faiss_index.ShardedIndex(parts, rows).search(q, k)
        np.testing.assert_array_equal(i2, i)
        np.testing.assert_array_equal(s2, s)
        exact = np.lexsort((np.arange(60)[None].repeat(2, 0), -(q @ x.T)), axis=-1)[:, :k]
        np.testing.assert_array_equal(i, exact)
    assert faiss_index.search_ties_by_id(one, q, 3)[1][0].tolist() == [10, 20, 30]
    s, i = merge_topk([np.array([[1.0, 0.5]]), np.array([[0.7, -3e38]])],
                      [np.array([[4, 2]]), np.array([[9, -1]])], 3)
    assert i.tolist() == [[4, 9, 2]] and s[0, 1] == np.float32(0.7)


def test_sharded_flat_gives_the_neighbours_of_one_flat_index(tmp_path):
    one, doc = memory_root(tmp_path / "one")
    three = DataRoot(str(tmp_path / "three"))
    shutil.copytree(one.path, three.path)
    assert run_stage("index", one, configs()).ok
    sharded = IndexConfig(shards=3)  # default: local worker processes on Beam
    report = run_stage("index", three, configs(index=sharded))
    assert report.ok, report.failed
    m = read_manifest(three, "index", "main")
    assert m.metrics["parts"] == 3 and sum(m.metrics["part_rows"]) == len(doc)
    assert min(m.metrics["part_rows"]) > 40  # sha1(key) mod 3 spreads the keys
    assert {p.rsplit("/", 1)[1] for p in m.outputs} == {
        "main.keys.parquet", "main.part-000.faiss", "main.part-001.faiss", "main.part-002.faiss",
        *(f"main.{f}" for f in STORE_FILES), *(f"main.part-00{p}.rows.bin" for p in range(3))}
    assert m.metrics["index_bytes"] >= len(doc) * 16 * 4
    a, b = load_index(one), load_index(three)
    assert isinstance(b.cpu, faiss_index.ShardedIndex)
    for k in (1, 5, 17, len(doc)):
        sa, ia = a.search(doc[::5], k)
        sb, ib = b.search(doc[::5], k)
        np.testing.assert_array_equal(a.keys[ia], b.keys[ib])  # ties included
        np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(b.reconstruct(np.array([7, 0, 200])), doc[[7, 0, 200]])
    cfg = RetrieveConfig(top_n=12, k_max=3, variants=0, redundancy_threshold=0.8)
    for root in (one, three):
        assert run_stage("retrieve", root, configs(retrieve=cfg)).ok
    for sid in ("00000", "00001", "00002"):
        ta = read_table(one, one.artifact("retrieve", sid, "parquet"))
        tb = read_table(three, three.artifact("retrieve", sid, "parquet"))
        assert ta.equals(tb), sid
        # the redundancy rule really ran (and skipped the same candidates in both set-ups)
        assert sum(r["skipped_redundant"] for r in ta.to_pylist()) > 0, sid


def test_retrieve_batches_do_not_change_rows(tmp_path):
    root, _ = memory_root(tmp_path / "r", n=90)
    assert run_stage("index", root, configs()).ok
    tables = []
    for batch in (7, 256):
        cfg = RetrieveConfig(top_n=10, k_max=3, variants=0, batch_size=batch)
        assert run_stage("retrieve", root, configs(retrieve=cfg), force=True).ok
        tables.append(read_table(root, root.artifact("retrieve", "00001", "parquet")))
    assert tables[0].equals(tables[1])


def test_trained_ivf_built_shard_by_shard_on_a_seeded_sample(tmp_path):
    root, doc = memory_root(tmp_path / "ivf", n=600, shards=3)
    paths = [root.artifact("embed", f"{s:05d}", "parquet") for s in range(3)]
    sample = training_sample(root, paths, [200, 200, 200], 300, seed=4)
    rng = np.random.default_rng(4)
    np.testing.assert_array_equal(sample, doc[np.sort(rng.choice(600, 300, replace=False))])
    for shards in (1, 2):
        cfg = IndexConfig(factory="IVF4,Flat", nprobe=4, train_sample=300, seed=4, shards=shards,
                          recall_sample=60, beam_options=THREADS)
        assert run_stage("index", root, configs(index=cfg), force=True).ok
        m = read_manifest(root, "index", "main")
        assert m.metrics["train_vectors"] == 300 and m.metrics["ntotal"] == 600
        assert m.metrics["recall@10_vs_exact"] == 1.0  # every cell probed: exact
        idx = load_index(root)
        np.testing.assert_allclose(idx.reconstruct(np.array([5, 599])), doc[[5, 599]], rtol=1e-6)
        _, ids = idx.search(doc[[8, 300]], 1)
        assert ids[:, 0].tolist() in ([8, 300], [7, 300])  # row 8 is a copy of row 7


def test_memory_budget_picks_the_factory():
    n, d = 1_000_000, 768
    assert choose_factory(n, d, parse_bytes("4GB"), 200_000) == "Flat"  # 3.07 GB
    assert choose_factory(n, d, parse_bytes("1GB"), 200_000) == "IVF4096,SQ8"
    assert choose_factory(n, d, parse_bytes("200MB"), 200_000) == "IVF4096,PQ128"
    assert choose_factory(n, d, parse_bytes("40MB"), 200_000) == "IVF4096,PQ16"
    assert choose_factory(1000, 16, 30_000, 1000) == "IVF25,SQ8"  # cells capped at n/39
    with pytest.raises(ValueError, match="index.max_memory"):
        choose_factory(n, d, 1000, 200_000)
    with pytest.raises(ConfigError, match="index.factory"):
        IndexConfig(factory="")
    with pytest.raises(ConfigError, match="index.max_memory"):
        IndexConfig(max_memory="lots")


def test_stage_records_the_budget_choice_and_sizes(tmp_path):
    root, _ = memory_root(tmp_path / "b", n=300, shards=2)
    cfg = IndexConfig(factory="", max_memory="10KB", nprobe=8, recall_sample=50)
    assert run_stage("index", root, configs(index=cfg)).ok
    m = read_manifest(root, "index", "main")
    assert m.metrics["factory"] == "IVF7,SQ8" and m.metrics["factory_from"] == "index.max_memory"
    assert m.metrics["memory_estimate_bytes"] <= 10_000 == m.metrics["max_memory_bytes"]
    assert 0 < m.metrics["index_bytes"] == root.fs.size(root.artifact("index", "main", "faiss"))
    over = run_stage("index", root, configs(index=IndexConfig(max_memory="10KB")))
    assert "index.max_memory" in over.failed["main"]  # Flat is 19 KB


def _mapped(path: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(path) for line in f)


def test_flat_and_ivf_load_memory_mapped_once_per_process(tmp_path):
    root, doc = memory_root(tmp_path / "m", n=120, shards=2)
    assert run_stage("index", root, configs()).ok
    idx = load_index(root)
    assert not faiss.downcast_index(idx.cpu).codes.is_owned  # codes live in the file's pages
    assert _mapped(root.artifact("index", "main", "faiss"))
    assert load_index(root) is idx  # a second caller in this process shares it
    cfg = IndexConfig(factory="IVF2,Flat", nprobe=2, recall_sample=20)
    assert run_stage("index", root, configs(index=cfg), force=True).ok
    ivf = load_index(root)
    assert ivf is not idx  # the digest changed: reloaded
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(ivf.cpu).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    np.testing.assert_allclose(ivf.reconstruct(np.array([3])), doc[[3]], rtol=1e-6)


def test_remote_root_copies_the_index_once_per_machine(tmp_path, monkeypatch):
    local, doc = memory_root(tmp_path / "src", n=60, shards=2)
    remote = DataRoot("memory://racm3-test-remote-index")
    remote.fs.put(local.path + "/", remote.path + "/", recursive=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv(faiss_index.CACHE_ENV, str(cache))
    assert run_stage("index", remote, configs(index=IndexConfig(shards=2, beam_options=THREADS))).ok
    idx = load_index(remote)
    files = sorted(p.name for p in cache.iterdir() if p.name.endswith(".faiss"))
    assert len(files) == 2
    assert all((cache / f"{f}.sha256").exists() for f in files)  # the digest it is checked against
    faiss_index._LOADED.clear()  # a second worker process on this machine
    again = load_index(remote)
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".faiss")) == files
    _, ids = again.search(doc[[4]], 1)
    assert ids[0, 0] == idx.search(doc[[4]], 1)[1][0, 0]
    remote.fs.rm(remote.path, recursive=True)
