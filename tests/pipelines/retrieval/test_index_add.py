"""Adding new embedding shards to a built index: Flat equals a rebuild (index, memory store and
key map byte for byte), IVF keeps its quantizer, the drift check says when a retrain is due,
index.rebuild retrains, and a changed known shard rebuilds."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.runner import run_stage
from pipelines.retrieval.faiss_index import load_index
from pipelines.retrieval.index import IndexConfig
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.retrieval.retrieval_helpers import configs, unit, write_embed_shard

THREADS = ("--direct_running_mode=multi_threading", "--direct_num_workers=2")
D = 16


def vectors(n: int = 300, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, D))
    if shift:  # another distribution: what a kept quantizer was not trained on
        x[:, :4] *= 0.2
        x[:, D // 2:] *= 0.1
        x[:, 0] += shift
    return unit(x)


def write_shards(root: DataRoot, doc: np.ndarray, ids: list[str], start: int = 0) -> None:
    """One embed shard per id, an equal slice of `doc` each, keys numbered from `start`."""
    for sid, part in zip(ids, np.array_split(np.arange(len(doc)), len(ids)), strict=True):
        keys = [f"k{start + i:05d}" for i in part]
        write_embed_shard(root, sid, keys, [f"sha{start + i}" for i in part], doc[part],
                          doc[part], doc[part])


def index_files(root: DataRoot) -> dict[str, bytes]:
    m = read_manifest(root, "index", "main")
    return {p.split("/", 1)[1]: open(root.join(p), "rb").read() for p in m.outputs}


def centroids(index) -> np.ndarray:
    q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    return faiss.vector_to_array(q.codes).copy()


@pytest.mark.parametrize("parts", [1, 2])
def test_flat_with_shards_added_equals_a_rebuild(tmp_path, parts):
    doc = vectors(300)
    cfgs = configs(index=IndexConfig(shards=parts, beam_options=THREADS))
    grown = DataRoot(str(tmp_path / "grown"))
    write_shards(grown, doc[:200], ["00000", "00001"])
    assert run_stage("index", grown, cfgs).ran == ["main"]
    write_shards(grown, doc[200:], ["00002"], start=200)
    assert run_stage("index", grown, cfgs).ran == ["main"]
    fresh = DataRoot(str(tmp_path / "fresh"))
    write_shards(fresh, doc[:200], ["00000", "00001"])
    write_shards(fresh, doc[200:], ["00002"], start=200)
    assert run_stage("index", fresh, cfgs).ok

    m = read_manifest(grown, "index", "main")
    assert m.metrics["built"] == "added" and m.metrics["ntotal"] == 300
    assert [a["shards"] for a in m.metrics["added"]] == [["00002"]]
    assert m.metrics["added"][0]["rows"] == 100 and m.metrics["trained_rows"] == 200
    assert read_manifest(fresh, "index", "main").metrics["built"] == "trained"
    # index file(s), memory store and key map: byte for byte what a rebuild writes
    assert index_files(grown) == index_files(fresh)
    a, b = load_index(grown), load_index(fresh)
    q = vectors(20, seed=5)
    for x, y in zip(a.search(q, 10), b.search(q, 10), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.keys[250] == "k00250" and a.store.rows_of(["k00299"]).tolist() == [299]
    assert run_stage("index", grown, cfgs).skipped == ["main"]


def test_ivf_adds_without_retraining_its_quantizer(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    doc = vectors(400)
    cfgs = configs(index=IndexConfig(factory="IVF8,Flat", nprobe=8, recall_sample=50))
    write_shards(root, doc[:300], ["00000", "00001"])
    assert run_stage("index", root, cfgs).ok
    before = centroids(load_index(root).cpu)
    trained = read_manifest(root, "index", "main").metrics
    write_shards(root, doc[300:], ["00002"], start=300)
    assert run_stage("index", root, cfgs).ran == ["main"]

    idx = load_index(root)
    assert idx.cpu.ntotal == 400
    assert centroids(idx.cpu).tobytes() == before.tobytes()  # the quantizer is the trained one
    _, ids = idx.search(doc[300:], 1)
    assert ids[:, 0].tolist() == list(range(300, 400))  # every new vector finds itself
    assert list(idx.keys[np.arange(300, 303)]) == ["k00300", "k00301", "k00302"]
    np.testing.assert_array_equal(idx.reconstruct(np.array([399])), doc[[399]])
    m = read_manifest(root, "index", "main").metrics
    assert m["train_vectors"] == trained["train_vectors"] == 300
    assert m["trained_rows"] == 300 and m["trained_at"] == trained["trained_at"]
    assert m["drift"]["recall@10_new_vs_exact"] == 1.0  # every cell probed: exact
    assert m["retrain_due"] is False


def test_drift_says_a_retrain_is_due_and_rebuild_retrains(tmp_path, caplog):
    root = DataRoot(str(tmp_path / "data"))
    cfg = IndexConfig(factory="IVF4,PQ4x4", nprobe=4, recall_sample=100)  # retrain_below 0.9
    train = vectors(640)
    write_shards(root, train, ["00000", "00001"])
    assert run_stage("index", root, configs(index=cfg)).ok
    write_shards(root, vectors(200, shift=4.0, seed=1), ["00002"], start=640)
    with caplog.at_level(logging.WARNING, logger="pipelines.retrieval.index"):
        assert run_stage("index", root, configs(index=cfg)).ran == ["main"]
    m = read_manifest(root, "index", "main").metrics
    recall, at_training = m["drift"]["recall@10_new_vs_exact"], m["recall@10_vs_exact"]
    assert m["drift"]["recall@10_at_training"] == at_training  # the trained index's own recall
    assert 0 < recall < 0.9 * at_training and m["retrain_due"] is True
    assert m["added"][0]["recall@10_new_vs_exact"] == recall
    assert "a retrain is due" in caplog.text

    redo = IndexConfig(**{**cfg.__dict__, "rebuild": True})
    assert run_stage("index", root, configs(index=redo)).ran == ["main"]  # retrained
    m = read_manifest(root, "index", "main").metrics
    assert m["built"] == "trained" and m["added"] == [] and m["retrain_due"] is False
    assert m["train_vectors"] == m["trained_rows"] == 840
    assert run_stage("index", root, configs(index=redo)).skipped == ["main"]


def test_a_changed_known_shard_rebuilds(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    doc = vectors(300)
    write_shards(root, doc[:200], ["00000", "00001"])
    assert run_stage("index", root, configs()).ok
    write_shards(root, doc[:150], ["00001"], start=100)  # a known shard's rows changed
    write_shards(root, doc[200:], ["00002"], start=200)
    assert run_stage("index", root, configs()).ran == ["main"]
    m = read_manifest(root, "index", "main").metrics
    assert m["built"] == "trained" and m["ntotal"] == 350 and m["added"] == []


def test_retrain_threshold_is_checked():
    with pytest.raises(ConfigError, match="index.retrain_below"):
        IndexConfig(retrain_below=1.5)
