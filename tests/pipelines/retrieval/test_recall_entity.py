"""Same-entity hit rates of the memory's neighbours (issue 19): known answers, truth lookup, display."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.retrieval.recall import format_table, memory_entities
from pipelines.retrieval.recall_metrics import entity_hit_rates
from storage.fs import DataRoot
from tests.factories import NAMES, make_download_shard


def test_entity_hit_rates_on_constructed_embeddings_have_the_exact_answer():
    # Memory: 4 docs on the axes of R^4, entities A A B C. Queries are chosen so that ranks are known:
    mem = np.eye(4, dtype=np.float32)
    mem_ent = np.array(["A", "A", "B", "C"], dtype=object)
    q = np.array([[0.9, 0.5, 0.1, 0.0],   # A: ranks doc0 (A), doc1 (A)   -> rank1 hit, rank2 hit
                  [0.1, 0.0, 0.9, 0.5],   # A: ranks doc2 (B), doc3 (C)   -> miss, miss; R@3 hit (doc0)
                  [0.0, 0.9, 0.0, 0.5],   # C: ranks doc1 (A), doc3 (C)   -> miss, rank2 hit
                  [0.0, 0.0, 0.9, 0.5]],  # B: ranks doc2 (B), doc3 (C)   -> rank1 hit, miss
                 dtype=np.float32)
    want = np.array(["A", "A", "C", "B"], dtype=object)
    ids = np.argsort(-(q @ mem.T), axis=1, kind="stable")
    got = entity_hit_rates(ids, mem_ent, want, (1, 2, 3))
    assert got == {"rank 1": 50.0, "rank 2": 50.0, "R@1": 50.0, "R@2": 75.0, "R@3": 100.0}


def test_missing_neighbours_and_unknown_entities_never_hit():
    ids = np.array([[0, -1], [1, 0]])
    mem_ent = np.array(["", "A"], dtype=object)  # doc 0's entity is unknown
    got = entity_hit_rates(ids, mem_ent, np.array(["", "B"], dtype=object), (1, 2))
    assert got == {"rank 1": 0.0, "rank 2": 0.0, "R@1": 0.0, "R@2": 0.0}


def test_memory_entities_come_from_the_demo_truth_not_the_caption(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_download_shard(root, "00000", n=3, size=32)  # captions "a photo of the <NAMES[i]>"
    root.makedirs(root.join("demo"))
    # The truth says doc 1 shows entity 7, whatever its caption says (a mislabelled caption).
    pq.write_table(pa.table({"URL": [f"http://127.0.0.1/{i}.jpg" for i in range(3)],
                             "kind": ["clean"] * 3, "entity": [0, 7, 2]}),
                   root.join("demo/laion.truth.parquet"))
    pq.write_table(pa.table({"entity": list(range(8)), "name": NAMES}), root.join("demo/laion.entities.parquet"))
    keys = [f"{i:09d}" for i in (2, 1, 0)] + ["unknown"]
    assert list(memory_entities(root, keys, set())) == [NAMES[2], NAMES[7], NAMES[0], ""]


def test_memory_entities_without_truth_read_the_caption(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_download_shard(root, "00000", n=3, size=32)
    got = memory_entities(root, ["000000001", "000000002"], {NAMES[1]})
    assert list(got) == [NAMES[1], ""]


def test_format_table_shows_ranks_for_both_splits():
    row = {"rank 1": 91.5, "rank 2": 80.0, "R@1": 91.5, "R@3": 97.0}
    result = {t: {"R@1": 1.0, "R@3": 2.0} for t in ("text_to_image", "text_to_mixture",
                                                     "image_to_text", "image_to_mixture", "chance")}
    result |= {"n_images": 2, "n_text_queries": 2, "coco": "demo/laion.coco/captions_test.json",
               "memory_entity_hit": {"text_query": row, "image_query": row},
               "dev_coco": "demo/laion.coco/captions_dev.json", "memory_entity_hit_dev": {"text_query": row}}
    text = format_table(result)
    assert "(captions_test.json, % of queries)" in text and "(captions_dev.json, % of queries)" in text
    assert "rank 1" in text and text.count("caption_query") == 2 and "91.5" in text
