"""Stages `evaluate-part` + `evaluate` on a tiny trained set-up (fit-vqgan, tokenize, embed, index,
retrieve, both variants trained a few steps): metrics.json with the three models, intervals and
paired differences, and an HTML report with inline images; sharded and streamed runs give the same
metrics as one shard; bad COCO entries counted; lineage mismatch refused; the leakage guard; no
zero-sample metric."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from model.clip_encoder import decode_image
from pipelines.core.runner import run_stage
from pipelines.demo.fit_vqgan import FitVQGANConfig
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.evaluate import reduce, report_path
from pipelines.evaluation.fid import frechet_distance
from pipelines.evaluation.guard import guarded_search, near_duplicates
from pipelines.evaluation.metrics import compute
from pipelines.evaluation.models import load_models
from pipelines.evaluation.records import ShardRecords
from pipelines.evaluation.split import read_split
from pipelines.tokens.tokenize import TokenizeConfig
from pipelines.training.sequences import LineageError
from pipelines.training.train import TrainConfig
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table
from tests.factories import NAMES, entity_image, make_download_shard
from tests.pipelines.retrieval.retrieval_helpers import configs, write_checkpoint

FIT = FitVQGANConfig(image_size=16, factor=4, codebook_size=16, channels=8, embed_dim=4,
                     max_steps=2, batch_size=8, bpe_vocab_size=64, threads=1)
TOK = TokenizeConfig(image_size=16, factor=4, codebook_size=16, batch_size=8)
TRAIN = dict(max_steps=3, batch_size=2, warmup_steps=1, progress_bar=False, log_every=1,
             accelerator="cpu", threads=1)
EVAL = EvaluateConfig(coco="coco/captions_val.json", max_images=0, image_samples=2,
                      caption_samples=2, max_caption_tokens=4, show=2, bootstrap=200,
                      dup_image_threshold=0.9999, dup_text_threshold=0.9999)


def run_evaluation(root: DataRoot, cfg: EvaluateConfig) -> dict:
    for stage in ("evaluate-part", "evaluate"):
        report = run_stage(stage, root, configs(evaluate=cfg))
        assert report.ok, (stage, report.failed)
    return json.loads(open(root.artifact("evaluate", "main", "metrics.json")).read())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_coco(root: DataRoot, planted_jpg: bytes | None = None) -> None:
    """3 new renderings of entities 0-2 (5 captions each) and, optionally, a memory image copy."""
    coco = root.join("coco")
    root.makedirs(coco + "/images")
    images, anns = [], []
    for i in range(3 + (planted_jpg is not None)):
        path = f"{coco}/images/{i}.jpg"
        if i < 3:
            entity_image(i, 64, seed=500 + i).save(path)
        else:
            open(path, "wb").write(planted_jpg)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        anns += [{"id": 10 * i + j, "image_id": i, "caption": f"the {NAMES[i % 8]} view {j}"}
                 for j in range(5)]
    with open(f"{coco}/captions_val.json", "w") as f:
        json.dump({"images": images, "annotations": anns}, f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> DataRoot:
    root = DataRoot(str(tmp_path_factory.mktemp("evaluate") / "data"))
    write_checkpoint(root)
    make_download_shard(root, "00000", n=8, size=64)
    make_download_shard(root, "00001", n=8, start=8, size=64)
    cfgs = configs(fit_vqgan=FIT, tokenize=TOK)
    for stage in ("fit-vqgan", "tokenize", "embed", "index", "retrieve", "pack"):
        assert run_stage(stage, root, cfgs).ok, stage
    for variant in ("ra-cm3", "vanilla"):
        cfgs["train"] = TrainConfig(variant=variant, **TRAIN)
        assert run_stage("train", root, cfgs).ok, variant
    memory_jpg = read_table(root, root.artifact("download", "00001", "parquet"))["jpg"][0].as_py()
    write_coco(root, planted_jpg=memory_jpg)
    return root


def test_stage_writes_metrics_for_three_models_and_a_self_contained_report(trained):
    metrics = run_evaluation(trained, EVAL)
    models = metrics["models"]
    assert list(models) == ["ra-cm3", "vanilla", "retrieval-baseline"]
    fid = "FID-EffNetLite0"  # the independent judge by default, never called plain FID
    assert metrics["fid_features"] == fid and "FID" not in models["ra-cm3"]
    for name, m in models.items():
        assert m[fid] >= 0 and m["caption_to_image_n"] == 4 and "CIDEr-D" in m
        assert "KID(EffNetLite0)" in m
        lo, hi = metrics["intervals"][name][fid]
        assert lo <= hi and np.isfinite([lo, hi]).all()
    assert {"image ppl", "text ppl", "image ppl (no retrieval)", "text ppl (caption first)"} <= set(models["ra-cm3"])
    assert "image ppl" in models["vanilla"] and "image ppl (no retrieval)" not in models["vanilla"]
    assert not any("ppl" in k for k in models["retrieval-baseline"])
    lo, hi = metrics["intervals"]["vanilla"]["image ppl"]
    assert lo <= models["vanilla"]["image ppl"] <= hi
    diff = metrics["differences"]["ra-cm3 - vanilla"]["image ppl"]
    assert diff["value"] == pytest.approx(models["ra-cm3"]["image ppl"] - models["vanilla"]["image ppl"],
                                          abs=2e-4) and diff["lo"] <= diff["hi"]
    # the planted copy of memory document 000000008 is excluded from retrieval and counted
    assert metrics["leakage_guard"]["image_near_duplicates"] >= 1
    page = open(report_path(trained)).read()
    assert page.count("data:image/png;base64,") >= 4 and "<svg" in page and "CIDEr-D" in page
    assert "Paired differences" in page
    md = open(trained.artifact("evaluate", "main", "report.md")).read()
    assert "main.figures/t2i_0.png" in md
    assert trained.exists(trained.join("evaluate", "main.figures", "t2i_0.png"))


def open_manifests(root: DataRoot) -> list:
    return list_manifests(root, "evaluate-part")


def test_sharded_streamed_evaluation_equals_one_shard(trained, tmp_path):
    one = dataclasses.replace(EVAL, fid_features="clip", shard_images=0, batch_images=16)
    many = dataclasses.replace(one, shard_images=1, batch_images=1)
    other = DataRoot(str(tmp_path / "copy"))
    shutil.copytree(trained.join(), other.join())
    a = run_evaluation(trained, one)
    b = run_evaluation(other, many)
    ids = {m.shard_id for m in open_manifests(other)}
    assert {"000000-000001", "000003-000004"} <= ids and b["settings"]["images"] == 4
    for model, values in a["models"].items():
        for k, v in values.items():
            assert b["models"][model][k] == pytest.approx(v, rel=1e-4, abs=1e-4), (model, k)
    assert a["split"] == b["split"] and a["leakage_guard"] == b["leakage_guard"]


def test_leakage_guard_excludes_a_planted_duplicate(trained):
    setup = load_models(trained, EVAL)
    setup.retriever.rule = dataclasses.replace(setup.retriever.rule, query_sim_threshold=1.5,
                                              redundancy_threshold=1.5)
    t = read_table(trained, trained.artifact("download", "00001", "parquet")).to_pylist()
    planted = decode_image(t[0]["jpg"])
    vec = setup.retriever.encoder.encode_image([planted])
    dups = near_duplicates(trained, vec, np.zeros((0, vec.shape[1]), np.float32), 0.9999, 0.9999)
    assert t[0]["key"] in dups["image"] and not dups["text"]
    n = int(setup.retriever.index.cpu.ntotal)  # ask for the whole memory: only the guard removes
    assert t[0]["key"] in guarded_search(setup.retriever, vec, set(), n)[0]
    guarded = guarded_search(setup.retriever, vec, dups["image"], n)[0]
    assert t[0]["key"] not in guarded and len(guarded) == n - len(dups["image"])


def test_retrieval_thresholds_set_for_the_evaluation_change_what_it_retrieves(trained):
    from pipelines.evaluation.evaluate import EvaluatePartStage
    from pipelines.evaluation.per_image import prepare

    items, _ = read_split(trained, EVAL.coco)

    def retrieved(**thresholds: float) -> list[list[str]]:
        cfg = dataclasses.replace(EVAL, **thresholds)
        examples = prepare(load_models(trained, cfg), items, cfg, excluded=set())
        return [ex.by_caption for ex in examples] + [ex.by_image for ex in examples]

    loose = retrieved(redundancy_threshold=1.5, query_sim_threshold=1.5)
    strict = retrieved(redundancy_threshold=-1.5, query_sim_threshold=1.5)
    assert all(len(keys) == EVAL.k for keys in loose)  # nothing too similar: k neighbours each
    assert strict == [keys[:1] for keys in loose]  # everything too similar to the first: one
    # the settings are part of what evaluate-part writes: changed, its shards run again
    stage = EvaluatePartStage()
    assert stage.params(EVAL) != stage.params(dataclasses.replace(EVAL, redundancy_threshold=0.5))


def test_checkpoint_from_another_codebook_or_index_is_refused(trained, tmp_path):
    other = DataRoot(str(tmp_path / "copy"))
    shutil.copytree(trained.join(), other.join())
    path = other.artifact("train", "ra-cm3", "pt")
    rec = torch.load(path, weights_only=False)
    rec["lineage"]["index_fingerprint"] = "sha256:another-index"
    torch.save(rec, path)
    with pytest.raises(LineageError, match="ra-cm3 checkpoint was trained with index_fingerprint"):
        load_models(other, EVAL)
    path = other.artifact("train", "vanilla", "pt")
    rec = torch.load(path, weights_only=False)
    rec["lineage"]["codebook"] = "another-codebook"
    torch.save(rec, path)
    shutil.copy(trained.artifact("train", "ra-cm3", "pt"), other.artifact("train", "ra-cm3", "pt"))
    with pytest.raises(LineageError, match="vanilla checkpoint was trained with codebook"):
        load_models(other, EVAL)


def test_bad_coco_entries_are_counted_and_skipped(root):
    coco = root.join("c")
    root.makedirs(coco + "/images")
    for i in (0, 1, 3):
        entity_image(i, 32).save(f"{coco}/images/{i}.jpg")
    open(f"{coco}/images/3.jpg", "wb").write(b"not an image")
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(5)]  # 2.jpg and 4.jpg: 4 has no caption
    anns = [{"id": 1, "image_id": 0, "caption": "a zorvik"}, {"id": 2, "image_id": 0, "caption": "  "},
            {"id": 3, "image_id": 1, "caption": "a plenta"}, {"id": 4, "image_id": 2, "caption": "x"},
            {"id": 5, "image_id": 99, "caption": "orphan"}, {"id": 6, "image_id": 3, "caption": "y"},
            {"id": 7, "image_id": 4, "caption": ""}]
    with open(f"{coco}/captions_val.json", "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    items, counts = read_split(root, "c/captions_val.json")
    assert [it.image_id for it in items] == [0, 1] and items[0].captions == ["a zorvik"]
    assert counts["skipped_unknown_image_id"] == 1 and counts["skipped_empty_caption"] == 2
    assert counts["skipped_missing_image"] == 1 and counts["skipped_undecodable_image"] == 1
    assert counts["skipped_no_caption"] == 1 and counts["usable_images"] == 2


def test_no_metric_is_computed_on_zero_samples(trained, tmp_path):
    nothing = {"position": 0, "image_id": 1, "refs": ["a"], "captions": {}, "clip": {}, "nll": {}}
    feats = {"real": np.zeros((1, 4))} | {m: np.full((1, 4), np.nan)
                                          for m in ("ra-cm3", "vanilla", "retrieval-baseline")}
    out = compute(ShardRecords([nothing], feats, {}, {}, [], "FID-test"), 10, 0)
    assert out["models"]["ra-cm3"] == {"caption_to_image_n": 0, "image_to_caption_n": 0,
                                       "perplexity_n": 0}
    assert out["models"]["retrieval-baseline"] == {"caption_to_image_n": 0, "image_to_caption_n": 0}
    with pytest.raises(ValueError, match=">= 2 images"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    other = DataRoot(str(tmp_path / "copy"))
    shutil.copytree(trained.join(), other.join())
    with open(other.join("coco", "captions_val.json"), "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "gone.jpg"}],
                   "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}, f)
    assert run_stage("evaluate-part", other, configs(evaluate=EVAL)).ok
    with pytest.raises(ValueError, match="no usable image"):
        reduce(other, EVAL)


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # ||mu shift||^2 = 8


def test_a_separate_judge_clip_scores_the_same_images(trained):
    """The retrieval CLIP reranks; a judge CLIP with other weights gives the CLIP score."""
    import dataclasses

    base = run_evaluation(trained, EVAL)["models"]
    judge = write_checkpoint(trained, seed=1, path="weights/judge.pt")
    judged = run_evaluation(trained, dataclasses.replace(
        EVAL, judge_model="racm3-tiny", judge_checkpoint=judge))["models"]
    fid = "FID-EffNetLite0"
    for name in ("ra-cm3", "vanilla"):
        assert judged[name][fid] == pytest.approx(base[name][fid])  # the same images were kept
        assert judged[name]["CLIP-score"] != pytest.approx(base[name]["CLIP-score"])
