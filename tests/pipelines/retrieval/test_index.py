"""Stage `index`: FAISS over doc_emb, key map, recall of non-flat indexes, encoder checks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipelines.core.runner import run_stage
from pipelines.retrieval.faiss_index import load_index
from pipelines.retrieval.index import IndexConfig, estimate_bytes
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.retrieval.retrieval_helpers import (
    configs,
    hexsha,
    unit,
    write_embed_shard,
)


def synthetic_root(tmp_path, n: int = 300, d: int = 16, encoder: str = "racm3-tiny@test") -> tuple[DataRoot, np.ndarray]:
    root = DataRoot(str(tmp_path / "data"))
    doc = unit(np.random.default_rng(0).normal(size=(n, d)))
    half = n // 2
    for sid, sl in (("00000", slice(0, half)), ("00001", slice(half, n))):
        keys = [f"k{i:05d}" for i in range(n)][sl]
        write_embed_shard(root, sid, keys, [f"sha{i}" for i in range(n)][sl], doc[sl], doc[sl],
                          doc[sl], encoder=encoder)
    return root, doc


def test_flat_index_and_key_map(tmp_path):
    root, doc = synthetic_root(tmp_path)
    report = run_stage("index", root, configs())
    assert report.ok and report.ran == ["main"]
    m = read_manifest(root, "index", "main")
    assert m.metrics["ntotal"] == 300 and m.metrics["dim"] == 16
    assert m.metrics["encoder"]["fingerprint"] == "racm3-tiny@test"
    assert m.metrics["memory_estimate_bytes"] == 300 * 16 * 4
    idx = load_index(root)
    assert idx.keys[150] == "k00150" and idx.sha256[7] == hexsha("sha7")
    scores, ids = idx.search(doc[[5, 200]], 3)
    assert ids[:, 0].tolist() == [5, 200]  # each vector finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(idx.reconstruct(np.array([3])), doc[[3]], rtol=1e-6)
    assert run_stage("index", root, configs()).skipped == ["main"]


def test_ivf_index_reports_recall_against_exact(tmp_path):
    root, doc = synthetic_root(tmp_path, n=400)
    cfg = IndexConfig(factory="IVF8,Flat", nprobe=8, recall_sample=100)
    assert run_stage("index", root, configs(index=cfg)).ok
    m = read_manifest(root, "index", "main")
    assert m.metrics["search_params"] == {"nprobe": 8}
    assert m.metrics["recall@10_vs_exact"] == 1.0  # every cell visited: exact
    idx = load_index(root)
    # candidates' vectors come from the mapped store: no per-process IVF direct map is built
    np.testing.assert_array_equal(idx.reconstruct(np.array([11, 10, 11])), doc[[11, 10, 11]])
    assert faiss.extract_index_ivf(idx.cpu).direct_map.type == faiss.DirectMap.NoMap


def test_untrainable_index_says_what_to_do(tmp_path):
    root, _ = synthetic_root(tmp_path, n=40)
    report = run_stage("index", root, configs(index=IndexConfig(factory="IVF256,Flat")))
    assert "use Flat or fewer IVF cells" in report.failed["main"]


def test_bad_factory_string_is_a_config_error():
    with pytest.raises(ValueError, match="index.factory"):
        IndexConfig(factory="NoSuchIndex99")


def test_mixed_encoders_are_refused(tmp_path):
    root, doc = synthetic_root(tmp_path, n=20)
    write_embed_shard(root, "00001", ["z"], ["s"], doc[:1], doc[:1], doc[:1], encoder="other@123")
    report = run_stage("index", root, configs())
    assert "different encoders" in report.failed["main"]


def test_query_from_another_encoder_is_refused(tmp_path):
    root, _ = synthetic_root(tmp_path, n=20)
    run_stage("index", root, configs())
    idx = load_index(root)
    with pytest.raises(ValueError, match="built from encoder racm3-tiny@test"):
        idx.check_encoder("racm3-tiny@other", 16)
    with pytest.raises(ValueError, match="dim 16"):
        idx.check_encoder("racm3-tiny@test", 768)
    idx.check_encoder("racm3-tiny@test", 16)


def test_memory_estimates():
    n, d = 1_000_000, 768
    assert estimate_bytes("Flat", n, d) == n * d * 4
    assert estimate_bytes("IVF1024,PQ64", n, d) == 1024 * d * 4 + n * 8 + n * 64 + 256 * d * 4
    assert estimate_bytes("HNSW32", n, d) > n * d * 4
