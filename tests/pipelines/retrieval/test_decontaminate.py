"""Decontamination: memory/training documents that copy an evaluation image or caption are found."""

from __future__ import annotations

import json

import pytest

from pipelines.core.config import ConfigError
from pipelines.core.runner import run_stage
from pipelines.retrieval.decontaminate import DecontaminateConfig, excluded_keys
from storage.manifest import list_manifests
from tests.factories import NAMES, entity_image, jpeg_bytes, make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint


def coco(root, name: str, items: list[tuple[bytes, str]]) -> str:
    folder = root.join(f"eval-{name}")
    root.makedirs(folder + "/images")
    images, anns = [], []
    for i, (jpg, cap) in enumerate(items):
        with open(f"{folder}/images/{i}.jpg", "wb") as f:
            f.write(jpg)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "caption": cap})
    with open(f"{folder}/captions.json", "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return f"eval-{name}/captions.json"


def test_copies_of_evaluation_images_and_captions_are_found(root):
    write_checkpoint(root)
    make_download_shard(root, "00000", n=8, size=64)
    make_download_shard(root, "00001", n=8, start=8, size=64)
    cfgs = configs()
    assert run_stage("embed", root, cfgs).ok
    copied = jpeg_bytes(entity_image(3 % len(NAMES), 64, seed=3))  # doc 000000003's bytes
    dev = coco(root, "dev", [(copied, "an unrelated sentence about nothing")])
    test = coco(root, "test", [(jpeg_bytes(entity_image(6, 64, seed=999)), "a photo of the riftan")])
    cfgs["decontaminate"] = DecontaminateConfig(splits=(dev, test), image_threshold=0.9999,
                                                text_threshold=0.9999)
    report = run_stage("decontaminate", root, cfgs)
    assert report.ok and len(report.ran) == 2
    keys, per_split = excluded_keys(root)
    riftan = {f"{i:09d}" for i in range(16) if i % len(NAMES) == 6}  # exact caption copies
    assert "000000003" in keys  # the copied image
    assert riftan <= keys
    same_flag = {f"{i:09d}" for i in range(16) if i % len(NAMES) == 3}  # other renderings
    assert keys <= same_flag | riftan  # nothing unrelated
    assert per_split == {dev: len(keys & same_flag), test: len(riftan)}
    again = run_stage("decontaminate", root, cfgs)
    assert again.ran == []  # done shards skipped
    assert all(m.metrics["documents"] >= 0 for m in list_manifests(root, "decontaminate"))

    # kept out of the tokens, hence out of training (main and retrieved documents alike)
    from pipelines.training.train import TrainConfig
    from storage.shards import read_table
    from tests.pipelines.generation.conftest import FIT, TOK, TRAIN

    cfgs.update(fit_vqgan=FIT, tokenize=TOK, train=TrainConfig(variant="vanilla", **TRAIN))
    for stage in ("fit-vqgan", "tokenize", "index", "retrieve", "pack", "train"):
        assert run_stage(stage, root, cfgs).ok, stage
    tokens = {k for m in list_manifests(root, "tokenize")
              for k in read_table(root, root.artifact("tokenize", m.shard_id, "parquet"),
                                  ["key"])["key"].to_pylist()}
    assert not tokens & keys and len(tokens) == 16 - len(keys)
    [train] = list_manifests(root, "train")
    assert train.metrics["decontaminated_by_split"] == per_split


def test_thresholds_are_validated():
    with pytest.raises(ConfigError, match="decontaminate.image_threshold"):
        DecontaminateConfig(image_threshold=1.5)
