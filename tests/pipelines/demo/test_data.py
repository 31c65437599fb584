"""Stage `demo`: two held-out COCO splits, dev and test, that share no document."""

from __future__ import annotations

import hashlib
import json
import os

from pipelines.core.runner import run_stage
from pipelines.demo.data import DemoDataConfig
from pipelines.demo.paths import coco_dir
from storage.coco import load_coco
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.retrieval.retrieval_helpers import configs


def test_dev_and_test_splits_share_no_document(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    cfg = DemoDataConfig(entities=24, eval_images=8, dev_images=6, max_docs_per_entity=6)
    assert run_stage("demo", root, configs(demo=cfg)).ok
    folder = coco_dir(root)
    splits = {s: load_coco(root, os.path.join(folder, f"captions_{s}.json")) for s in ("dev", "test")}
    assert len(splits["test"].images) == 8 and len(splits["dev"].images) == 6
    assert not set(splits["dev"].image_ids) & set(splits["test"].image_ids)
    digest = {s: {hashlib.sha256(b).hexdigest() for b in sp.images} for s, sp in splits.items()}
    assert len(digest["dev"]) == 6 and not digest["dev"] & digest["test"]  # no shared image
    for s, sp in splits.items():
        assert sp.entities and all(len(c) == 5 for c in sp.captions)
        data = json.load(open(os.path.join(folder, f"captions_{s}.json")))
        assert data["info"]["split"] == s
        names = {im["file_name"] for im in data["images"]}
        assert all(n.startswith(f"{s}_") for n in names)
    m = read_manifest(root, "demo", "laion")
    assert m.metrics["eval_images"] == 8 and m.metrics["dev_images"] == 6


def test_heldout_renderings_compose_the_entity_with_a_background_its_memory_never_shows(tmp_path):
    from pipelines.demo.data import BACKGROUNDS, generate_coco, generate_metadata

    cfg = DemoDataConfig(entities=30, eval_images=12, max_docs_per_entity=4)
    table, entities, backgrounds = generate_metadata(cfg, str(tmp_path / "www"))
    counts = {e: 1 for e in backgrounds}
    coco = generate_coco(cfg, entities, str(tmp_path / "coco"), counts, "test", backgrounds)
    by_name = {e.name: i for i, e in enumerate(entities)}
    caps: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    novel = 0
    for image_id, name in coco["racm3_entities"].items():
        said = {b for b in BACKGROUNDS if all(b in c for c in caps[int(image_id)])}
        assert len(said) == 1 and all(name in c for c in caps[int(image_id)])  # says both
        bg, seen = said.pop(), backgrounds[by_name[name]]
        assert bg not in seen or len(seen) == len(BACKGROUNDS)
        novel += bg not in seen
    assert novel == coco["info"]["novel_background_images"] == len(coco["images"])  # rare entities
