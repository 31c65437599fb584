"""storage.coco: the one COCO reader (evaluate, retrieval-eval, fit-clip): rules and skip counts."""

from __future__ import annotations

import json

from storage.coco import iter_images, load_coco, read_index
from storage.fs import DataRoot
from tests.factories import entity_image


def write(root: DataRoot) -> None:
    coco = root.join("c")
    root.makedirs(coco + "/images")
    for i in range(4):
        entity_image(i, 32).save(f"{coco}/images/{i}.jpg")
    open(f"{coco}/images/3.jpg", "wb").write(b"not an image")
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(6)]  # 4.jpg, 5.jpg missing
    anns = [{"id": 1, "image_id": 0, "caption": " a zorvik "}, {"id": 2, "image_id": 0, "caption": "b"},
            {"id": 3, "image_id": 1, "caption": "only one"}, {"id": 4, "image_id": 2, "caption": "c"},
            {"id": 5, "image_id": 2, "caption": "d"}, {"id": 6, "image_id": 3, "caption": "e"},
            {"id": 7, "image_id": 3, "caption": "f"}, {"id": 8, "image_id": 4, "caption": "g"},
            {"id": 9, "image_id": 4, "caption": "h"}, {"id": 10, "image_id": 77, "caption": "orphan"},
            {"id": 11, "image_id": 5, "caption": "   "}]
    with open(f"{coco}/captions_val.json", "w") as f:
        json.dump({"images": images, "annotations": anns}, f)


def test_min_captions_and_every_skip_reason_counted(root):
    write(root)
    split = load_coco(root, "c/captions_val.json", min_captions=2)
    assert split.image_ids == [0, 2] and split.captions[0] == ["a zorvik", "b"]
    assert split.skipped == {"unknown_image_id": 1, "empty_caption": 1, "no_caption": 1,
                             "too_few_captions": 1, "missing_image": 1, "undecodable_image": 1}
    assert split.counts["usable_images"] == 2 and split.counts["images_listed"] == 6
    one = load_coco(root, "c/captions_val.json", min_captions=1)
    assert one.image_ids == [0, 1, 2] and "too_few_captions" not in one.skipped


def test_max_images_and_ranges_stream_the_same_entries(root):
    write(root)
    index = read_index(root, "c/captions_val.json", max_images=3)
    assert [e.image_id for e in index.entries] == [0, 1, 2]
    parts = [it.entry.image_id for s in (0, 2) for it in iter_images(root, index, s, s + 2)]
    assert parts == [0, 1, 2] and index.counts["skipped_missing_image"] == 0


def test_chunked_recall_equals_the_full_matrix_recall():
    import numpy as np

    from pipelines.retrieval.recall_metrics import chunked_recall, recall

    rng = np.random.default_rng(0)
    q, mem = rng.normal(size=(50, 8)), rng.normal(size=(30, 8))
    mem[5] = mem[6]  # a tie: both orders must break it the same way
    q_owner, m_owner = rng.integers(0, 10, 50), rng.integers(0, 10, 30)
    full = recall(q @ mem.T, q_owner[:, None] == m_owner[None, :], (1, 3, 5))
    assert chunked_recall(q, q_owner, mem, m_owner, (1, 3, 5), chunk=7) == full
