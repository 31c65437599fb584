"""Stage `fit-clip`: a few contrastive steps, a loadable checkpoint, recall in the manifest."""

from __future__ import annotations

import json

import numpy as np
import torch

from model.clip_encoder import DocEncoder, create_clip
from pipelines.core.runner import run_stage
from pipelines.demo.fit_clip import FitClipConfig, checkpoint_path
from pipelines.retrieval.recall_metrics import table4
from storage.coco import load_coco
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.factories import entity_image, make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import configs


def test_fit_clip_writes_checkpoint_and_heldout_recall(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_download_shard(root, "00000", n=24, failures=1, size=64)
    cfg = FitClipConfig(seconds=30, max_steps=3, batch_size=8, holdout_fraction=0.25)
    report = run_stage("fit-clip", root, configs(fit_clip=cfg))
    assert report.ok, report.failed
    m = read_manifest(root, "fit-clip", "model")
    assert m.metrics["steps"] == 3 and m.metrics["heldout"] == "docs"
    assert m.metrics["n_train"] == 18 and m.dropped["failed_download"] == 1
    assert 0 <= m.metrics["recall_t2i@1"] <= 100 and m.metrics["chance@1"] == round(100 / 6, 2)
    enc = DocEncoder.load("racm3-tiny", checkpoint_path(root))  # weights_only load of the output
    np.testing.assert_allclose(np.linalg.norm(enc.encode_text(["a photo"]), axis=1), 1.0, rtol=1e-5)
    assert run_stage("fit-clip", root, configs(fit_clip=cfg)).skipped == ["model"]


def test_token_table_trains_sparsely_only_on_corpus_tokens(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_download_shard(root, "00000", n=16, size=64)
    torch.manual_seed(0)
    before = create_clip("racm3-demo")[0].token_embedding.weight.detach().clone()
    cfg = FitClipConfig(model="racm3-demo", seconds=30, max_steps=2, batch_size=8, token_lr=1e-2)
    assert run_stage("fit-clip", root, configs(fit_clip=cfg)).ok
    after = torch.load(checkpoint_path(root), weights_only=True)["token_embedding.weight"]
    changed = (after != before).any(dim=1)  # (vocab,) rows the SparseAdam steps touched
    assert 0 < int(changed.sum()) < 200  # the captions' few BPE tokens, not the 49408-row table


def test_frozen_token_table_when_token_lr_is_zero(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_download_shard(root, "00000", n=16, size=64)
    torch.manual_seed(0)
    before = create_clip("racm3-demo")[0].token_embedding.weight.detach().clone()
    cfg = FitClipConfig(model="racm3-demo", seconds=30, max_steps=2, batch_size=8, token_lr=0.0)
    assert run_stage("fit-clip", root, configs(fit_clip=cfg)).ok
    after = torch.load(checkpoint_path(root), weights_only=True)["token_embedding.weight"]
    assert torch.equal(after, before)


def test_table4_on_a_coco_split(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    coco = tmp_path / "data" / "coco"
    (coco / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(4):
        entity_image(i, 64).save(coco / "images" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns += [{"id": 10 * i + j, "image_id": i, "caption": f"entity {i} view {j}"} for j in range(3)]
    (coco / "captions_val.json").write_text(json.dumps({"images": images, "annotations": anns}))
    split = load_coco(root, "coco/captions_val.json")
    assert len(split.images) == 4 and split.captions[2][0] == "entity 2 view 0"
    from model.clip_encoder import EncoderInfo, create_clip

    model, _, tf, tok = create_clip("racm3-tiny")
    res = table4(DocEncoder(model, tf, tok, EncoderInfo("racm3-tiny", "", "", 64)), split)
    assert res["n_images"] == 4 and res["n_text_queries"] == 8
    assert res["chance"]["R@1"] == 25.0
    assert all(res[t]["R@5"] == 100.0 for t in ("text_to_image", "image_to_mixture"))  # 4 < 5


def test_same_seed_gives_a_byte_identical_model_and_the_time_limit_fails(tmp_path):
    import hashlib

    import pytest

    digests = []
    for run in ("a", "b"):
        root = DataRoot(str(tmp_path / run))
        make_download_shard(root, "00000", n=16, size=64)
        cfg = FitClipConfig(seconds=300, max_steps=4, batch_size=8, holdout_fraction=0.25)
        assert run_stage("fit-clip", root, configs(fit_clip=cfg)).ok
        digests.append(hashlib.sha256(open(checkpoint_path(root), "rb").read()).hexdigest())
        assert read_manifest(root, "fit-clip", "model").metrics["steps"] == 4  # all steps, always
    assert digests[0] == digests[1]
    from pipelines.demo.fit_clip import train

    model, _, tf, tok = create_clip("racm3-tiny")
    from pipelines.demo.fit_clip import Corpus

    data = Corpus(torch.zeros(4, 3, 32, 32), tok(["a", "b", "c", "d"]), list("abcd"), [b""] * 4)
    with pytest.raises(TimeoutError, match="safety stop"):
        train(model, data, FitClipConfig(seconds=1e-9, max_steps=50, batch_size=2))
