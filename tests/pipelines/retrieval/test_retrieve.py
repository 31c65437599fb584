"""Stage `retrieve`: redundancy walk vs brute force, its invariants, query dropout, lineage, Dask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.core.runner import run_stage
from pipelines.core.stage import shard_states
from pipelines.retrieval.embed import EmbedStage
from pipelines.retrieval.index import IndexStage
from pipelines.retrieval.retrieve import RetrieveConfig, RetrieveStage
from pipelines.retrieval.search import select_neighbors
from storage.fs import DataRoot
from storage.manifest import read_manifest
from storage.shards import read_table
from tests.factories import make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import (
    configs,
    unit,
    write_checkpoint,
    write_embed_shard,
)


def reference_walk(q: np.ndarray, q_key: str, q_sha: str, mem: np.ndarray, keys: list[str],
                   sha: list[str], top_n: int, k_max: int, qt: float, rt: float) -> tuple[list, list, dict]:
    """The paper's rule, written as plainly as possible over an exact brute-force ranking."""
    scores = mem @ q
    order = sorted(range(len(mem)), key=lambda i: (-scores[i], i))[:top_n]
    kept, skipped = [], dict(self=0, duplicate=0, query_sim=0, redundant=0)
    for i in order:
        if len(kept) == k_max:
            break
        if keys[i] == q_key:
            skipped["self"] += 1
        elif q_sha and sha[i] == q_sha:
            skipped["duplicate"] += 1
        elif scores[i] > qt:
            skipped["query_sim"] += 1
        elif any(float(mem[i] @ mem[j]) > rt for j in kept):
            skipped["redundant"] += 1
        else:
            kept.append(i)
    return [keys[i] for i in kept], [float(scores[i]) for i in kept], skipped


def memory(n: int = 60, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Random unit docs with clusters of near-copies (redundant) and repeated image hashes."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(n // 3, d)))
    doc = unit(np.concatenate([base, base + 0.15 * rng.normal(size=base.shape),
                               base + 0.6 * rng.normal(size=base.shape)]))
    text = unit(doc + 0.3 * rng.normal(size=doc.shape))
    sha = [f"s{i % (n // 3)}" if i < 2 * n // 3 and i % 5 == 0 else f"u{i}" for i in range(n)]
    return doc, text, sha


def test_select_neighbors_matches_the_plain_walk():
    doc, text, sha = memory()
    keys = [f"k{i}" for i in range(len(doc))]
    n, k = 20, 3
    scores = text @ doc.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    s = np.take_along_axis(scores, ids, axis=1)
    karr, sarr = np.array(keys), np.array(sha)
    sel = select_neighbors(s, doc[ids], np.ones_like(ids, bool), karr[ids] == karr[:, None],
                           sarr[ids] == sarr[:, None], k, 0.9, 0.8)
    for q in range(len(doc)):
        want_keys, want_scores, want_skips = reference_walk(text[q], keys[q], sha[q], doc, keys, sha,
                                                            n, k, 0.9, 0.8)
        pos = sel.kept[q][sel.kept[q] >= 0]
        assert [keys[i] for i in ids[q, pos]] == want_keys
        np.testing.assert_allclose(s[q, pos], want_scores, rtol=1e-5)
        assert {r: int(sel.skipped[r][q]) for r in want_skips} == want_skips


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 30), d=st.integers(2, 8), k=st.integers(1, 4), seed=st.integers(0, 10_000),
       qt=st.floats(0.5, 0.99), rt=st.floats(0.3, 0.99), dup=st.floats(0.0, 0.5))
def test_kept_neighbours_are_never_self_query_like_or_redundant(n, d, k, seed, qt, rt, dup):
    rng = np.random.default_rng(seed)
    mem = unit(rng.normal(size=(n, d)))
    mem[1::2] = unit(mem[::2][: len(mem[1::2])] + dup * rng.normal(size=(len(mem[1::2]), d)))
    q_row = int(rng.integers(n))
    q = unit(mem[q_row] + 0.2 * rng.normal(size=d))
    ids = np.argsort(-(mem @ q))[None, :]
    scores = (mem @ q)[ids]
    is_self = ids == q_row
    sel = select_neighbors(scores, mem[ids], np.ones_like(ids, bool), is_self,
                           np.zeros_like(is_self), k, qt, rt)
    kept = ids[0, sel.kept[0][sel.kept[0] >= 0]]
    assert len(kept) <= k and q_row not in kept
    assert all(float(mem[i] @ q) <= qt + 1e-6 for i in kept)
    for a in range(len(kept)):
        for b in range(a):
            assert float(mem[kept[a]] @ mem[kept[b]]) <= rt + 1e-6
    walked = sum(int(v[0]) for v in sel.skipped.values()) + len(kept)
    assert walked <= n and (len(kept) == k or walked == n)  # stops only when full or exhausted


def synthetic(tmp_path) -> tuple[DataRoot, np.ndarray, np.ndarray, list[str]]:
    root = DataRoot(str(tmp_path / "data"))
    doc, text, sha = memory(n=60, d=12, seed=1)
    keys = [f"k{i:03d}" for i in range(len(doc))]
    for sid, sl in (("00000", slice(0, 30)), ("00001", slice(30, 60))):
        write_embed_shard(root, sid, keys[sl], sha[sl], text[sl], doc[sl], doc[sl])
        make_download_shard(root, sid, n=1, size=16)  # retrieve's lineage input (unused with V=0)
    assert run_stage("index", root, configs()).ok
    return root, doc, text, sha


def test_retrieve_stage_matches_brute_force_numpy(tmp_path):
    root, doc, text, sha = synthetic(tmp_path)
    cfg = RetrieveConfig(top_n=12, k_max=3, variants=0, query_sim_threshold=0.9,
                         redundancy_threshold=0.85)
    report = run_stage("retrieve", root, configs(retrieve=cfg))
    assert report.ok, report.failed
    rows = read_table(root, root.artifact("retrieve", "00001", "parquet")).to_pylist()
    assert len(rows) == 60 and [r["query"] for r in rows[:2]] == ["text", "image"]
    keys = [f"k{i:03d}" for i in range(60)]
    for r in rows:
        i = keys.index(r["key"])
        q = text[i] if r["query"] == "text" else doc[i]
        want_keys, want_scores, skips = reference_walk(q, keys[i], sha[i], doc, keys, sha, 12, 3,
                                                       0.9, 0.85)
        assert r["neighbor_keys"] == want_keys
        np.testing.assert_allclose(r["neighbor_scores"], want_scores, rtol=1e-5)
        assert [r[f"skipped_{k}"] for k in skips] == list(skips.values())
        assert r["n_candidates"] == 12 and r["variant"] == 0
    m = read_manifest(root, "retrieve", "00000")
    assert m.metrics["encoder"] == "racm3-tiny@test"
    assert m.metrics["index_fingerprint"] == read_manifest(root, "index", "main").output_digest


def test_retrieve_refuses_an_index_of_another_encoder(tmp_path):
    root, doc, text, sha = synthetic(tmp_path)
    write_embed_shard(root, "00000", ["k000"], ["s"], text[:1], doc[:1], doc[:1], encoder="new@1")
    report = run_stage("retrieve", root, configs())
    assert "built from encoder racm3-tiny@test" in report.failed["00000"]


@pytest.fixture()
def real_root(tmp_path) -> DataRoot:
    root = DataRoot(str(tmp_path / "real"))
    write_checkpoint(root)
    make_download_shard(root, "00000", n=6, failures=1, size=64)
    make_download_shard(root, "00001", n=6, start=6, size=64)
    return root


def test_query_dropout_variants_and_threshold_change_reruns_only_retrieve(real_root):
    root = real_root
    cfgs = configs(retrieve=RetrieveConfig(top_n=8, k_max=2, variants=2))
    for stage in ("embed", "index", "retrieve"):
        assert run_stage(stage, root, cfgs).ok
    t = read_table(root, root.artifact("retrieve", "00000", "parquet")).to_pylist()
    assert len(t) == 6 * 2 * 3  # docs x modalities x (full query + 2 variants)
    assert [(r["query"], r["variant"]) for r in t[:6]] == [
        ("text", 0), ("text", 1), ("text", 2), ("image", 0), ("image", 1), ("image", 2)]
    assert all(r["key"] not in r["neighbor_keys"] for r in t)
    changed = configs(retrieve=RetrieveConfig(top_n=8, k_max=2, variants=2,  # skip nothing
                                              query_sim_threshold=1.5, redundancy_threshold=1.5))
    states = {name: {s.state for s in shard_states(stage, root, changed[name])}
              for name, stage in (("embed", EmbedStage()), ("index", IndexStage()),
                                  ("retrieve", RetrieveStage()))}
    assert states == {"embed": {"done"}, "index": {"done"}, "retrieve": {"stale"}}
    assert run_stage("retrieve", root, changed).ran == ["00000", "00001"]
    again = read_table(root, root.artifact("retrieve", "00000", "parquet")).to_pylist()
    assert all(len(r["neighbor_keys"]) == 2 and r["skipped_query_sim"] == r["skipped_redundant"] == 0
               for r in again)
    assert sum(r["skipped_query_sim"] + r["skipped_redundant"] for r in t) > 0  # before: skips


@pytest.mark.slow
def test_dask_runner_gives_the_same_rows_as_the_local_runner(real_root, tmp_path):
    """embed + retrieve on Beam's Dask runner (2 worker processes on 127.0.0.1) == DirectRunner."""
    import shutil

    from dask.distributed import LocalCluster

    from pipelines.core.runconfig import BeamConfig

    other = DataRoot(str(tmp_path / "dask"))
    shutil.copytree(real_root.path, other.path)
    cfg = RetrieveConfig(top_n=8, k_max=2, variants=1)
    for stage in ("embed", "index", "retrieve"):
        assert run_stage(stage, real_root, configs(retrieve=cfg)).ok
    with LocalCluster(n_workers=2, processes=True, host="127.0.0.1", threads_per_worker=1,
                      dashboard_address=None) as cluster:
        beam = BeamConfig(runner="apache_beam.runners.dask.dask_runner.DaskRunner",
                          options=(f"--dask_client_address={cluster.scheduler_address}",))
        for stage in ("embed", "index", "retrieve"):
            report = run_stage(stage, other, configs(retrieve=cfg, beam=beam))
            assert report.ok, report.failed
    for stage in ("embed", "retrieve"):
        for sid in ("00000", "00001"):
            a = read_table(real_root, real_root.artifact(stage, sid, "parquet"))
            b = read_table(other, other.artifact(stage, sid, "parquet"))
            assert a.equals(b), f"{stage}/{sid} differs between runners"


def test_retriever_for_inference_uses_the_index_encoder(real_root):
    from pipelines.retrieval.search import Retriever, SearchRule
    from tests.factories import entity_image

    for stage in ("embed", "index"):
        assert run_stage(stage, real_root, configs()).ok
    r = Retriever(real_root, SearchRule(top_n=8, k_max=2, query_sim_threshold=1.5,
                                        redundancy_threshold=1.5))
    (keys, scores), = r.by_text(["a photo of the zorvik"], exclude_keys=["000000000"])
    assert len(keys) == 2 and "000000000" not in keys and scores[0] >= scores[1]
    (img_keys, _), = r.by_image([entity_image(3, 64)], k=3)
    assert len(img_keys) == 3


def test_retrieval_eval_stage_writes_table4_json(real_root):
    import json

    from pipelines.retrieval.recall import RetrievalEvalConfig, show_retrieval_eval
    from tests.factories import NAMES, entity_image

    coco = real_root.join("coco")
    real_root.makedirs(coco + "/images")
    images, anns = [], []
    for i in range(3):
        entity_image(i, 64, seed=100 + i).save(f"{coco}/images/{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns += [{"id": 10 * i + j, "image_id": i, "caption": f"the {NAMES[i]} view {j}"}
                 for j in range(2)]
    with open(f"{coco}/captions_val.json", "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "racm3_entities": {str(i): NAMES[i] for i in range(3)}}, f)
    cfgs = configs(retrieval_eval=RetrievalEvalConfig(coco="coco/captions_val.json"))
    for stage in ("embed", "index", "retrieval-eval"):
        assert run_stage(stage, real_root, cfgs).ok
    out = json.loads(open(real_root.artifact("retrieval-eval", "main", "json")).read())
    assert out["n_images"] == 3 and out["chance"]["R@1"] == round(100 / 3, 2)
    assert set(out["memory_entity_hit"]) == {"text_query", "image_query"}
    assert "text_to_mixture" in show_retrieval_eval(real_root)
